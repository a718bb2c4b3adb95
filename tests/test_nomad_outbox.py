"""The outbox: per-item attempts and backoff, dead letters, retry-dead, crash-safe delivery, orphan sweep."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from photocore.protocol import error_reply, ok_reply, parse_header
from nomad.cli import main
from nomad.delivery import GalleryDeliverer, drain_outbox, ingest_meta
from nomad.sources.base import ImageRef
from nomad.store import Store
from tests.nomad_deliverers import ScriptedDeliverer

pytestmark = pytest.mark.timeout(120)

REFUSED = "reddit:t3_1:0"


@pytest.fixture(autouse=True)
def _keep_log_handlers() -> Iterator[None]:
    """main() installs its own stderr handler; put the test's back so later logging has a live stream."""
    import logging

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def fill(store: Store, n: int, *, features: bool = False) -> list[str]:
    keys = []
    for i in range(n):
        ref = ImageRef(f"reddit:t3_{i}:0", f"https://i.redd.it/{i}.jpg")
        store.add_image(ref, f"t3_{i}")
        sp = store.spool_path(ref.key, ".jpg")
        sp.write_bytes(b"\xff\xd8\xff" + bytes([i]) * 100)
        feats = np.full(4, 0.5, np.float32) if features else None
        store.accept(ref.key, sp, ingest_meta(ref, 2000, 1500, "jpeg", {"gmm": 1.0, "watermark": None}), feats, {"gmm": 1.0})
        keys.append(ref.key)
    return keys


