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

The password travels in the form body, so plain ``http://`` is refused unless
the operator says ``allow_insecure`` (``--allow-insecure-scenery``), and
redirects are never followed by ``requests``: a 307/308 to the same origin
(scheme, host, port) is re-posted, any other redirect is an error, so the
password never reaches another host and another host's "Success" is never
trusted. The URL's userinfo (basic auth for a proxy) is used for requests but
never shown: ``describe()``, errors and logs carry the URL without it.
"""
from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from ..catalogue import Catalogue
from photocore.backoff import Backoff
from photocore.redact import redact, register_secret, safe_url, userinfo_secrets
from ..validate import CheckedImage, Meta
from . import Stored, TargetError

log = logging.getLogger(__name__)

_SUCCESS = re.compile(r"^\s*Success!\s*Image id\s*=\s*(\d+)")
_SAME_SHA = re.compile(r"same sha256.*?Image id\s*=\s*(\d+)", re.IGNORECASE | re.DOTALL)
_SIMILAR = re.compile(r"Similar image is already in the db.*?Image ids\s*=\s*(\[.*?\])", re.IGNORECASE | re.DOTALL)
_REJECTS = ("Not supported mime type", "Can't generate thumbnail", "invalid url")
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 3
"""Same-origin 307/308 hops followed for one upload."""
MAX_WAIT = 30.0
"""Longest pause between two tries of one upload (seconds)."""


class RedirectRefused(TargetError):
    """scenery answered with a redirect that is not followed (other origin, or not 307/308)."""


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port filled in from the scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def check_url(url: str, allow_insecure: bool = False) -> None:
    """Raise ``ValueError`` for a URL the target must not post its password to."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"scenery target needs an http(s) URL, got {safe_url(url)!r}")
    if parts.scheme.lower() == "http" and not allow_insecure:
        raise ValueError(
            f"scenery target {safe_url(url)} is plain http: the import_images_bot_password would travel unencrypted; "
            "use https, or pass --allow-insecure-scenery (env GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY=1) to accept that"
        )


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
                 sleep: Callable[[float], None] = time.sleep, session: requests.Session | None = None,
                 allow_insecure: bool = False) -> None:
        if not password:
            raise ValueError("scenery needs import_images_bot_password (env GALLERY_BRIDGE_SCENERY_PASSWORD or --scenery-password-file)")
        # Registered first, so that no message below (nor any log line) can carry them.
        register_secret(password)
        for secret in userinfo_secrets(url):
            register_secret(secret)
        check_url(url, allow_insecure)
        self.url = url.rstrip("/")
        self.shown_url = safe_url(self.url)
        self.allow_insecure = allow_insecure
        self._origin = origin(self.url)
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
        # One uploader per gallery, so no herd to spread: the waits need no jitter.
        waits = Backoff(self.backoff, max(MAX_WAIT, self.backoff), jitter=False)
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(waits.next())
            try:
                resp = self._post(data, files)
            except requests.Timeout:
                timeouts += 1
                last = f"no answer within {self.timeout:g}s"
                log.warning("scenery: %s (try %d/%d)", last, attempt + 1, self.retries + 1)
                continue
            except requests.ConnectionError as exc:
                last = redact(f"cannot connect: {exc}")
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
                    return Stored("rejected", None, redact(f"scenery: HTTP {resp.status_code} {str(message)[:200]}"))
                # 2xx without a confirmation ("fail"): never report it as added.
                raise TargetError(redact(f"scenery did not confirm the import: {str(message)[:200]!r}"))
            return stored
        if timeouts == self.retries + 1:
            raise TargetError(
                f"scenery at {self.shown_url} never answered ({timeouts} tries): scenery does not answer unauthorised "
                "requests, so the import_images_bot_password is probably wrong"
            )
        raise TargetError(f"scenery at {self.shown_url} failed after {self.retries + 1} tries: {last}")

    def _post(self, data: dict[str, str], files: dict[str, Any]) -> requests.Response:
        """POST to /import_image, re-posting only same-origin 307/308 redirects (at most MAX_REDIRECTS)."""
        url = f"{self.url}/import_image"
        for _ in range(MAX_REDIRECTS + 1):
            # allow_redirects=False: requests would re-post the body (password
            # included) on a 307/308 to any host, and then trust its answer.
            resp = self.session.post(url, data=data, files=files, timeout=(self.connect_timeout, self.timeout),
                                     allow_redirects=False)
            if not resp.is_redirect:
                return resp
            location = urljoin(url, resp.headers.get("location", ""))
            shown = redact(safe_url(location))
            resp.close()
            if origin(location) != self._origin:
                log.error("scenery: HTTP %d redirect to another origin (%s); the password is not sent there",
                          resp.status_code, shown)
                raise RedirectRefused(f"scenery at {self.shown_url} redirected (HTTP {resp.status_code}) to another origin, "
                                      f"{shown}; not following it with the password: fix the --target URL")
            if resp.status_code not in (307, 308):
                raise RedirectRefused(f"scenery at {self.shown_url} answered HTTP {resp.status_code} (redirect to {shown}) "
                                      "instead of taking the upload: fix the --target URL")
            # Same origin: keep the configured netloc (its userinfo included) and take the new path.
            parts = urlsplit(location)
            base = urlsplit(self.url)
            url = urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))
            log.info("scenery: HTTP %d redirect to %s (same origin), posting there", resp.status_code, shown)
        raise RedirectRefused(f"scenery at {self.shown_url} redirected more than {MAX_REDIRECTS} times")

    def recover(self, catalogue: Catalogue) -> dict[str, int]:
        # A pending row means the upload may or may not have happened. Forget it:
        # redelivery asks scenery again, which answers "same sha256 … id = N".
        rows = catalogue.pending()
        for row in rows:
            catalogue.delete(row["id"])
        return {"pending_entries": len(rows)}

    def discard(self, entry_id: int, ext: str) -> None:
        pass

    def published(self, catalogue: Catalogue, entry_id: int | None = None) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "scenery", "url": self.shown_url, "insecure_http_allowed": self.allow_insecure, "tags": self.tags, "timeout_s": self.timeout, "retries": self.retries}

    def close(self) -> None:
        self.session.close()
