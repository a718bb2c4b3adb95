"""Wire protocol v1: framing and error codes of every request/reply between the services (docs/design.md §3).

A request is a JSON header frame followed by binary frames; a reply is a JSON
frame (plus, for some ops, binary frames). Everything here is pure: it parses
and builds frames and raises :class:`ProtocolError` with one of the documented
codes. Nothing here ever unpickles or evaluates what came off the wire.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

PROTOCOL_VERSION = 1

ERROR_CODES = (
    "bad_header",
    "unsupported_version",
    "unknown_op",
    "bad_shape",
    "bad_dtype",
    "size_mismatch",
    "too_large",
    # the server holds as much queued work as --max-queue / --max-queued-bytes allow: retry later.
    "busy",
    "internal",
    # gallery_bridge's ingest uses these two.
    "bad_image",
    "bad_meta",
    # anti_sus's admin op ``reload``: the client's CURVE key is not on the admin list; the new models were refused.
    "forbidden",
    "reload_failed",
)

MAX_HEADER_BYTES = 64 * 1024
"""A header is small JSON; anything larger is refused before it is parsed."""


class ProtocolError(Exception):
    """A request that breaks the protocol; becomes an error reply, never a crash."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def parse_header(frame: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode and check a header frame: a UTF-8 JSON object with ``v`` and ``op``.

    Raises ``bad_header`` for anything that is not such an object and
    ``unsupported_version`` for a version other than 1.
    """
    raw = bytes(frame)
    if len(raw) > max_bytes:
        raise ProtocolError("bad_header", f"header is {len(raw)} bytes, limit {max_bytes}")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_header", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header must be a JSON object")
    rid = header.get("id")
    rid = rid if isinstance(rid, str) and len(rid) <= 256 else None
    version = header.get("v")
    if version is None:
        raise ProtocolError("bad_header", "header has no 'v'", rid)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError("unsupported_version", f"version {version!r} not supported; this server speaks v{PROTOCOL_VERSION}", rid)
    if not isinstance(header.get("op"), str):
        raise ProtocolError("bad_header", "header has no string 'op'", rid)
    return header


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; refusing them keeps thresholds finite.
    raise ValueError(f"{name} is not allowed")


def request_id(header: Mapping[str, Any]) -> str | None:
    """The client's request id, echoed in replies when it is a short string."""
    rid = header.get("id")
    return rid if isinstance(rid, str) and len(rid) <= 256 else None


def parse_shape(value: Any, max_images: int, max_pixels: int) -> tuple[int, int, int, int]:
    """Check a declared ``[N, H, W, 3]`` shape against the limits before allocating."""
    if not isinstance(value, list) or len(value) != 4 or not all(type(x) is int for x in value):
        raise ProtocolError("bad_shape", f"shape must be [N, H, W, 3] integers, got {value!r}")
    n, h, w, c = value
    if c != 3 or n < 1 or h < 1 or w < 1:
        raise ProtocolError("bad_shape", f"shape must be [N>=1, H>=1, W>=1, 3], got {value!r}")
    if n > max_images:
        raise ProtocolError("too_large", f"{n} images in one request, limit {max_images}")
    if h * w > max_pixels:
        raise ProtocolError("too_large", f"{h}x{w} = {h * w} pixels per image, limit {max_pixels}")
    return n, h, w, c


def option_float(options: Mapping[str, Any], name: str, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    """A finite float option within [lo, hi], or None when absent."""
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("bad_header", f"option {name} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise ProtocolError("bad_header", f"option {name}={value} outside [{lo}, {hi}]")
    return float(value)


def encode(obj: Mapping[str, Any]) -> bytes:
    """A reply or header dict -> one UTF-8 JSON frame (NaN refused: it is not JSON)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def ok_reply(request_id: str | None, **fields: Any) -> bytes:
    """``{"v":1,"id":…,"ok":true,…}`` as a frame."""
    return encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields})


def error_reply(code: str, message: str, request_id: str | None = None) -> bytes:
    """``{"v":1,"id":…,"ok":false,"error":{"code":…,"message":…}}`` as a frame."""
    if code not in ERROR_CODES:
        code = "internal"
    return encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message[:1000]}})


def error_from(exc: ProtocolError) -> bytes:
    """The error reply frame for a :class:`ProtocolError`."""
    return error_reply(exc.code, exc.message, exc.request_id)


def parse_reply(frame: bytes | memoryview) -> dict[str, Any]:
    """Client side: decode a reply frame; raises ``ValueError`` if it is not a JSON object."""
    reply = json.loads(bytes(frame).decode("utf-8"))
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ValueError("reply is not a protocol v1 object")
    return reply
