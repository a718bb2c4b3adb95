"""Request encoding: method, URL with query parameters, headers and body, before anything is sent.

The one place that turns a caller's ``params``/``data``/``json``/``auth``/``headers``
into the bytes and header map every attempt and redirect hop starts from.
"""
from __future__ import annotations

import base64
import json as _json
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit


@dataclass(frozen=True)
class Request:
    """What one hop sends: the method, absolute URL, headers (no ``Host``; the transport adds it) and body."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None


def with_params(url: str, params: Mapping[str, Any] | None) -> str:
    """``url`` with ``params`` appended to its query (None values left out)."""
    if not params:
        return url
    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in params.items() if v is not None], doseq=True)
    return urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


def encode_request(
    method: str,
    url: str,
    *,
    user_agent: str,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | bytes | str | None = None,
    json: Any = None,
    auth: tuple[str, str] | None = None,
) -> Request:
    """The request as sent: ``json`` or form ``data`` encoded with its Content-Type, Basic ``auth``,
    and the caller's ``headers`` last (they replace defaults case-insensitively)."""
    hdrs: dict[str, str] = {"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"}
    body: bytes | None = None
    if json is not None:
        body = _json.dumps(json).encode()
        hdrs["Content-Type"] = "application/json"
    elif isinstance(data, Mapping):
        body = urlencode(list(data.items()), doseq=True).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    elif isinstance(data, str):
        body = data.encode()
    elif data is not None:
        body = bytes(data)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        hdrs["Authorization"] = f"Basic {token}"
    for k, v in (headers or {}).items():
        hdrs = {hk: hv for hk, hv in hdrs.items() if hk.lower() != k.lower()}
        hdrs[k] = v
    return Request(method.upper(), with_params(url, params), hdrs, body)
