"""photocore.protocol and photocore.envelope: framing, error codes and the ROUTER envelope split."""
from __future__ import annotations

import json
import math

import pytest
import zmq

from photocore.envelope import split_envelope
from photocore.protocol import (ERROR_CODES, MAX_HEADER_BYTES, ProtocolError, encode, error_from, error_reply, ok_reply,
                                option_float, parse_header, parse_reply, parse_shape, request_id)


def test_parse_header_accepts_a_v1_object() -> None:
    h = parse_header(b'{"v":1,"op":"ping","id":"abc"}')
    assert h["op"] == "ping" and request_id(h) == "abc"


@pytest.mark.parametrize("frame,code", [
    (b"not json", "bad_header"),
    (b"[1,2]", "bad_header"),
    (b'{"op":"ping"}', "bad_header"),
    (b'{"v":2,"op":"ping"}', "unsupported_version"),
    (b'{"v":true,"op":"ping"}', "unsupported_version"),
    (b'{"v":1}', "bad_header"),
    (b'{"v":1,"op":"x","t":NaN}', "bad_header"),
    (b"\xff\xfe", "bad_header"),
    (b'{"v":1,"op":"' + b"a" * MAX_HEADER_BYTES + b'"}', "bad_header"),
])
def test_parse_header_refuses(frame: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        parse_header(frame)
    assert ei.value.code == code


def test_request_id_is_kept_on_a_version_error() -> None:
    with pytest.raises(ProtocolError) as ei:
        parse_header(b'{"v":9,"op":"ping","id":"r1"}')
    assert ei.value.request_id == "r1"
    assert json.loads(error_from(ei.value))["id"] == "r1"


def test_parse_shape_limits() -> None:
    assert parse_shape([2, 10, 10, 3], 4, 100) == (2, 10, 10, 3)
    for shape, code in (([5, 1, 1, 3], "too_large"), ([1, 11, 10, 3], "too_large"), ([1, 1, 1, 4], "bad_shape"),
                        ([1, 1, 1], "bad_shape"), ([1.0, 1, 1, 3], "bad_shape")):
        with pytest.raises(ProtocolError) as ei:
            parse_shape(shape, 4, 100)
        assert ei.value.code == code


def test_option_float() -> None:
    assert option_float({}, "x") is None
    assert option_float({"x": 0.5}, "x", 0, 1) == 0.5
    for bad in (True, "1", math.inf, 2.0):
        with pytest.raises(ProtocolError):
            option_float({"x": bad}, "x", 0, 1)


def test_replies_round_trip() -> None:
    ok = parse_reply(ok_reply("r", pong=True))
    assert ok == {"v": 1, "id": "r", "ok": True, "pong": True}
    err = parse_reply(error_reply("busy", "full", "r"))
    assert err["ok"] is False and err["error"] == {"code": "busy", "message": "full"}
    assert parse_reply(error_reply("made_up", "x"))["error"]["code"] == "internal"  # only documented codes go out
    with pytest.raises(ValueError):
        parse_reply(b'{"v":1}')
    with pytest.raises(ValueError):
        encode({"x": math.nan})
    with pytest.raises(ValueError):
        ProtocolError("made_up", "x")
    assert {"busy", "bad_image", "bad_meta", "internal"} <= set(ERROR_CODES)


@pytest.mark.parametrize("frames,envelope,body", [
    ([b"peer", b"", b"h", b"p"], [b"peer", b""], [b"h", b"p"]),  # REQ client
    ([b"broker", b"peer", b"", b"h"], [b"broker", b"peer", b""], [b"h"]),  # through a broker
    ([b"peer", b"h", b"p"], [b"peer"], [b"h", b"p"]),  # DEALER without a delimiter
    ([b"peer"], [b"peer"], []),
])
def test_split_envelope(frames: list[bytes], envelope: list[bytes], body: list[bytes]) -> None:
    assert split_envelope(frames) == (envelope, body)


def test_split_envelope_on_a_real_router_with_zmq_frames() -> None:
    ctx = zmq.Context()
    router, req = ctx.socket(zmq.ROUTER), ctx.socket(zmq.REQ)
    try:
        for s in (router, req):
            s.linger = 0
        port = router.bind_to_random_port("tcp://127.0.0.1")
        req.connect(f"tcp://127.0.0.1:{port}")
        req.send_multipart([b'{"v":1,"op":"ping"}', b"payload"])
        assert router.poll(10000)
        envelope, body = split_envelope(router.recv_multipart(copy=False))
        assert [f.bytes for f in body] == [b'{"v":1,"op":"ping"}', b"payload"]
        router.send_multipart([*envelope, b"reply"])
        assert req.poll(10000) and req.recv() == b"reply"
    finally:
        router.close(0)
        req.close(0)
        ctx.term()
