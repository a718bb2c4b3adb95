"""A scenery instance as the gallery: ``POST {url}/import_image`` (multipart).

scenery answers ``{"message": …}``:

* ``Success! Image id = N`` -> added N
* ``Image with the same sha256 is already in the db. Image id = N`` -> duplicate N
* ``Similar image is already in the db. Image ids = [N, …]`` -> duplicate N
* ``Not supported mime type`` / ``Can't generate thumbnail`` -> rejected
* anything else (``fail``) -> not confirmed: an error the sender retries later.

An unauthorised request gets no HTTP reply at all, so every request has a read
timeout, and running out of retries on timeouts is reported as a probable
password problem. 5xx, timeouts and connection errors are retried with
exponential backoff. Success is only ever reported from scenery's own words.
The local catalogue (the "ledger") remembers key -> scenery id for idempotency.
"""
from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Callable

import requests

from ..catalogue import Catalogue
from ..validate import CheckedImage, Meta
from . import Stored, TargetError

log = logging.getLogger(__name__)

_SUCCESS = re.compile(r"^\s*Success!\s*Image id\s*=\s*(\d+)")
_SAME_SHA = re.compile(r"same sha256.*?Image id\s*=\s*(\d+)", re.IGNORECASE | re.DOTALL)
_SIMILAR = re.compile(r"Similar image is already in the db.*?Image ids\s*=\s*(\[.*?\])", re.IGNORECASE | re.DOTALL)
_REJECTS = ("Not supported mime type", "Can't generate thumbnail", "invalid url")
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def interpret(message: Any) -> Stored | None:
    """scenery's message -> Stored, or None when it is not a confirmation of anything."""
    if not isinstance(message, str):
        return None
    m = _SUCCESS.match(message)
    if m:
        return Stored("added", int(m.group(1)), message.strip())
    m = _SAME_SHA.search(message)
    if m:
        return Stored("duplicate", int(m.group(1)), message.strip())
    m = _SIMILAR.search(message)
    if m:
        try:
            ids = [int(x) for x in json.loads(m.group(1))]
        except (ValueError, TypeError):
            ids = []
        if ids:
            return Stored("duplicate", ids[0], message.strip())
    for text in _REJECTS:
        if message.strip().lower().startswith(text.lower()):
            return Stored("rejected", None, message.strip())
    return None


class SceneryTarget:
    """Uploads to scenery; the password comes from the CLI (env or file), never a default."""

    name = "scenery"

    def __init__(self, url: str, password: str, *, tags: list[str] | None = None, timeout: float = 60.0,
                 connect_timeout: float = 5.0, retries: int = 4, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep, session: requests.Session | None = None) -> None:
        if not password:
            raise ValueError("scenery needs import_images_bot_password (env GALLERY_BRIDGE_SCENERY_PASSWORD or --scenery-password-file)")
        self.url = url.rstrip("/")
        self._password = password
        self.tags = list(tags) if tags is not None else ["from_nomad"]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep
        self.session = session or requests.Session()

    def store(self, entry_id: int, image: CheckedImage, meta: Meta) -> Stored:
        data = {"tags": json.dumps(self.tags), "import_images_bot_password": self._password}
        if meta.source_url or meta.permalink:
            data["source_url"] = meta.permalink or meta.source_url  # type: ignore[assignment]
        files = {"image": (f"image.{image.ext}", image.data, _MIME[image.ext])}
        timeouts = 0
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(min(30.0, self.backoff * 2 ** (attempt - 1)))
            try:
                resp = self.session.post(f"{self.url}/import_image", data=data, files=files,
                                         timeout=(self.connect_timeout, self.timeout))
            except requests.Timeout:
                timeouts += 1
                last = f"no answer within {self.timeout:g}s"
                log.warning("scenery: %s (try %d/%d)", last, attempt + 1, self.retries + 1)
                continue
            except requests.ConnectionError as exc:
                last = f"cannot connect: {exc}"
                log.warning("scenery: %s (try %d/%d)", last, attempt + 1, self.retries + 1)
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}"
                log.warning("scenery: %s (try %d/%d)", last, attempt + 1, self.retries + 1)
                continue
            try:
                message = resp.json().get("message")
            except (ValueError, AttributeError):
                message = None
            stored = interpret(message)
            if resp.status_code in (401, 403):
                raise TargetError(f"scenery refused the password (HTTP {resp.status_code})")
            if stored is None:
                if 400 <= resp.status_code < 500:
                    return Stored("rejected", None, f"scenery: HTTP {resp.status_code} {str(message)[:200]}")
                # 2xx without a confirmation ("fail"): never report it as added.
                raise TargetError(f"scenery did not confirm the import: {str(message)[:200]!r}")
            return stored
        if timeouts == self.retries + 1:
            raise TargetError(
                f"scenery at {self.url} never answered ({timeouts} tries): scenery does not answer unauthorised "
                "requests, so the import_images_bot_password is probably wrong"
            )
        raise TargetError(f"scenery at {self.url} failed after {self.retries + 1} tries: {last}")

    def recover(self, catalogue: Catalogue) -> dict[str, int]:
        # A pending row means the upload may or may not have happened. Forget it:
        # redelivery asks scenery again, which answers "same sha256 … id = N".
        rows = catalogue.pending()
        for row in rows:
            catalogue.delete(row["id"])
        return {"pending_entries": len(rows)}

    def discard(self, entry_id: int, ext: str) -> None:
        pass

    def published(self, catalogue: Catalogue) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "scenery", "url": self.url, "tags": self.tags, "timeout_s": self.timeout, "retries": self.retries}

    def close(self) -> None:
        self.session.close()
