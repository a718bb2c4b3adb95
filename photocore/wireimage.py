"""The wire image format: any decoded picture -> ``uint8[512, 512, 3]`` RGB, squashed.

This is the client half of the preprocessing contract (docs/design.md §3): nomad,
``models.fit_gmm`` and anti_sus's offline tools turn images into this format
before sending or scoring; the server's model-specific steps live in
``anti_sus.preprocess``. Squash, never crop: watermarks live in the corners.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from PIL import Image

WIRE_SIZE = 512
"""Side of the square uint8 images clients send (upstream's 512x512x3 format)."""

RESAMPLE = Image.Resampling.BICUBIC
"""One resampling filter for every resize in the contract (CLIP was trained with bicubic)."""


_INT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_STRIP_PIXELS = 1 << 20
"""Pixels converted per step when scaling 16/32-bit/float greyscale, so temporaries stay ~10 MB at any image size."""


def _strips(image: Image.Image) -> Iterator[tuple[int, int]]:
    w, h = image.size
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        yield top, min(h, top + rows)


def _extrema(image: Image.Image) -> tuple[float, float]:
    try:
        lo, hi = image.getextrema()
        return float(lo), float(hi)
    except ValueError:  # Pillow has no extrema for some modes (I;16B): scan the strips instead
        lo, hi = np.inf, -np.inf
        for y0, y1 in _strips(image):
            strip = np.asarray(image.crop((0, y0, image.width, y1)))
            lo, hi = min(lo, float(strip.min())), max(hi, float(strip.max()))
        return lo, hi


def _grey_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L``, one strip at a time.

    The result costs 1 byte per pixel on top of the input; the scaling happens
    on strips of about a megapixel (a whole-image float64 copy would cost 8-24
    bytes per pixel: a 6000x6500 16-bit PNG of 75 KB took 1 GB). Values are the
    same as the whole-image formula: 16-bit scales to 8 bits instead of clipping
    to white, float images stretch [min(0, lo), max(1, hi)] to [0, 255].
    """
    w, h = image.size
    out = np.empty((h, w), dtype=np.uint8)
    lo, hi = _extrema(image) if w and h else (0, 0)
    if image.mode in _INT_GREY:
        top = 65535.0 if hi > 255 else 255.0
        # One lookup table for every 16-bit value: exact and cheap per pixel.
        lut = np.clip(np.arange(65536, dtype=np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        for y0, y1 in _strips(image):
            strip = np.asarray(image.crop((0, y0, w, y1)))
            if strip.dtype.itemsize > 2 or strip.dtype.kind != "u":  # mode I is int32: clip into the table
                strip = np.clip(strip, 0, 65535)
            out[y0:y1] = lut[strip]
    else:  # "F"
        lo, hi = min(float(lo), 0.0), max(float(hi), 1.0)
        span = max(hi - lo, 1e-12)
        for y0, y1 in _strips(image):
            strip = np.asarray(image.crop((0, y0, w, y1)), dtype=np.float64)
            out[y0:y1] = np.clip((strip - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB; transparency is composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in _INT_GREY or image.mode == "F":
        return _grey_to_l(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, (0, 0), rgba)  # an RGBA mask uses its alpha band, without a separate copy of it
        return canvas
    return image.convert("RGB")


def to_wire(
    image: Image.Image, size: int = WIRE_SIZE, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """A decoded image -> ``uint8[size, size, 3]`` RGB, squashed (the wire format).

    Greyscale stays one byte per pixel until it has been resized (squashing then
    copying the grey into three channels gives the same pixels as the other way
    round, at a quarter of the memory: Pillow keeps RGB as 4 bytes per pixel).
    ``box`` is the source region in ``image``'s pixels (Pillow's ``resize`` box,
    fractions allowed): a DCT-scaled JPEG draft of a 3001-pixel-wide photo is
    751 pixels wide but holds only 750.25 pixels of picture, and squashing the
    whole 751 would shift the right edge by half a wire pixel.
    """
    if image.mode in _INT_GREY or image.mode == "F":
        small = _grey_to_l(image)
    elif image.mode == "L":
        small = image
    else:
        small = to_rgb(image)
    if small.size != (size, size) or box is not None:
        small = small.resize((size, size), RESAMPLE, box=box)
    return np.asarray(small.convert("RGB"), dtype=np.uint8).copy()


def stack_wire(images: Sequence[Image.Image], size: int = WIRE_SIZE) -> np.ndarray:
    """Several decoded images -> one contiguous ``uint8[N, size, size, 3]`` batch."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = to_wire(im, size)
    return out
