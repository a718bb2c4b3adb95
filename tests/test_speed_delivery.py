"""Background delivery (issue 14, end to end): the gallery ingests one batch while the crawler filters the next,
with the outbox's guarantees kept (nothing lost, nothing delivered twice, stop-aware, redelivery, dead letters)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anti_sus.client import FilterResult
from nomad.delivery.outbox import DeliveryWorker, drain_outbox
from nomad.store import OutboxItem, Store
from stack.emulator import Emulator
from tests.nomad_deliverers import ScriptedDeliverer
from tests.test_nomad_crawler import FakeFilter, make
from tests.test_nomad_crawler_delivery import outbox_with

pytestmark = pytest.mark.timeout(180)


class Recording(ScriptedDeliverer):
    """A ScriptedDeliverer that also says which thread delivered and signals each delivery."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.threads: set[str] = set()
        self.any = threading.Event()

    def deliver(self, it: OutboxItem) -> tuple[str, Any]:
        self.threads.add(threading.current_thread().name)
        out = super().deliver(it)
        self.any.set()
        return out


class WaitingFilter(FakeFilter):
    """Every image good; from the second batch on, waits (bounded) until the gallery took something,
    and records how many images had been delivered when each batch was filtered."""

    def __init__(self, deliverer: Recording, patience: float) -> None:
        super().__init__()
        self.deliverer = deliverer
        self.patience = patience
        self.seen: list[int] = []

    def filter(self, images: np.ndarray, **kw: Any) -> FilterResult:
        if self.batches:
            self.deliverer.any.wait(self.patience)
        self.seen.append(len(self.deliverer.got))
        return super().filter(images, **kw)


@pytest.fixture(scope="module")
def emu() -> Any:
    with Emulator() as e:
        yield e


def crawl(emu: Emulator, tmp: Path, *extra: str, patience: float) -> tuple[Any, Recording, WaitingFilter]:
    deliverer = Recording()
    fake = WaitingFilter(deliverer, patience)
    crawler = make(emu, tmp, "--gmm-threshold", "-5.5", "--batch-size", "2", *extra, fake=fake)
    crawler.deliverer = deliverer
    try:
        stats = crawler.cycle(final=True)
    finally:
        crawler.shutdown()
        crawler.store.close()
    return stats, deliverer, fake


def test_batches_are_delivered_while_the_next_ones_are_filtered(emu: Emulator, tmp_path: Path) -> None:
    stats, deliverer, fake = crawl(emu, tmp_path, patience=10.0)  # the default
    assert len(fake.batches) >= 2
    # The gallery had images of the first batch before a later batch went to anti_sus: the two overlapped.
    assert max(fake.seen[1:]) >= 1, fake.seen
    assert "nomad-deliver" in deliverer.threads
    # Nothing lost, nothing twice: every accepted image exactly once, and the outbox is empty.
    assert len(deliverer.got) == len(set(deliverer.got)) == stats.accepted == stats.delivered == sum(fake.batches)
    assert stats.outbox == 0


def test_without_background_delivery_the_gallery_waits_for_the_end_of_the_cycle(emu: Emulator, tmp_path: Path) -> None:
    stats, deliverer, fake = crawl(emu, tmp_path, "--no-background-delivery", patience=0.2)
    assert len(fake.batches) >= 2 and max(fake.seen) == 0
    assert deliverer.threads == {threading.current_thread().name}
    assert len(deliverer.got) == len(set(deliverer.got)) == stats.accepted == stats.delivered


def drain_pass(store: Store, deliverer: Any, delivered: list[int]) -> Any:
    def drain(halt: Any) -> None:
        n, _ = drain_outbox(store, deliverer, sleep=lambda s: False, wait=False, halt=halt, max_attempts=2, retry_base=0.01)
        delivered.append(n)
    return drain


def test_the_worker_redelivers_what_an_earlier_run_left_without_being_kicked(tmp_path: Path) -> None:
    with outbox_with(tmp_path, 3) as store:
        deliverer, counts = Recording(), []
        worker = DeliveryWorker(drain_pass(store, deliverer, counts), threading.Event(), idle=30.0).start()
        assert deliverer.any.wait(10)
        deadline = time.monotonic() + 10
        while store.outbox_size() and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.finish()
        assert sorted(deliverer.got) == [f"reddit:t3_{i}:0" for i in range(3)] and store.outbox_size() == 0


def test_a_stop_ends_the_pass_between_two_items_and_the_rest_is_delivered_later(tmp_path: Path) -> None:
    stop = threading.Event()

    class StopsAfterOne(Recording):
        def deliver(self, it: OutboxItem) -> tuple[str, Any]:
            out = super().deliver(it)
            stop.set()  # e.g. SIGTERM while the first image was being ingested
            return out

    with outbox_with(tmp_path, 4) as store:
        first, counts = StopsAfterOne(), []
        worker = DeliveryWorker(drain_pass(store, first, counts), stop, idle=0.05).start()
        assert first.any.wait(10)
        worker.finish()
        assert len(first.got) == 1 and store.outbox_size() == 3  # the image in flight finished; the rest waits on disk
        second = Recording()
        assert drain_outbox(store, second, sleep=lambda s: False, wait=True) == (3, 0)
        assert sorted(first.got + second.got) == [f"reddit:t3_{i}:0" for i in range(4)]  # each once


def test_dead_letters_still_happen_in_the_background(tmp_path: Path) -> None:
    with outbox_with(tmp_path, 3) as store:
        deliverer, counts = Recording(refuse={"reddit:t3_1:0"}), []
        worker = DeliveryWorker(drain_pass(store, deliverer, counts), threading.Event(), idle=0.05).start()
        deadline = time.monotonic() + 10
        while store.outbox_size() and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.finish()
        assert sorted(deliverer.got) == ["reddit:t3_0:0", "reddit:t3_2:0"]
        (dead,) = store.dead_letters()
        assert dead["key"] == "reddit:t3_1:0"


def test_an_error_in_the_background_is_raised_in_the_crawler_thread(tmp_path: Path) -> None:
    def broken(_halt: Any) -> None:
        raise RuntimeError("database is locked")

    worker = DeliveryWorker(broken, threading.Event(), idle=0.05).start()
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="database is locked"):
        worker.finish()
