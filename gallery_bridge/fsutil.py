"""Durable file writes: temp file, fsync, rename, fsync of the directory."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(tmp: Path, data: bytes) -> None:
    """Write ``data`` to ``tmp`` and fsync it (the rename comes separately)."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp file into place and make it durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write(final: Path, data: bytes, tmp_dir: Path) -> None:
    """Temp file in ``tmp_dir`` (same filesystem), fsync, rename onto ``final``."""
    tmp = tmp_dir / f"{final.name}.{os.getpid()}.tmp"
    write_temp(tmp, data)
    publish(tmp, final)