class FakeGallery:
    """A gallery_bridge stand-in on loopback: answers ``internal`` (retryable, like scenery answering
    "fail") for the keys in ``refuse``, ``added`` for the others. Bounded: stops with the test."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.seen: list[str] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            header = parse_header(frames[0])
            key = str(header.get("key"))
            self.seen.append(key)
            if key in self.refuse:
                self.sock.send(error_reply("internal", "scenery answered fail", header.get("id")))
            else:
                self.sock.send(ok_reply(header.get("id"), status="added", gallery_id=len(self.seen)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture()
def gallery() -> Iterator[FakeGallery]:
    g = FakeGallery({REFUSED})
    yield g
    g.close()


def test_a_key_refused_forever_ends_in_dead_letters_and_the_others_are_delivered(
    tmp_path: Path, gallery: FakeGallery, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    with Store(state) as s:
        fill(s, 4)
        deliverer = GalleryDeliverer(gallery.endpoint, timeout=5, retries=0)
        try:
            # Real (short) sleeps: the refused item backs off on its own while the others go through.
            delivered, left = drain_outbox(s, deliverer, sleep=lambda x: bool(time.sleep(x)), wait=True,
                                           max_attempts=3, retry_base=0.01, backoff_max=0.05)
        finally:
            deliverer.close()
        assert (delivered, left) == (3, 0)
        assert gallery.seen.count(REFUSED) == 3  # attempts counted: 1, 2, 3, then dead
        (dead,) = s.dead_letters()
        assert dead["key"] == REFUSED and dead["attempts"] == 3 and "ingest_internal" in dead["reason"]
        assert "scenery answered fail" in dead["reason"]
        assert s.image_state(REFUSED)[0] == "dead_letter"
        assert {k for k in gallery.seen if k != REFUSED} == {"reddit:t3_0:0", "reddit:t3_2:0", "reddit:t3_3:0"}

    # nomad stats lists it, as text and JSON.
    assert main(["stats", "--state-dir", str(state), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["key"] for d in data["dead_letters"]] == [REFUSED] and data["dead_letters"][0]["attempts"] == 3
    assert main(["stats", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "dead_letters     1" in out and REFUSED in out and "ingest_internal" in out

    # retry-dead with an unknown key: clear error; with the key: back into the outbox, attempts reset.
    assert main(["retry-dead", "--state-dir", str(state), "--key", "reddit:t3_9:0"]) == 2
    assert "not a dead letter" in capsys.readouterr().err
    assert main(["retry-dead", "--state-dir", str(state), "--key", REFUSED]) == 0
    assert "requeued 1" in capsys.readouterr().out
    with Store(state) as s:
        (item,) = s.outbox()
        assert item.key == REFUSED and item.attempts == 0 and item.path.is_file()
        assert s.dead_letters() == [] and s.image_state(REFUSED)[0] == "accepted"
        gallery.refuse.clear()  # the gallery takes it now
        deliverer = GalleryDeliverer(gallery.endpoint, timeout=5, retries=0)
        try:
            assert drain_outbox(s, deliverer, sleep=lambda x: False, wait=True) == (1, 0)
        finally:
            deliverer.close()
        assert s.image_state(REFUSED)[0] == "delivered"


def test_retry_dead_without_key_requeues_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Store(tmp_path) as s:
        keys = fill(s, 3)
        for k in keys[:2]:
            s.dead_letter(k, "ingest_bad_meta: no")
        assert len(s.dead_letters()) == 2 and s.outbox_size() == 1
    assert main(["retry-dead", "--state-dir", str(tmp_path)]) == 0
    assert "requeued 2" in capsys.readouterr().out
    with Store(tmp_path) as s:
        assert s.outbox_size() == 3 and s.dead_letters() == []


def test_refused_item_waits_for_its_own_backoff(tmp_path: Path) -> None:
    now = [1000.0]
    with Store(tmp_path) as s:
        fill(s, 2)
        d = ScriptedDeliverer(defer={"reddit:t3_0:0"})
        assert drain_outbox(s, d, sleep=lambda x: False, wait=False, clock=lambda: now[0], backoff_max=60) == (1, 1)
        (item,) = s.outbox()
        assert item.attempts == 1 and 1000.0 < item.next_attempt_at <= 1001.0
        # Not due yet: the next pass does not try it.
        drain_outbox(s, d, sleep=lambda x: False, wait=False, clock=lambda: now[0])
        assert s.outbox()[0].attempts == 1
        now[0] = 1001.0
        drain_outbox(s, d, sleep=lambda x: False, wait=False, clock=lambda: now[0], backoff_max=60)
        item = s.outbox()[0]
        assert item.attempts == 2 and item.next_attempt_at - now[0] > 1.0  # exponential: 1-2 s after the second
        for _ in range(20):  # the delay is capped
            now[0] = s.outbox()[0].next_attempt_at
            drain_outbox(s, d, sleep=lambda x: False, wait=False, clock=lambda: now[0], backoff_max=5, max_attempts=100)
        assert s.outbox()[0].next_attempt_at - now[0] <= 5.0


def test_destination_down_counts_no_attempts(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        fill(s, 2)
        down = ScriptedDeliverer(down=True)
        for _ in range(20):
            assert drain_outbox(s, down, sleep=lambda x: False, wait=False, max_attempts=2) == (0, 2)
        assert [i.attempts for i in s.outbox()] == [0, 0] and s.dead_letters() == []


def test_delivered_is_crash_safe_and_orphans_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path) as s:
        fill(s, 3, features=True)
        s.dead_letter("reddit:t3_2:0", "ingest_bad_meta: no")
        assert len(list(s.outbox_dir.iterdir())) == 6  # image + features each
        # Crash after the row is gone but before the files are: simulated by unlink failing.
        real_unlink = Path.unlink

        def crash(self: Path, missing_ok: bool = False) -> None:
            if self.parent == s.outbox_dir:
                raise KeyboardInterrupt("power cut")
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", crash)
        with pytest.raises(KeyboardInterrupt):
            s.delivered("reddit:t3_0:0", "added", 1)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        # The row went first: never a row whose file is missing.
        assert [i.key for i in s.outbox()] == ["reddit:t3_1:0"] and s.image_state("reddit:t3_0:0")[0] == "delivered"
        (s.outbox_dir / "stray.jpg.tmp").write_bytes(b"x")  # a half-written features file, say
        assert s.sweep_outbox() == 3
        names = sorted(p.name for p in s.outbox_dir.iterdir())
        kept = {i.path.name for i in s.outbox()} | {i.features.name for i in s.outbox() if i.features}
        assert len(names) == 4 and kept <= set(names)  # the live item and the dead letter keep theirs
        for it in s.outbox():
            assert it.path.is_file() and it.read_features() is not None


def test_a_failed_transaction_keeps_row_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    with Store(tmp_path) as s:
        fill(s, 1)
        real_tx = s._tx

        class Boom(sqlite3.OperationalError):
            pass

        def failing_tx():  # type: ignore[no-untyped-def]
            raise Boom("disk I/O error")

        monkeypatch.setattr(s, "_tx", failing_tx)
        with pytest.raises(Boom):
            s.delivered("reddit:t3_0:0", "added", 1)
        monkeypatch.setattr(s, "_tx", real_tx)
        (item,) = s.outbox()
        assert item.path.is_file()  # still redeliverable


def test_old_state_db_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "nomad.sqlite3")
    db.execute("CREATE TABLE outbox (key TEXT PRIMARY KEY, path TEXT NOT NULL, features TEXT, meta TEXT NOT NULL, "
               "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, created REAL NOT NULL)")
    db.execute("INSERT INTO outbox VALUES ('k', 'k.jpg', NULL, '{}', 0, NULL, 1.0)")
    db.commit()
    db.close()
    with Store(tmp_path) as s:
        (item,) = s.outbox_due(time.time())
        assert item.key == "k" and item.next_attempt_at == 0.0
