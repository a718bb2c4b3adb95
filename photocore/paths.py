"""Default data folders, in one place, so every command agrees on them.

Built model artifacts live in a data folder, ``var/models``, not in the
``models/`` code package they used to share a name (and a folder) with.
:func:`models_dir` keeps reading the old location for a while: when the
default folder has no manifest but ``models/manifest.json`` exists, that
folder is used and one notice says how to move it.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

log = logging.getLogger("photocore.paths")

DEFAULT_MODELS_DIR = "var/models"
"""Where model artifacts are built and read unless ``--models``/``--out`` says otherwise."""

LEGACY_MODELS_DIR = "models"
"""Where they were before: the ``models/`` code package itself (still read, with a notice)."""

MANIFEST = "manifest.json"
"""The model directory's index; the same name as ``anti_sus.modeldir.MANIFEST`` (a test keeps them equal)."""

_noticed: set[Path] = set()


def _artifact_files(directory: Path) -> list[str]:
    """The manifest and the files it lists (plain names only), for the 'move them' hint."""
    files = [MANIFEST]
    try:
        data = json.loads((directory / MANIFEST).read_text("utf-8"))
        entries = data.get("artifacts", {}).values()
        names = sorted({e.get("file") for e in entries if isinstance(e, dict)} - {None})
    except (OSError, ValueError, AttributeError):
        return files
    files += [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]
    return files


def models_dir(path: str | os.PathLike[str] | None = None, *, base: str | os.PathLike[str] | None = None) -> Path:
    """The model directory to use for ``path`` (``None``: the default).

    Any folder other than the default is used as given. The default
    (``var/models``) is used when it has a manifest or when the old location
    has none; otherwise the old ``models/`` folder is used and a notice, logged
    once per folder, says how to move its artifacts. ``base`` is the folder
    relative paths are taken from (default: the working directory).
    """
    p = Path(DEFAULT_MODELS_DIR if path is None else path)
    if p != Path(DEFAULT_MODELS_DIR):
        return p
    root = Path(base) if base is not None else Path()
    new, old = root / DEFAULT_MODELS_DIR, root / LEGACY_MODELS_DIR
    if (new / MANIFEST).is_file() or not (old / MANIFEST).is_file():
        return new if base is not None else p
    if old not in _noticed:
        _noticed.add(old)
        moved = " ".join(shlex.quote(str(old / f)) for f in _artifact_files(old))
        log.warning("model artifacts found in the old location %s/ (the code package), used this time; their home is "
                    "now %s/: mkdir -p %s && mv %s %s/", old, new, shlex.quote(str(new)), moved, shlex.quote(str(new)))
    return old
