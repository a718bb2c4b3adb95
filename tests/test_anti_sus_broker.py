"""Scale-out and security: the load-balancing broker and CURVE (fake pipeline, in threads)."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from anti_sus.broker import READY, Broker
from anti_sus.client import AntiSusUnavailable, FilterClient
from photocore.curve import keygen
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits

from .concurrency import background
from .test_anti_sus_support import LOOPBACK, FakeStages, fake_server, image, running

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def broker_running(backend: str = LOOPBACK, **kw) -> Iterator[Broker]:
    b = Broker([LOOPBACK], [backend], **kw)
    with background(b.serve_forever, b.stop):
        yield b


@contextlib.contextmanager
def worker(backend: str, stages: FakeStages) -> Iterator[FilterServer]:
    w = FilterServer(stages, ServerConfig(connect=backend, limits=Limits(16, 512 * 512), heartbeat=0.2))
    with running(w):
        yield w


def wait_for(cond, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_broker_spreads_work_over_two_workers():
    s1, s2 = FakeStages(delay=0.05), FakeStages(delay=0.05)
    with broker_running() as b, worker(b.backend_endpoints[0], s1), worker(b.backend_endpoints[0], s2):
        wait_for(lambda: len(b.free) == 2)
        out: list[list[int]] = []
        errors: list[BaseException] = []

        def client(k: int) -> None:
            try:
                with FilterClient(b.frontend_endpoints[0], timeout=10) as c:
                    for _ in range(4):
                        out.append(c.filter(np.stack([image(150, 0), image(20)])).good)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert out == [[0]] * 16
        assert s1.batches and s2.batches  # both workers received work
        assert len(s1.batches) + len(s2.batches) == 16
        with FilterClient(b.frontend_endpoints[0], timeout=5) as c:  # ping and info go through too
            assert c.ping() > 0 and c.info()["thresholds"]["gmm"] == 100.0


def test_request_held_by_a_dead_worker_is_served_after_client_retry():
    """A worker takes a request and dies without replying: the Lazy Pirate retry lands on the live worker."""
    ctx = zmq.Context()
    live = FakeStages()
    try:
        with broker_running() as b:
            dead = ctx.socket(zmq.DEALER)
            dead.setsockopt(zmq.LINGER, 0)
            dead.connect(b.backend_endpoints[0])
            dead.send_multipart([READY, b"1", b"0"])  # says it is free once, then never beats again
            wait_for(lambda: len(b.free) == 1)
            with worker(b.backend_endpoints[0], live):
                wait_for(lambda: len(b.free) == 2)
                results = []
                with FilterClient(b.frontend_endpoints[0], timeout=0.5, retries=3) as c:
                    for _ in range(4):
                        results.append(c.filter(np.stack([image(150, 0)])).good)
                        if dead is not None and dead.poll(0):
                            dead.recv_multipart()  # it took a request ...
                            dead.close(0)          # ... and dies with it
                            dead = None
                assert dead is None, "the dying worker was never given a request"
                assert results == [[0]] * 4
                assert len(live.batches) == 4
    finally:
        ctx.destroy(linger=0)


def test_curve_known_client_served_unknown_refused(tmp_path: Path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    server_pub, server_secret = keygen(keys, "server")
    client_pub, client_secret = keygen(keys, "client")
    _, stranger_secret = keygen(keys, "stranger")
    allowed.mkdir()
    (allowed / "client.key").write_bytes(client_pub.read_bytes())
    server = fake_server(curve_secret_key=server_secret, curve_allow=allowed)
    with running(server) as ep:
        with FilterClient(ep, timeout=5, curve_server_key=server_pub, curve_client_keys=client_secret) as c:
            assert c.filter(np.stack([image(150, 0)])).good == [0]
            assert c.info()["curve"] is True
        with FilterClient(ep, timeout=0.5, retries=1, curve_server_key=server_pub, curve_client_keys=stranger_secret) as c:
            with pytest.raises(AntiSusUnavailable):
                c.ping()
        with FilterClient(ep, timeout=0.5, retries=0) as c:  # no CURVE at all
            with pytest.raises(AntiSusUnavailable):
                c.ping()


def test_broker_frontend_with_curve(tmp_path: Path):
    server_pub, server_secret = keygen(tmp_path / "keys", "broker")
    client_pub, client_secret = keygen(tmp_path / "keys", "client")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(client_pub.read_bytes())
    with broker_running(curve_secret_key=server_secret, curve_allow=allowed) as b, worker(b.backend_endpoints[0], FakeStages()):
        wait_for(lambda: b.capacity == 1)
        with FilterClient(b.frontend_endpoints[0], timeout=5, curve_server_key=server_pub, curve_client_keys=client_secret) as c:
            assert c.filter(np.stack([image(150, 0)])).good == [0]
        with FilterClient(b.frontend_endpoints[0], timeout=0.5, retries=0, curve_server_key=server_pub) as c:
            with pytest.raises(AntiSusUnavailable):  # a throwaway key pair is not in the allowed directory
                c.ping()


def test_silent_worker_is_dropped_and_workers_rejoin_a_restarted_broker():
    ctx = zmq.Context()
    try:
        with broker_running(worker_timeout=0.5) as b:
            backend = b.backend_endpoints[0]
            silent = ctx.socket(zmq.DEALER)
            silent.setsockopt(zmq.LINGER, 0)
            silent.connect(backend)
            silent.send_multipart([READY, b"1", b"0"])
            wait_for(lambda: len(b.free) == 1)
            wait_for(lambda: len(b.free) == 0, 5)  # no heartbeat within worker_timeout: dropped
        stages = FakeStages()
        with worker(backend, stages):
            with broker_running(backend) as b2:  # a new broker on the same endpoint
                wait_for(lambda: b2.capacity == 1, 10)  # the worker's heartbeat registers it again
                with FilterClient(b2.frontend_endpoints[0], timeout=5) as c:
                    assert c.filter(np.stack([image(150, 0)])).good == [0]
    finally:
        ctx.destroy(linger=0)


# -- CURVE on the backend: only workers whose key is allowed are given requests ---------------------

@contextlib.contextmanager
def curve_worker(backend: str, stages: FakeStages, server_key: Path | None = None,
                 client_key: Path | None = None) -> Iterator[FilterServer]:
    w = FilterServer(stages, ServerConfig(connect=backend, limits=Limits(16, 512 * 512), heartbeat=0.2,
                                          curve_server_key=server_key, curve_client_key=client_key))
    with running(w):
        yield w


@pytest.fixture()
def backend_keys(tmp_path: Path) -> dict[str, Path]:
    """The backend's key pair, an allowed worker, a stranger, and the allow-list holding only the worker."""
    keys = tmp_path / "keys"
    pub, secret = keygen(keys, "backend")
    worker_pub, worker_secret = keygen(keys, "worker")
    _, stranger_secret = keygen(keys, "stranger")
    allowed = tmp_path / "workers"
    allowed.mkdir()
    (allowed / "worker.key").write_bytes(worker_pub.read_bytes())
    return {"public": pub, "secret": secret, "allow": allowed, "worker": worker_secret, "stranger": stranger_secret}


