"""Redirect policy: which answers are followed, what the next hop sends, and when credentials are dropped.

Redirects are followed one hop at a time, each hop checked again by the
transport (scheme, address) and by an optional caller veto such as imgur's
``removed.png`` (:func:`reject_removed_placeholder`). A 303 (and a 301/302
after a POST) becomes a GET without a body. Credentials (Authorization,
Cookie, Proxy-Authorization) are dropped as soon as a hop leaves the origin the
caller named (scheme, host or port): another port or scheme on the same host
can be another service, or plain text.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping
from urllib.parse import urljoin, urlsplit

from .errors import FetchError
from .request import Request
from .response import HttpResponse

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
"""Headers dropped on a redirect that changes the origin."""


def default_port(scheme: str) -> int:
    """443 for https, 80 otherwise."""
    return 443 if scheme == "https" else 80


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the default port filled in: the unit credentials belong to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower().rstrip(".")
    try:
        port = parts.port or default_port(scheme)
    except ValueError:
        port = -1  # a bad port fails when the next hop is split; -1 never equals a real origin
    return scheme, host, port


def is_redirect(status: int, headers: Mapping[str, str]) -> bool:
    """A redirect that can be followed: a redirect status with a Location."""
    return status in REDIRECT_STATUSES and "location" in headers


def next_hop(req: Request, status: int, location: str, first_origin: tuple[str, str, int]) -> Request:
    """The request a redirect asks for: new URL, GET after 303 (or 301/302 after POST), credentials
    only while the origin is still the one the caller named."""
    url = urljoin(req.url, location)
    method, body, headers = req.method, req.body, req.headers
    if status == 303 or (status in (301, 302) and method == "POST"):
        method, body = ("GET" if method != "HEAD" else method), None
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    if origin(url) != first_origin:
        headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
    return replace(req, method=method, url=url, headers=headers, body=body)


def reject_removed_placeholder(url: str) -> None:
    """``redirect_check`` for imgur: a hop to ``…imgur.com/removed.png`` means the image is gone.

    Raises FetchError("removed") so the placeholder is never downloaded or stored.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if (host == "imgur.com" or host.endswith(".imgur.com")) and parts.path.rstrip("/").endswith("/removed.png"):
        raise FetchError("removed", f"redirected to imgur's removed placeholder {url}", url=url)


Send = Callable[[Request], "tuple[int, Mapping[str, str], bytes]"]
"""One checked exchange: ``send(request) -> (status, headers, body)``."""


def follow(
    req: Request,
    send: Send,
    *,
    max_redirects: int,
    allow_redirects: bool = True,
    redirect_check: Callable[[str], None] | None = None,
) -> HttpResponse:
    """Send ``req`` and follow its redirects (at most ``max_redirects``); the last answer, any status."""
    history: list[str] = []
    first_origin = origin(req.url)
    while True:
        status, headers, body = send(req)
        if not (allow_redirects and is_redirect(status, headers)):
            return HttpResponse(status, headers, body, req.url, history)
        if len(history) >= max_redirects:
            raise FetchError("too_many_redirects", f"more than {max_redirects} from {history[0] if history else req.url}",
                             url=req.url)
        history.append(req.url)
        req = next_hop(req, status, headers["location"], first_origin)
        if redirect_check is not None:
            redirect_check(req.url)
