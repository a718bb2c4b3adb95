"""Errors raised by nomad's fetching layer, each with a short machine code for stats."""
from __future__ import annotations

from typing import Mapping

from photocore.redact import redact, redact_url


class FetchError(Exception):
    """A fetch failed; ``reason`` is a short code ("timeout", "too_large", "http_404", …)."""

    def __init__(self, reason: str, message: str = "", *, url: str | None = None, retryable: bool | None = None) -> None:
        self.reason = reason
        # Messages and URLs end up in logs, the state DB and stderr: never with a credential in them.
        self.url = redact_url(url)
        # None: decided by reason; False: never retried within the same request
        # (e.g. a server that already used the whole deadline).
        self.retryable = retryable
        super().__init__(f"{reason}: {redact(message)}" if message else reason)


class BlockedAddress(FetchError):
    """The SSRF guard refused a host or address (loopback, private, link-local, …)."""

    def __init__(self, message: str, *, url: str | None = None, address: str | None = None) -> None:
        self.address = address
        super().__init__("blocked_address", message, url=url)


class HttpStatusError(FetchError):
    """The server answered with a status >= 400 (after any retries)."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        *,
        url: str | None = None,
        retry_after: float | None = None,
        body: bytes = b"",
    ) -> None:
        self.status = status
        self.headers = headers
        self.retry_after = retry_after
        self.body = body
        super().__init__(status_reason(status), f"HTTP {status} from {url}", url=url)


def status_reason(status: int) -> str:
    """Stats code for an HTTP status: http_404, http_429, http_5xx."""
    return "http_5xx" if status >= 500 else f"http_{status}"
