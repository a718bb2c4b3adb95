"""kill -9 at each point of an ingest, then redelivery: exactly one complete entry, no orphans."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests import gallery_helpers as T
from gallery_bridge.client import IngestClient
from gallery_bridge.ingest import CRASH_POINTS
from tests.gallery_process import free_port, send_and_wait_for_death, start_serve

REPO = Path(__file__).resolve().parent.parent


def _ingest_and_wait_for_death(proc: subprocess.Popen, port: int, key: str, data: bytes) -> int:
    """Send one ingest (no reply will come) and wait for the process to kill itself."""
    return send_and_wait_for_death(proc, port, {"op": "ingest", "key": key, "meta": {"title": "crash"}}, data)


def _state(root: Path) -> tuple[list[tuple[int, str]], list[str]]:
    db = sqlite3.connect(root / "catalogue.sqlite")
    try:
        entries = db.execute("SELECT id, state FROM entries ORDER BY id").fetchall()
    finally:
        db.close()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and not p.name.startswith("catalogue.sqlite"))
    return entries, files


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_ingest_then_redelivery(tmp_path: Path, point: str) -> None:
    root = tmp_path / "gallery"
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    data = T.encode(T.photo(40, (1000, 700)))
    proc = start_serve(root, port, crash_at=point)
    try:
        assert _ingest_and_wait_for_death(proc, port, "reddit:t3_crash:0", data) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = start_serve(root, port)
    try:
        with IngestClient(endpoint, timeout=20.0, retries=0) as client:
            reply = client.ingest("reddit:t3_crash:0", {"title": "crash"}, data)
            # Before the commit nothing survived: the redelivery adds it. After the
            # commit the entry is complete: the redelivery finds it by key.
            expected = "duplicate" if point in ("committed", "page") else "added"
            assert reply.status == expected
            gid = reply.gallery_id
            assert client.ingest("reddit:t3_crash:0", {}, data).gallery_id == gid
            later = client.ingest("reddit:t3_other:0", {}, T.encode(T.photo(41)))
            assert later.status == "added"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # graceful shutdown
    entries, files = _state(root)
    assert entries == [(gid, "complete"), (later.gallery_id, "complete")]
    assert files == sorted([
        "index.html", f"images/{gid}.jpg", f"thumbs/{gid}.jpg",
        f"images/{later.gallery_id}.jpg", f"thumbs/{later.gallery_id}.jpg",
    ])
    assert (root / "images" / f"{gid}.jpg").read_bytes() == data
    page = (root / "index.html").read_text()
    assert f"images/{gid}.jpg" in page and f"thumbs/{later.gallery_id}.jpg" in page


def test_crash_before_the_commit_leaves_nothing_visible(tmp_path: Path) -> None:
    """Right after the kill (before any restart), readers see no entry and the page has none."""
    root = tmp_path / "gallery"
    port = free_port()
    proc = start_serve(root, port, crash_at="thumb")
    try:
        assert _ingest_and_wait_for_death(proc, port, "k", T.encode(T.photo(42))) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    entries, files = _state(root)
    assert [state for _, state in entries] == ["pending"]
    page = (root / "index.html").read_text()
    assert "images/" not in page  # the half-written entry never reached the page
    # The recovery pass (run by every command that writes: serve, import, rebuild) removes it.
    listed = subprocess.run([sys.executable, "-m", "gallery_bridge", "list", "--json", "--target", f"folder:{root}"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout == ""  # list reads only complete entries, changes nothing
    assert [state for _, state in _state(root)[0]] == ["pending"]
    out = subprocess.run([sys.executable, "-m", "gallery_bridge", "rebuild", "--target", f"folder:{root}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    entries, files = _state(root)
    assert entries == [] and files == ["index.html"]
