"""Procedural photos (no downloads, deterministic by seed) for the emulator's users: bench/ and the tests.

``photo(seed)`` gives a distinct natural-looking image (smooth shading, shapes,
texture): unlike :func:`stack.emulator.images.picture` it has edges and grain, so
perceptual hashes and JPEG sizes behave as on real photos.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _smooth_field(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    small = rng.random((cells, cells, 3)).astype(np.float32) * 255
    img = Image.fromarray(small.astype(np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A distinct RGB image: shaded background, random shapes, fine grain."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = 0.6 * _smooth_field(rng, w, h, 4) + 0.4 * _smooth_field(rng, w, h, 9)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        rw, rh = rng.integers(w // 20, w // 3), rng.integers(h // 20, h // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + rw, y0 + rh), fill=colour)
        else:
            pts = [(int(x0 + rng.integers(-rw, rw)), int(y0 + rng.integers(-rh, rh))) for _ in range(4)]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Encoded bytes of an image (JPEG by default)."""
    out = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(out, fmt, quality=quality)
    else:
        image.save(out, fmt)
    return out.getvalue()


def crop_fraction(image: Image.Image, left: float = 0, top: float = 0, right: float = 0, bottom: float = 0) -> Image.Image:
    """Cut the given fractions of the width/height off each border."""
    w, h = image.size
    return image.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