def test_backend_curve_allowed_worker_serves(backend_keys: dict[str, Path], caplog: pytest.LogCaptureFixture):
    k = backend_keys
    stages = FakeStages()
    with broker_running(backend_curve_secret_key=k["secret"], backend_curve_allow=k["allow"]) as b, \
            curve_worker(b.backend_endpoints[0], stages, k["public"], k["worker"]):
        wait_for(lambda: b.capacity == 1)
        assert not [r for r in caplog.records if r.name == "anti_sus.server" and r.levelname == "WARNING"]
        with FilterClient(b.frontend_endpoints[0], timeout=5) as c:  # the frontend stays plain: only the backend is CURVE
            assert c.filter(np.stack([image(150, 0)])).good == [0]
        assert stages.batches == [1]


@pytest.mark.parametrize("who, said", [("stranger", "add this worker's public .key"), ("no key", "add this worker's public .key"),
                                       ("no CURVE", "may need CURVE")])
def test_backend_curve_refuses_unknown_and_missing_keys(backend_keys: dict[str, Path], who: str, said: str,
                                                        caplog: pytest.LogCaptureFixture):
    """An unlisted key, a throwaway key (server key but no client key) and a plain worker never join,
    and each refused worker says why in one warning (not one per reconnect)."""
    caplog.set_level("INFO", logger="anti_sus.server")
    k = backend_keys
    server_key = None if who == "no CURVE" else k["public"]
    client_key = k["stranger"] if who == "stranger" else None
    stages = FakeStages()
    with broker_running(backend_curve_secret_key=k["secret"], backend_curve_allow=k["allow"]) as b, \
            curve_worker(b.backend_endpoints[0], stages, server_key, client_key):
        time.sleep(1.5)  # seven heartbeats: each would have registered the worker if its handshake had passed
        assert len(b.free) == 0, f"{who}: a worker outside the allow-list joined"
        with FilterClient(b.frontend_endpoints[0], timeout=0.5, retries=0) as c:
            with pytest.raises(AntiSusUnavailable):
                c.ping()
        assert stages.batches == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "anti_sus.server" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and said in warnings[0] and "does not take this worker" in warnings[0], warnings


