"""Rolling reload through the broker: workers reload one at a time, the others keep serving, nothing is dropped."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from anti_sus.client import AntiSusError, FilterClient
from anti_sus.cli import main
from anti_sus.modeldir import ModelDirError
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits

from .test_anti_sus_broker import broker_running, wait_for
from .test_anti_sus_support import FakeStages, image, running

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def worker(backend: str, loader: Callable[[], Any]) -> Iterator[FilterServer]:
    w = FilterServer(FakeStages(delay=0.02), ServerConfig(connect=backend, limits=Limits(16, 512 * 512), heartbeat=0.2,
                                                          loader=loader))
    with running(w):
        yield w


class Loads:
    """A loader that records when each load ran (to show the workers reloaded one after another)."""

    def __init__(self, fail: bool = False) -> None:
        self.spans: list[tuple[float, float]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self) -> FakeStages:
        t0 = time.monotonic()
        time.sleep(0.4)  # a load takes a while: overlapping loads would show
        with self._lock:
            self.spans.append((t0, time.monotonic()))
        if self.fail:
            raise ModelDirError("model directory /m is not usable: gmm: file /m/gmm.npz is missing")
        return FakeStages(delay=0.02)


def test_broker_reloads_its_workers_one_at_a_time_while_serving(capsys: pytest.CaptureFixture[str]) -> None:
    loads = Loads()
    with broker_running() as b, worker(b.backend_endpoints[0], loads) as w1, worker(b.backend_endpoints[0], loads) as w2:
        wait_for(lambda: len(b.free) == 2)
        ep = b.frontend_endpoints[0]
        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def stream() -> None:
            with FilterClient(ep, timeout=30, retries=0) as c:
                while not stop.is_set():
                    try:
                        assert len(c.filter(np.stack([image(150), image(20)])).results) == 2
                        answered[0] += 1
                    except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                        failures.append(repr(exc))

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        time.sleep(0.3)
        before = answered[0]
        assert main(["reload", "--server", ep, "--timeout", "60"]) == 0
        during = answered[0] - before
        stop.set()
        t.join(timeout=30)
        out = capsys.readouterr().out
        assert "reloaded 2 worker(s)" in out and out.count("generation 2") == 2
        assert w1.generation == 2 and w2.generation == 2
        (a0, a1), (b0, b1) = sorted(loads.spans)
        assert a1 <= b0, "the two workers reloaded at the same time"
        assert failures == [] and during > 0  # requests kept being answered through both reloads


def test_a_failing_worker_stops_the_round_and_the_client_hears_why() -> None:
    loads = Loads(fail=True)
    with broker_running() as b, worker(b.backend_endpoints[0], loads) as w1, worker(b.backend_endpoints[0], loads) as w2:
        wait_for(lambda: len(b.free) == 2)
        with FilterClient(b.frontend_endpoints[0], timeout=30, retries=0) as c:
            with pytest.raises(AntiSusError) as err:
                c.reload()
            assert err.value.code == "reload_failed" and "gmm.npz is missing" in str(err.value)
            assert "1 not tried" in str(err.value)
            assert len(loads.spans) == 1 and {w1.generation, w2.generation} == {1}
            assert c.filter(np.stack([image(150)])).results  # still serving on the old models


def test_broker_reload_is_for_admin_keys_under_curve(tmp_path) -> None:
    from photocore.curve import keygen

    from anti_sus.cli.serve import admin_keys

    keys = tmp_path / "keys"
    server_pub, server_secret = keygen(keys, "broker")
    admin_pub, admin_secret = keygen(keys, "admin")
    _, user_secret = keygen(keys, "user")
    loads = Loads()
    with broker_running(curve_secret_key=server_secret, admin_keys=admin_keys(admin_pub)) as b, \
            worker(b.backend_endpoints[0], loads) as w1:
        wait_for(lambda: len(b.free) == 1)
        ep = b.frontend_endpoints[0]
        with FilterClient(ep, timeout=30, retries=0, curve_server_key=server_pub, curve_client_keys=user_secret) as c:
            assert c.filter(np.stack([image(150)])).results
            with pytest.raises(AntiSusError) as err:
                c.reload()
            assert err.value.code == "forbidden" and "--admin-allow" in str(err.value)
        assert loads.spans == [] and w1.generation == 1
        with FilterClient(ep, timeout=30, retries=0, curve_server_key=server_pub, curve_client_keys=admin_secret) as c:
            reply = c.reload()
        assert [w["generation"] for w in reply["workers"]] == [2] and w1.generation == 2
