"""What a fetch returns: a complete response, or an image download whose first bytes were checked."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import FetchError


@dataclass
class HttpResponse:
    """A complete response: status, case-insensitive headers, body, final URL and redirect history."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    history: list[str] = field(default_factory=list)

    def json(self) -> Any:
        """The body parsed as JSON; FetchError("bad_json") if it is not."""
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FetchError("bad_json", f"{self.url}: {exc}", url=self.url) from exc


@dataclass
class Download:
    """An image download whose first bytes were checked: format is "jpeg", "png" or "webp"."""

    data: bytes
    url: str
    format: str
    history: list[str] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)
