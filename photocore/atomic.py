"""Durable atomic file writes: temp file, fsync, rename, fsync of the directory.

A reader sees the old file or the new one, never half of one, and after a
crash the rename is either on disk or not. gallery_bridge's folder target,
nomad's outbox and ``--save-dir``, and anti_sus's model manifest write this way.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["atomic_open", "atomic_write", "fsync_dir", "publish", "write_temp"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
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


def write_temp(tmp: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``tmp`` and fsync it (the rename comes separately, see :func:`publish`)."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Atomically move a fully written temp file into place and make the rename durable."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike[str], *, tmp_dir: str | os.PathLike[str] | None = None,
                mode: int | None = None, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write ``final``'s new content into; published when the block ends without error.

    The temp file lives in ``tmp_dir`` (default: ``final``'s folder; it must be
    on the same filesystem) under a unique name, so concurrent writers never
    share one. It is created with the umask's usual permissions unless ``mode``
    is given. On an error the temp file is removed and ``final`` is untouched.
    ``durable=False``: still atomic for readers, but no fsync of the file or the
    folder, for derived files that are rebuilt after a crash anyway.
    """
    target = Path(final)
    folder = Path(tmp_dir) if tmp_dir is not None else target.parent
    tmp = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if durable:
            publish(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(final: str | os.PathLike[str], data: bytes, tmp_dir: str | os.PathLike[str] | None = None,
                 *, mode: int | None = None, durable: bool = True) -> None:
    """Replace ``final`` with ``data`` atomically and (unless ``durable=False``) durably (see :func:`atomic_open`)."""
    with atomic_open(final, tmp_dir=tmp_dir, mode=mode, durable=durable) as fh:
        fh.write(data)
