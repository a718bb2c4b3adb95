"""Turning received frames into validated requests, before anything is allocated.

The server splits the routing envelope off (:func:`photocore.envelope.split_envelope`)
then calls :func:`parse_request`, which raises :class:`~photocore.protocol.ProtocolError`
(one of the documented codes) and never anything else for bad input. The payload is viewed in place (``np.frombuffer``),
only after its declared shape passed the limits and its length matched exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from photocore.wireimage import WIRE_SIZE
from photocore.protocol import MAX_HEADER_BYTES, ProtocolError, option_float, parse_header, parse_shape, request_id

LEGACY_IMAGE_BYTES = WIRE_SIZE * WIRE_SIZE * 3
"""One upstream-format image: 512x512x3 uint8."""

OPTIONS = {"gmm_threshold", "watermark_threshold", "probe_threshold", "return_features", "prompt_thresholds"}
MAX_PROMPT_OPTIONS = 64
OPS = ("filter", "info", "ping", "reload")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; the ZeroMQ message-size cap is derived from them."""

    max_images: int = 64
    max_pixels: int = 1024 * 1024

    @property
    def max_message_bytes(self) -> int:
        """Largest frame a valid request can hold (ZMQ_MAXMSGSIZE: bigger peers get disconnected)."""
        return max(self.max_images * self.max_pixels * 3, MAX_HEADER_BYTES)


@dataclass
class Ping:
    id: str | None


@dataclass
class Info:
    id: str | None


@dataclass
class Reload:
    """Admin op: load the server's model directory again and swap to it between batches (``anti-sus reload``)."""

    id: str | None


@dataclass
class Filter:
    """A validated filter request; ``images`` views the payload frame without copying."""

    id: str | None
    images: np.ndarray
    gmm_threshold: float | None = None
    watermark_threshold: float | None = None
    return_features: bool = False
    all_features: bool = False
    """With ``return_features``: features of every image in request order, not only the good ones."""
    legacy: bool = False
    probe_threshold: float | None = None
    """Overrides the learnt probe's threshold (P(good) to keep) for this request; ignored without a probe."""
    prompt_thresholds: dict[str, float | None] | None = None
    """Per prompt check: P(reject) at which this request's images are rejected (a number turns the check on, null off)."""


Request = Union[Ping, Info, Filter, Reload]


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame received with copy=False
    return buf if buf is not None else memoryview(frame)


def parse_request(body: Sequence[Any], limits: Limits) -> Request:
    """Validate a request body (the frames after the envelope)."""
    if not body:
        raise ProtocolError("bad_header", "empty request: expected a JSON header frame")
    first = _buffer(body[0])
    if len(body) == 1 and len(first) > MAX_HEADER_BYTES and len(first) % LEGACY_IMAGE_BYTES == 0:
        return _legacy(first, limits)
    header = parse_header(first)
    rid = request_id(header)
    op = header["op"]
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op!r}; this server knows {', '.join(OPS)}", rid)
    if op in ("ping", "info", "reload"):
        if len(body) != 1:
            raise ProtocolError("size_mismatch", f"op {op} takes no payload, got {len(body) - 1} extra frame(s)", rid)
        return Ping(rid) if op == "ping" else Info(rid) if op == "info" else Reload(rid)
    return _filter(header, body, limits, rid)


def _filter(header: dict[str, Any], body: Sequence[Any], limits: Limits, rid: str | None) -> Filter:
    dtype = header.get("dtype", "uint8")
    if dtype != "uint8":
        raise ProtocolError("bad_dtype", f"dtype must be 'uint8', got {dtype!r}", rid)
    if "shape" not in header:
        raise ProtocolError("bad_shape", "filter header has no 'shape' [N, H, W, 3]", rid)
    try:
        n, h, w, c = parse_shape(header["shape"], limits.max_images, limits.max_pixels)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, exc.message, rid) from None
    options = header.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ProtocolError("bad_header", "'options' must be a JSON object", rid)
    unknown = set(options) - OPTIONS
    if unknown:
        raise ProtocolError("bad_header", f"unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}", rid)
    try:
        gmm = option_float(options, "gmm_threshold")
        wm = option_float(options, "watermark_threshold", 0.0, 1.0)
        probe = option_float(options, "probe_threshold", 0.0, 1.0)
        prompts = _prompt_thresholds(options.get("prompt_thresholds"))
    except ProtocolError as exc:
        raise ProtocolError(exc.code, exc.message, rid) from None
    ret = options.get("return_features", False)
    # "all" asks for every image's features (nomad's review queue wants the rejected ones too);
    # true keeps its original meaning, the good images' only, so old clients see no change.
    if not (isinstance(ret, bool) or ret == "all"):
        raise ProtocolError("bad_header", f"option return_features must be true, false or \"all\", got {ret!r}", rid)
    expected = n * h * w * c
    if len(body) != 2:
        raise ProtocolError("size_mismatch", f"filter takes exactly one payload frame after the header, got {len(body) - 1}", rid)
    payload = _buffer(body[1])
    if len(payload) != expected:
        raise ProtocolError("size_mismatch", f"payload is {len(payload)} bytes, shape {[n, h, w, c]} needs {expected}", rid)
    images = np.frombuffer(payload, dtype=np.uint8).reshape(n, h, w, c)
    return Filter(rid, images, gmm, wm, ret is not False, ret == "all", probe_threshold=probe, prompt_thresholds=prompts)


def _prompt_thresholds(value: Any) -> dict[str, float | None] | None:
    """The ``prompt_thresholds`` option: {check name: number in [0, 1] or null}; names are checked by the server."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_PROMPT_OPTIONS:
        raise ProtocolError("bad_header", f"option prompt_thresholds must be an object of at most {MAX_PROMPT_OPTIONS} "
                                          "check names to numbers in [0, 1] or null")
    out: dict[str, float | None] = {}
    for name, t in value.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 40:
            raise ProtocolError("bad_header", f"option prompt_thresholds: bad check name {str(name)[:40]!r}")
        key = f"prompt_thresholds.{name}"
        out[name] = None if t is None else option_float({key: t}, key, 0.0, 1.0)
    return out


def _legacy(frame: memoryview, limits: Limits) -> Filter:
    n = len(frame) // LEGACY_IMAGE_BYTES
    if n > limits.max_images:
        raise ProtocolError("too_large", f"{n} images in one request, limit {limits.max_images}")
    if WIRE_SIZE * WIRE_SIZE > limits.max_pixels:
        raise ProtocolError("too_large", f"legacy 512x512 images exceed the {limits.max_pixels}-pixel limit")
    images = np.frombuffer(frame, dtype=np.uint8).reshape(n, WIRE_SIZE, WIRE_SIZE, 3)
    return Filter(None, images, legacy=True)
