"""anti_sus server core with a fake pipeline: protocol, every error code, fuzzing, legacy format,
fairness, concurrency, per-request thresholds, shutdown."""
from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest
import zmq

from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterClient
from anti_sus.fairqueue import FairQueue
from anti_sus.wire import LEGACY_IMAGE_BYTES, Limits

from .test_anti_sus_support import FakeStages, fake_server, image, raw_socket, recv_within, running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def header(**kw):
    h = {"v": 1, "op": "filter", "id": "t", "dtype": "uint8"}
    h.update(kw)
    return json.dumps(h).encode()


def batch3() -> np.ndarray:
    # outlier (50 < 100), good (150, corner 0 -> P=0), watermark (200, corner 255 -> P=1)
    return np.stack([image(50), image(150, corner=0), image(200, corner=255)])


def test_ping_info_and_filter_verdicts():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        assert c.ping() > 0
        info = c.info()
        assert info["thresholds"] == {"gmm": 100.0, "watermark": 0.5}
        assert info["limits"]["max_images"] == 16 and info["protocol"] == 1
        r = c.filter(batch3())
        assert r.good == [1]
        assert [x.verdict for x in r.results] == ["outlier", "good", "watermark"]
        assert r.results[0].watermark is None  # the watermark stage only sees GMM survivors
        assert r.results[1].gmm == pytest.approx(150.0, abs=1) and r.results[2].watermark == pytest.approx(1.0)
        assert r.features is None and r.elapsed_ms >= 0


def test_return_features_of_good_images_only():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        r = c.filter(np.stack([image(150, 0), image(50), image(180, 0)]), return_features=True)
        assert r.good == [0, 2]
        assert r.features is not None and r.features.dtype == np.float32 and r.features.shape == (2, 4)
        assert r.features[:, 0].tolist() == pytest.approx([150 - 50 / 192, 180 - 180 / 192], abs=1.0)
        none = c.filter(np.stack([image(50)]), return_features=True)  # no good image: an empty features frame
        assert none.good == [] and none.features is not None and none.features.shape == (0, 4)


def test_threshold_overrides_change_verdicts():
    with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
        b = batch3()
        assert c.filter(b, gmm_threshold=10).good == [0, 1]           # 50 now passes; 200 still watermarked
        assert c.filter(b, watermark_threshold=1.0 - 1e-9).good == [1]  # P=1.0 is still >= threshold
        assert c.filter(b, gmm_threshold=10, watermark_threshold=1.0).good == [0, 1]
        r = c.filter(np.stack([image(150, corner=128)]), watermark_threshold=0.6)
        assert r.good == [0]                                               # P=0.502 < 0.6
        assert c.filter(np.stack([image(150, corner=128)]), watermark_threshold=0.4).good == []
        assert c.filter(b, gmm_threshold=1000).good == []                  # everything an outlier
        assert c.filter(b).good == [1]                                     # server defaults untouched


def _errors(ctx, ep):
    """(frames, expected code) for every protocol error code."""
    ok = image(150)[None]
    return [
        ([b"\xff\xfe not json"], "bad_header"),
        ([b"[1, 2]"], "bad_header"),
        ([header(v=2)], "unsupported_version"),
        ([header(op="explode")], "unknown_op"),
        ([header(shape=[1, 8, 8])], "bad_shape"),
        ([header(shape=[1, 8, 8, 4]), b"x" * 256], "bad_shape"),
        ([header(shape=[1, 8, 8, 3], dtype="float32"), b"x" * 768], "bad_dtype"),
        ([header(shape=[1, 8, 8, 3]), b"x" * 767], "size_mismatch"),
        ([header(shape=[1, 8, 8, 3])], "size_mismatch"),
        ([header(shape=[17, 8, 8, 3]), b"x"], "too_large"),
        ([header(shape=[1, 100000, 100000, 3]), b"x"], "too_large"),
        ([header(shape=list(ok.shape)), np.full_like(ok, 13).tobytes()], "internal"),
    ]


