"""anti_sus health: non-finite scores become error replies, a dead compute thread fails health checks and
exits non-zero, and info/ping carry the process id and the per-start instance token."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from anti_sus import cli
from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterClient
from anti_sus.server import FilterServer

from .test_anti_sus_support import FakeStages, fake_server, image, raw_socket, recv_within, running

pytestmark = pytest.mark.timeout(120)


class NaNStages(FakeStages):
    """GMM score NaN for images of value 77, +inf P(watermark) for images whose corner is 99."""

    def gmm_score(self, features: np.ndarray) -> np.ndarray:
        s = super().gmm_score(features)
        s[np.isclose(features[:, 0], 77.0)] = np.nan
        return s

    def watermark_prob(self, x: np.ndarray) -> np.ndarray:
        p = super().watermark_prob(x).copy()
        p[np.isclose(p, 99 / 255)] = np.inf
        return p


def test_non_finite_scores_become_internal_errors_and_the_server_keeps_serving():
    with running(fake_server(NaNStages())) as ep, FilterClient(ep, timeout=10, retries=0) as c:
        with pytest.raises(AntiSusError) as exc:
            c.filter(np.stack([image(150, 0), image(77)]))
        assert exc.value.code == "internal" and "non-finite GMM score" in exc.value.message and "image 1" in exc.value.message
        with pytest.raises(AntiSusError) as exc:
            c.filter(np.stack([image(150, 99)]))
        assert exc.value.code == "internal" and "non-finite watermark probability" in exc.value.message
        # the compute thread is alive: later requests are answered
        assert c.filter(np.stack([image(150, 0)])).good == [0]
        assert c.ping() > 0


def test_non_finite_request_does_not_fail_its_batch_neighbours():
    ctx = zmq.Context()
    stages = NaNStages(delay=0.5)
    try:
        with running(fake_server(stages, max_batch=8)) as ep:
            a, b, c = (raw_socket(ctx, ep, zmq.DEALER) for _ in range(3))
            hdr = {"v": 1, "op": "filter", "shape": [1, 8, 8, 3], "dtype": "uint8"}
            a.send_multipart([b"", json.dumps({**hdr, "id": "a"}).encode(), image(150, 0).tobytes()])
            time.sleep(0.1)  # a is being computed; b and c share the next batch
            b.send_multipart([b"", json.dumps({**hdr, "id": "b"}).encode(), image(77).tobytes()])
            c.send_multipart([b"", json.dumps({**hdr, "id": "c"}).encode(), image(160, 0).tobytes()])
            ra, rb, rc = (json.loads(recv_within(s, 10)[1]) for s in (a, b, c))
        assert ra["ok"] and rc["ok"] and rc["good"] == [0]
        assert not rb["ok"] and rb["error"]["code"] == "internal"
        assert max(stages.batches) == 2  # b and c really were one batch
    finally:
        ctx.destroy(0)


def _boom(self: FilterServer, jobs: list) -> list:
    raise RuntimeError("injected compute crash")


def test_dead_compute_thread_answers_held_requests_fails_ping_and_stops(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(FilterServer, "_run_batch", _boom)
    ctx = zmq.Context()
    server = fake_server()
    ep = server.bind()[0]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        s = raw_socket(ctx, ep, zmq.DEALER)
        s.send_multipart([b"", json.dumps({"v": 1, "op": "filter", "id": "x", "shape": [1, 8, 8, 3]}).encode(),
                          image(150).tobytes()])
        reply = json.loads(recv_within(s, 10)[1])
        assert not reply["ok"] and reply["error"]["code"] == "internal"
        assert "compute thread died" in reply["error"]["message"] and "injected compute crash" in reply["error"]["message"]
        thread.join(10)
        assert not thread.is_alive(), "serve_forever must return when the compute thread is dead"
        assert server.failure is not None and "RuntimeError" in server.failure
        with FilterClient(ep, timeout=0.5, retries=0) as c, pytest.raises((AntiSusUnavailable, AntiSusError)):
            c.ping()  # health checks fail: nothing answers OK any more
    finally:
        server.stop()
        thread.join(10)
        ctx.destroy(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_exits_non_zero_when_the_compute_thread_dies(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(FilterServer, "_run_batch", _boom)
    monkeypatch.setattr(cli.options, "load_pipeline", lambda *a, **k: FakeStages())
    monkeypatch.setattr(cli.options, "on_signals", lambda stop: None)  # keep pytest's own signal handlers
    ep = f"tcp://127.0.0.1:{_free_port()}"
    got: list = []

    def client() -> None:
        with FilterClient(ep, timeout=10, retries=0) as c:
            try:
                c.filter(np.stack([image(150)]))
            except AntiSusError as exc:
                got.append(exc.code)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert cli.main(["serve", "--bind", ep]) == 1
    t.join(10)
    assert got == ["internal"]
    err = capsys.readouterr().err
    assert "compute thread died" in err and "Traceback" not in err.split("anti-sus: error:")[-1]


def test_info_and_ping_carry_pid_and_instance(monkeypatch: pytest.MonkeyPatch):
    ctx = zmq.Context()
    try:
        with running(fake_server()) as ep, FilterClient(ep, timeout=5) as c:
            info = c.info()
            assert info["pid"] == os.getpid()
            assert len(info["instance"]) == 32 and int(info["instance"], 16) >= 0  # uuid4 hex
            assert info["thresholds"] == {"gmm": 100.0, "watermark": 0.5} and info["protocol"] == 1  # old fields kept
            s = raw_socket(ctx, ep, zmq.REQ)
            s.send(json.dumps({"v": 1, "op": "ping", "id": "p"}).encode())
            pong = json.loads(recv_within(s)[0])
            assert pong["pong"] is True and pong["pid"] == os.getpid() and pong["instance"] == info["instance"]
        with running(fake_server()) as ep2, FilterClient(ep2, timeout=5) as c:
            assert c.info()["instance"] != info["instance"]  # a new token per start
        with running(fake_server(instance="launcher-7f3a")) as ep3, FilterClient(ep3, timeout=5) as c:
            assert c.info()["instance"] == "launcher-7f3a"
    finally:
        ctx.destroy(0)
    monkeypatch.setenv("ANTI_SUS_INSTANCE", "from-env-1")
    assert cli.build_parser().parse_args(["serve"]).instance == "from-env-1"
    monkeypatch.setenv("ANTI_SUS_INSTANCE", "bad token!")
    assert cli.main(["serve"]) == 2
