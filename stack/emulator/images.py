"""Deterministic test images and hostile payloads, generated on demand and cached.

Pictures are smooth colour fields (a few random colours bicubically upscaled),
so they encode quickly, compress like photos and are the same bytes for the
same (size, format, seed) every run.
"""
from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=64)
def picture(width: int, height: int, fmt: str = "jpeg", seed: int = 0, orientation: int = 1, mode: str = "RGB") -> bytes:
    """Encoded image bytes: ``fmt`` in jpeg/png/webp/gif; ``orientation`` is the EXIF tag (jpeg)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 200 + 2), max(2, width // 200 + 2), 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    if mode != "RGB":
        im = im.convert(mode)
    out = io.BytesIO()
    if fmt == "jpeg":
        kw = {}
        if orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kw["exif"] = exif.tobytes()
        im.save(out, "JPEG", quality=85, **kw)
    elif fmt == "png":
        im.save(out, "PNG", compress_level=1)
    elif fmt == "webp":
        im.save(out, "WEBP", quality=80)
    elif fmt == "gif":
        frames = [im.convert("P"), im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
        frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        raise ValueError(f"unknown format {fmt}")
    return out.getvalue()


def truncated_jpeg(width: int = 1600, height: int = 1200, seed: int = 7) -> bytes:
    """The first half of a valid JPEG: right magic bytes and header, missing scan data."""
    data = picture(width, height, "jpeg", seed)
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.lru_cache(maxsize=4)
def pixel_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` RGB pixels (tens of GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # A few kB of zeros: decoding would inflate it row after row until memory runs out.
    idat = zlib.compress(b"\x00" * (1 << 20), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Not an image</title></head><body>hello</body></html>\n"