def test_every_error_code_reachable(ctx):
    with running(fake_server()) as ep:
        req = raw_socket(ctx, ep, zmq.REQ)
        seen = set()
        for frames, code in _errors(ctx, ep):
            req.send_multipart(frames)
            reply = json.loads(recv_within(req)[0])
            assert reply["ok"] is False and reply["error"]["code"] == code, (frames[0][:80], reply)
            seen.add(code)
        assert seen == {"bad_header", "unsupported_version", "unknown_op", "bad_shape", "bad_dtype", "size_mismatch",
                        "too_large", "internal"}
        # the request id is echoed on errors so clients can match them
        req.send_multipart([header(shape=[1, 8, 8, 3], id="abc")])
        assert json.loads(recv_within(req)[0])["id"] == "abc"
        # the client turns error replies into AntiSusError with the code
        with FilterClient(ep, timeout=5) as c, pytest.raises(AntiSusError) as exc:
            c.filter(np.full((1, 8, 8, 3), 13, np.uint8))
        assert exc.value.code == "internal"


def _malformed(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(9)
    if kind == 0:  # random frames
        return [rng.randbytes(rng.randrange(1, 300)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:  # wrong payload length
        n = rng.randrange(1, 4)
        return [header(shape=[n, 8, 8, 3]), rng.randbytes(n * 192 + rng.choice([-1, 1, 7, -191]))]
    if kind == 2:  # huge declared shapes
        return [header(shape=[rng.randrange(1, 2**31), rng.randrange(1, 2**31), rng.randrange(1, 2**31), 3]), b"\0" * 16]
    if kind == 3:  # bad JSON
        return [rng.choice([b"{", b"{\"v\":1,", b"null", b"\"str\"", b"{\"v\":NaN,\"op\":\"ping\"}", b"[" * 5000]), b"x"]
    if kind == 4:  # wrong dtype
        return [header(shape=[1, 8, 8, 3], dtype=rng.choice(["float32", "int8", None, 7, ["uint8"]])), b"\0" * 192]
    if kind == 5:  # bad shapes
        return [header(shape=rng.choice([None, "1,8,8,3", [1, 8, 8], [0, 8, 8, 3], [1, -8, 8, 3], [1.0, 8, 8, 3], [True, 8, 8, 3]])), b"\0" * 192]
    if kind == 6:  # bad options
        opts = rng.choice([[], "x", {"gmm_threshold": "high"}, {"watermark_threshold": 2}, {"return_features": 1}, {"nope": 1}])
        return [header(shape=[1, 8, 8, 3], options=opts), b"\0" * 192]
    if kind == 7:  # wrong versions / ops / header types
        return [rng.choice([header(v=0), header(v="1"), header(v=True), header(op=5), header(op="FILTER"), b"{}"])]
    return [header(op=rng.choice(["ping", "info"])), rng.randbytes(5)]  # payload where none belongs


def test_fuzz_500_malformed_then_a_good_request(ctx):
    stages = FakeStages()
    with running(fake_server(stages)) as ep:
        sock = raw_socket(ctx, ep, zmq.DEALER)
        rng = random.Random(1234)
        sent = 0
        for _ in range(60):  # windows of 10 in flight: bounded queues, every one answered
            for _ in range(10):
                sock.send_multipart([b"", *_malformed(rng)])
                sent += 1
            for _ in range(10):
                frames = recv_within(sock)
                assert frames[0] == b"" and len(frames) == 2
                reply = json.loads(frames[1])
                assert reply["ok"] is False and reply["error"]["code"] != "internal", reply
        assert sent >= 500
        # frames larger than ZMQ_MAXMSGSIZE: the peer is cut off before anything is allocated
        big = raw_socket(ctx, ep, zmq.DEALER)
        big.send_multipart([b"", header(shape=[1, 8, 8, 3]), b"\0" * (Limits(16, 512 * 512).max_message_bytes + 1)])
        assert not big.poll(300)
        big.close(0)
        with FilterClient(ep, timeout=5) as c:
            assert c.filter(batch3()).good == [1]
        assert stages.batches  # only the good request reached the pipeline
        assert sum(stages.batches) == 3


def test_legacy_single_frame_request_gets_int32_indexes(ctx):
    with running(fake_server()) as ep:
        req = raw_socket(ctx, ep, zmq.REQ)
        b = np.stack([image(150, 0, 512), image(40, None, 512), image(120, 255, 512), image(200, 10, 512)])
        assert b.nbytes == 4 * LEGACY_IMAGE_BYTES
        req.send(b.tobytes())
        frames = recv_within(req)
        assert len(frames) == 1
        assert np.frombuffer(frames[0], "<i4").tolist() == [0, 3]


def test_concurrent_clients_get_their_own_answers():
    stages = FakeStages(delay=0.02)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(k: int, ep: str) -> None:
        try:
            with FilterClient(ep, timeout=10) as c:
                out = []
                for j in range(5):
                    vals = [110 + k * 10 + j, 10 + k]  # good, outlier: distinct per client and round
                    r = c.filter(np.stack([image(v, 0) for v in vals]))
                    out.append(([x.gmm for x in r.results], r.good))
                results[k] = out
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with running(fake_server(stages, max_batch=8)) as ep:
        threads = [threading.Thread(target=client, args=(k, ep)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    for k in range(6):
        assert len(results[k]) == 5
        for j, (gmm, good) in enumerate(results[k]):
            expected = [image(v, 0).mean() for v in (110 + k * 10 + j, 10 + k)]
            assert gmm == pytest.approx(expected)
            assert good == [0]
    assert max(stages.batches) > 2  # requests from several clients shared model calls
    assert max(stages.batches) <= 8


def test_fair_queue_round_robin_and_batch_bound():
    class J:
        def __init__(self, c, n):
            self.c, self.n_images = c, n

    q: FairQueue[J] = FairQueue()
    for i in range(4):
        q.put("greedy", J("greedy", 4))
    q.put("a", J("a", 2))
    q.put("b", J("b", 2))
    first = q.take(8, 0)
    assert [j.c for j in first] == ["greedy", "a", "b"]  # the greedy client does not starve the others
    assert sum(j.n_images for j in q.take(8, 0)) == 8
    assert [j.n_images for j in q.take(1, 0)] == [4]      # one oversize request is still taken whole
    assert q.take(8, 0) == [] and q.images == 0


def test_backpressure_and_limits_respected_in_info():
    with running(fake_server(max_queue=16)) as ep, FilterClient(ep, timeout=5) as c:
        assert c.info()["limits"]["max_message_bytes"] == 16 * 512 * 512 * 3


def test_graceful_stop_answers_batch_in_flight_and_fails_queued(ctx):
    stages = FakeStages(delay=1.0)
    server = fake_server(stages, max_batch=1)
    with running(server) as ep:
        a = raw_socket(ctx, ep, zmq.DEALER)
        b = raw_socket(ctx, ep, zmq.DEALER)
        a.send_multipart([b"", header(shape=[1, 8, 8, 3], id="a"), image(150, 0).tobytes()])
        deadline = time.monotonic() + 5
        while not stages.batches and time.monotonic() < deadline:
            time.sleep(0.01)
        b.send_multipart([b"", header(shape=[1, 8, 8, 3], id="b"), image(150, 0).tobytes()])
        time.sleep(0.2)
        server.stop()
        ra = json.loads(recv_within(a, 10)[1])
        rb = json.loads(recv_within(b, 10)[1])
    assert ra["ok"] and ra["good"] == [0] and ra["id"] == "a"
    assert not rb["ok"] and rb["error"]["code"] == "internal" and "shutting down" in rb["error"]["message"]


def test_client_unavailable_after_bounded_retries():
    port = zmq.Context.instance().socket(zmq.ROUTER)
    free = port.bind_to_random_port("tcp://127.0.0.1")
    port.close(0)  # nothing listens there any more
    t0 = time.monotonic()
    with FilterClient(f"tcp://127.0.0.1:{free}", timeout=0.2, retries=2) as c, pytest.raises(AntiSusUnavailable):
        c.ping()
    assert time.monotonic() - t0 < 3


def test_client_retry_reaches_a_server_that_starts_late():
    server = fake_server()
    ep = server.bind()[0]
    result: list = []
    with FilterClient(ep, timeout=0.3, retries=20) as c:
        t = threading.Thread(target=lambda: result.append(c.filter(batch3()).good))
        t.start()
        time.sleep(0.5)  # first attempts time out: the socket is rebuilt and the request resent
        serve = threading.Thread(target=server.serve_forever, daemon=True)
        serve.start()
        t.join(timeout=15)
        server.stop()
        serve.join(timeout=10)
    assert result == [[1]]


def test_client_rejects_bad_arrays_locally():
    c = FilterClient("tcp://127.0.0.1:1", timeout=1, retries=0)
    for bad in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError):
            c.filter(bad)
    c.close()
