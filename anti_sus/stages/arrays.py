"""Reading a stage's plain-array file (``.npz``) safely: never unpickles, names what is wrong."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def load_npz(path: str | os.PathLike[str], keys: Sequence[str], error: type[Exception], what: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the ``.npz`` at ``path``; ``error`` (one line) when it is unreadable or lacks one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = set(keys) - set(z.files)
            if missing:
                raise error(f"{path}: missing keys {sorted(missing)}")
            return {k: z[k] for k in keys}
    except (OSError, ValueError) as exc:  # object arrays (pickle refused), truncated zip, not a zip
        if isinstance(exc, error):
            raise
        raise error(f"{path}: not a readable {what} ({exc})") from None