def test_backend_curve_needs_an_allow_list(backend_keys: dict[str, Path]):
    from photocore.curve import CurveKeyError

    with pytest.raises(CurveKeyError, match="allow-list"):
        Broker([LOOPBACK], [LOOPBACK], backend_curve_secret_key=backend_keys["secret"])
    with pytest.raises(CurveKeyError, match="needs --backend-curve-secret-key"):
        Broker([LOOPBACK], [LOOPBACK], backend_curve_allow=backend_keys["allow"])


def test_frontend_and_backend_curve_with_separate_allow_lists(tmp_path: Path, backend_keys: dict[str, Path]):
    """Each side admits only its own keys: a worker key does not open the frontend, and the reverse."""
    k = backend_keys
    front_pub, front_secret = keygen(tmp_path / "front", "broker")
    client_pub, client_secret = keygen(tmp_path / "front", "nomad")
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / "nomad.key").write_bytes(client_pub.read_bytes())
    with broker_running(curve_secret_key=front_secret, curve_allow=clients, backend_curve_secret_key=k["secret"],
                        backend_curve_allow=k["allow"]) as b, \
            curve_worker(b.backend_endpoints[0], FakeStages(), k["public"], k["worker"]):
        wait_for(lambda: b.capacity == 1)
        with FilterClient(b.frontend_endpoints[0], timeout=5, curve_server_key=front_pub, curve_client_keys=client_secret) as c:
            assert c.filter(np.stack([image(150, 0)])).good == [0]
        with FilterClient(b.frontend_endpoints[0], timeout=0.5, retries=0, curve_server_key=front_pub,
                          curve_client_keys=k["worker"]) as c:
            with pytest.raises(AntiSusUnavailable):  # a worker's key is not a client's
                c.ping()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--curve-server-key", "k.key", "--curve-client-key", "w.key_secret"], "for a broker worker (--connect)"),
    (["serve", "--connect", "tcp://127.0.0.1:7779", "--curve-server-key", "k.key"], "needs --curve-client-key"),
    (["serve", "--connect", "tcp://127.0.0.1:7779", "--curve-secret-key", "k.key_secret"], "is a CURVE client"),
    (["broker", "--backend-curve-secret-key", "k.key_secret"], "allow-list"),
])
def test_cli_curve_flag_mistakes_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    from anti_sus.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_worker_key_files_are_checked_before_loading_models(backend_keys: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]):
    """The broker's secret where its public key belongs, or a public key as the worker's own: one line, exit 2.

    The keys come from the environment here (ANTI_SUS_CURVE_SERVER_KEY / _CLIENT_KEY), as in a container.
    """
    from anti_sus.cli import main

    k = backend_keys
    monkeypatch.setenv("ANTI_SUS_CONNECT", "tcp://127.0.0.1:7779")
    monkeypatch.setenv("ANTI_SUS_MODELS", str(tmp_path / "no-models-here"))
    for server_key, client_key, message in ((k["secret"], k["worker"], "holds a secret key"),
                                            (k["public"], k["allow"] / "worker.key", "holds no secret key")):
        monkeypatch.setenv("ANTI_SUS_CURVE_SERVER_KEY", str(server_key))
        monkeypatch.setenv("ANTI_SUS_CURVE_CLIENT_KEY", str(client_key))
        assert main(["serve"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
