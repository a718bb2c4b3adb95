"""photocore.atomic: readers see the old file or the new one, never half of one."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from photocore import atomic
from photocore.atomic import atomic_open, atomic_write, publish, write_temp


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_temp_dir_and_mode(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "manifest.json"
    atomic_write(target, b"{}", tmp, mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert list(tmp.iterdir()) == []


def test_the_data_is_fsynced_and_the_rename_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write(tmp_path / "x", b"data")
    assert len(synced) == 2  # the file, then its directory


def test_write_temp_then_publish(tmp_path: Path) -> None:
    tmp = tmp_path / "a.tmp"
    write_temp(tmp, b"abc")
    publish(tmp, tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b"abc" and not tmp.exists()


def test_not_durable_replaces_atomically_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """durable=False (derived files such as the gallery page): same atomic replace, no fsync of file or folder."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    target = tmp_path / "index.html"
    target.write_bytes(b"old")
    atomic_write(target, b"new", tmp_path, durable=False)
    assert target.read_bytes() == b"new" and synced == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # no temp file left
    atomic_write(target, b"newer", tmp_path)
    assert target.read_bytes() == b"newer" and len(synced) == 2  # the default: the file and its folder
