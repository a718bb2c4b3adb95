"""``return_features="all"``: every image's CLIP features (rejected ones too), the thresholds in each reply,
and both directions of compatibility (an old client's ``true``; an old server that knows only true/false)."""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Iterator

import numpy as np
import pytest
import zmq

from anti_sus.client import AntiSusError, FilterClient
from photocore.envelope import split_envelope
from photocore.protocol import error_reply, ok_reply, parse_header

from .test_anti_sus_support import fake_server, image, raw_socket, recv_within, running

pytestmark = pytest.mark.timeout(60)


def batch3() -> np.ndarray:
    # outlier (mean 50 < 100), good (150, corner 0 -> P=0), watermark (200, corner 255 -> P=1)
    return np.stack([image(50), image(150, corner=0), image(200, corner=255)])


def test_all_returns_every_images_features_in_request_order():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        r = c.filter(batch3(), return_features="all")
        assert [x.verdict for x in r.results] == ["outlier", "good", "watermark"]
        assert r.good == [1] and r.features_index == [0, 1, 2]
        assert r.features is not None and r.features.shape == (3, 4) and r.features.dtype == np.float32
        # The fake CLIP feature's first value is the image's mean: each row belongs to its own image.
        assert r.features[:, 0].tolist() == pytest.approx([50, 150 - 150 / 192, 200 + 55 / 192], abs=0.01)
        rejected = r.feature_of(0)
        assert rejected is not None and rejected[0] == pytest.approx(50)
        assert c.all_features_supported is True


def test_true_still_means_the_good_images_only():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        r = c.filter(batch3(), return_features=True)
        assert r.features is not None and r.features.shape == (1, 4) and r.features_index == [1]
        assert r.feature_of(1) is not None and r.feature_of(0) is None  # no features of a rejected image
        assert c.filter(batch3()).feature_of(1) is None


def test_reply_says_the_thresholds_it_was_judged_by():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        assert c.filter(batch3()).thresholds == {"gmm": 100.0, "watermark": 0.5}
        assert c.filter(batch3(), gmm_threshold=10, watermark_threshold=0.9).thresholds == {"gmm": 10.0, "watermark": 0.9}


def test_old_clients_wire_format_unchanged():
    """A client that sends ``true`` gets the good images' rows and shape, as before."""
    ctx = zmq.Context()
    try:
        with running(fake_server()) as ep:
            s = raw_socket(ctx, ep)
            hdr = {"v": 1, "op": "filter", "id": "o", "dtype": "uint8", "shape": [3, 8, 8, 3], "options": {"return_features": True}}
            s.send_multipart([json.dumps(hdr).encode(), batch3().tobytes()])
            frames = recv_within(s)
            reply = json.loads(frames[-2])
            assert reply["ok"] and reply["good"] == [1] and reply["features_shape"] == [1, 4]
            assert len(frames[-1]) == 4 * 4
            s.close(0)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("value", ["good", 1, "ALL", None])
def test_other_values_are_refused(value):
    ctx = zmq.Context()
    try:
        with running(fake_server()) as ep:
            s = raw_socket(ctx, ep)
            hdr = {"v": 1, "op": "filter", "id": "x", "dtype": "uint8", "shape": [1, 8, 8, 3], "options": {"return_features": value}}
            s.send_multipart([json.dumps(hdr).encode(), image(150).tobytes()])
            reply = json.loads(recv_within(s)[-1])
            assert not reply["ok"] and reply["error"]["code"] == "bad_header"
            s.close(0)
    finally:
        ctx.destroy(linger=0)
    with pytest.raises(ValueError):
        FilterClient("tcp://127.0.0.1:1", timeout=1).filter(batch3(), return_features="some")  # type: ignore[arg-type]


@contextlib.contextmanager
def old_server() -> Iterator[tuple[str, list[object]]]:
    """A server of the previous protocol revision: return_features only true/false, no thresholds in replies.

    Every image is good; its feature row is ``[index]``. Yields the endpoint and the options it received.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    seen: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            envelope, body = split_envelope(sock.recv_multipart())
            hdr = parse_header(body[0])
            ret = hdr.get("options", {}).get("return_features", False)
            seen.append(ret)
            if not isinstance(ret, bool):
                sock.send_multipart([*envelope, error_reply("bad_header", f"option return_features must be true or false, got {ret!r}", hdr.get("id"))])
                continue
            n = hdr["shape"][0]
            results = [{"index": i, "gmm": 150.0, "watermark": 0.0, "verdict": "good"} for i in range(n)]
            frames = [ok_reply(hdr.get("id"), good=list(range(n)), results=results, elapsed_ms=1.0,
                               **({"features_shape": [n, 1]} if ret else {}))]
            if ret:
                frames.append(np.arange(n, dtype="<f4").reshape(n, 1).tobytes())
            sock.send_multipart([*envelope, *frames])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", seen
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close(0)
        ctx.term()


def test_old_server_falls_back_to_the_good_images_features_once():
    with old_server() as (ep, seen), FilterClient(ep, timeout=5) as c:
        r = c.filter(batch3(), return_features="all")
        assert r.features_index == [0, 1, 2] == r.good  # the good ones: here every image
        assert r.thresholds is None
        assert c.all_features_supported is False
        c.filter(batch3(), return_features="all")
        assert seen == ["all", True, True]  # refused once, then not asked again


def test_old_server_error_other_than_the_option_is_raised():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        with pytest.raises(AntiSusError):
            c.filter(np.stack([image(13)]), return_features="all")  # the fake pipeline's poison: internal
        assert c.all_features_supported is None
