"""Procedural images: varied backgrounds for ``models.tiny`` and the synthetic watermark data.

Kinds: linear/radial gradients, smooth value noise ("clouds"), stripes and
checks, random shapes, and crops of the photos that ship inside scikit-image
(when installed). Everything is drawn from one ``numpy.random.Generator`` so a
seed reproduces the set.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Rng = np.random.Generator

# Colour photos shipped with scikit-image (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")


def _color(rng: Rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def gradient(rng: Rng, size: int) -> Image.Image:
    """Linear or radial blend of two colours."""
    a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if rng.random() < 0.5:
        ang = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(ang) + yy * np.sin(ang)
    else:
        cx, cy = rng.uniform(0, 1, 2)
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = a * (1 - t[..., None]) + b * t[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def clouds(rng: Rng, size: int) -> Image.Image:
    """Smooth multi-octave value noise, tinted."""
    acc = np.zeros((size, size), np.float32)
    for octave, weight in ((4, 1.0), (8, 0.5), (16, 0.25), (32, 0.125)):
        grid = rng.random((octave, octave)).astype(np.float32)
        up = Image.fromarray((grid * 255).astype(np.uint8), "L").resize((size, size), Image.Resampling.BICUBIC)
        acc += weight * np.asarray(up, np.float32) / 255.0
    acc = (acc - acc.min()) / max(float(np.ptp(acc)), 1e-6)
    a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    img = a * (1 - acc[..., None]) + b * acc[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def stripes(rng: Rng, size: int) -> Image.Image:
    """Stripes or a checkerboard at a random period and angle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(8, size / 3)
    ang = rng.uniform(0, np.pi)
    u = (xx * np.cos(ang) + yy * np.sin(ang)) / period
    if rng.random() < 0.5:
        t = (np.sin(2 * np.pi * u) + 1) / 2
    else:
        v = (-xx * np.sin(ang) + yy * np.cos(ang)) / period
        t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    img = a * (1 - t[..., None]) + b * t[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def shapes(rng: Rng, size: int) -> Image.Image:
    """Random ellipses, rectangles and polygons over a plain or gradient ground, softened."""
    img = gradient(rng, size) if rng.random() < 0.5 else Image.new("RGB", (size, size), _color(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=_color(rng))
        elif kind == 1:
            draw.rectangle(box, fill=_color(rng))
        else:
            pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=_color(rng))
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2.5))))


@lru_cache(maxsize=1)
def _skimage_photos() -> tuple[np.ndarray, ...]:
    try:
        from skimage import data
    except ImportError:  # scikit-image is optional (models extra); fall back to procedural kinds
        return ()
    out = []
    for name in SKIMAGE_PHOTOS:
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception:  # a sample missing from this scikit-image version or its data cache
            continue
        if arr.ndim == 3 and arr.shape[2] >= 3:
            out.append(np.ascontiguousarray(arr[..., :3].astype(np.uint8)))
    return tuple(out)


def photo(rng: Rng, size: int) -> Image.Image:
    """A random crop of a scikit-image sample photo, flipped and colour-jittered; clouds if none."""
    photos = _skimage_photos()
    if not photos:
        return clouds(rng, size)
    arr = photos[int(rng.integers(len(photos)))]
    h, w = arr.shape[:2]
    frac = rng.uniform(0.35, 1.0)
    ch, cw = max(16, int(h * frac)), max(16, int(w * frac * rng.uniform(0.7, 1.3)))
    cw = min(cw, w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = arr[y:y + ch, x:x + cw].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * rng.uniform(0.7, 1.3, 3) + rng.uniform(-25, 25, 3)
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.Resampling.BICUBIC)


KINDS: dict[str, Callable[[Rng, int], Image.Image]] = {
    "gradient": gradient,
    "clouds": clouds,
    "stripes": stripes,
    "shapes": shapes,
    "photo": photo,
}


def background(rng: Rng, size: int = 512, kinds: tuple[str, ...] = tuple(KINDS)) -> Image.Image:
    """One random background of a random kind."""
    return KINDS[kinds[int(rng.integers(len(kinds)))]](rng, size)


def backgrounds(n: int, seed: int = 0, size: int = 512, kinds: tuple[str, ...] = tuple(KINDS)) -> list[Image.Image]:
    """``n`` varied backgrounds, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [background(rng, size, kinds) for _ in range(n)]
