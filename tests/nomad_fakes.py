"""Small test doubles for nomad's unit tests (the emulator tests use the real HTTP stack)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nomad.http import HttpResponse, HttpStatusError


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class FakeHttp:
    """Answers requests from a script, in order, recording (method, url, kwargs).

    Like nomad.http.HttpClient, a status >= 400 raises HttpStatusError.
    """

    def __init__(self, script: list[Reply] | None = None, routes: dict[str, Reply] | None = None) -> None:
        self.script = list(script or [])
        self.routes = routes or {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kw: Any) -> HttpResponse:
        self.calls.append((method, url, kw))
        reply = None
        for prefix, r in self.routes.items():
            if url.startswith(prefix) or prefix in url:
                reply = r
                break
        if reply is None:
            if not self.script:
                raise AssertionError(f"unexpected request {method} {url}")
            reply = self.script.pop(0)
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        if reply.status >= 400:
            ra = reply.headers.get("Retry-After")
            raise HttpStatusError(reply.status, reply.headers, url=url, retry_after=float(ra) if ra else None, body=body)
        return HttpResponse(reply.status, reply.headers, body, url, [])
