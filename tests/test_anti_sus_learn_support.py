"""Shared helpers for the learn/probe tests (no tests here): a torch-free model dir and separable labelled images.

The tiny CLIP has random weights, so its features mean nothing; two image
families that differ in every way the encoder can see (warm smooth gradients
vs. cool high-contrast checkerboards) still land far apart in its feature space,
which is all a probe test needs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 96


def warm_gradient(rng: np.random.Generator) -> np.ndarray:
    """A smooth warm-coloured horizontal gradient ("good" family)."""
    xx = np.mgrid[0:SIDE, 0:SIDE][1]
    base = rng.uniform([150, 60, 0], [255, 140, 60])
    return (base[None, None, :] * (0.6 + 0.4 * xx[..., None] / SIDE)).clip(0, 255).astype(np.uint8)


def cool_checkerboard(rng: np.random.Generator) -> np.ndarray:
    """A high-contrast blue/white checkerboard ("bad" family)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    k = int(rng.integers(2, 6))
    board = ((xx // k + yy // k) % 2)[..., None]
    dark, light = rng.uniform([0, 0, 120], [60, 120, 255]), rng.uniform([200, 200, 200], [255, 255, 255])
    return (board * dark + (1 - board) * light).astype(np.uint8)


def make_folders(root: Path, n_good: int, n_bad: int, seed: int = 0) -> Path:
    """``root/good`` (PNG gradients) and ``root/bad`` (JPEG checkerboards); returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "good").mkdir(parents=True, exist_ok=True)
    (root / "bad").mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        Image.fromarray(warm_gradient(rng)).save(root / "good" / f"g{i:03d}.png")
    for i in range(n_bad):
        Image.fromarray(cool_checkerboard(rng)).save(root / "bad" / f"b{i:03d}.jpg", quality=92)
    return root


def wire_batch(folder: Path, limit: int) -> np.ndarray:
    """The first ``limit`` images of ``folder`` in the wire format (uint8[n, 512, 512, 3])."""
    from anti_sus.preprocess import load_image, to_wire

    return np.stack([to_wire(load_image(str(p))) for p in sorted(folder.iterdir())[:limit]])


def separable_npz(path: Path, dim: int, n_good: int, n_bad: int, seed: int = 0, **extra: np.ndarray) -> Path:
    """A labels.npz whose good and bad features sit around opposite directions (in the export's layout)."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=dim)
    axis /= np.linalg.norm(axis)
    good = axis + 0.3 * rng.normal(size=(n_good, dim))
    bad = -axis + 0.3 * rng.normal(size=(n_bad, dim))
    feats = np.concatenate([good, bad]).astype(np.float32)
    labels = np.array([1] * n_good + [0] * n_bad, dtype=np.int8)
    keys = np.array([f"g{i}" for i in range(n_good + n_bad)])
    np.savez(path, features=feats, labels=labels, keys=keys, **extra)
    return path


def fresh_copy(src: Path, dst: Path) -> Path:
    """A private copy of a model directory (learn writes into it)."""
    shutil.copytree(src, dst)
    return dst
