"""Safe decoding of downloaded images into the wire format (``photocore.wireimage.to_wire``).

The bytes come from strangers, so Pillow is only allowed the formats nomad
accepts, the pixel count is checked from the header *before* any pixel is
decoded (a 100000x100000 PNG of a few kB must cost nothing), truncated files are
errors (``LOAD_TRUNCATED_IMAGES`` stays off), and large JPEGs are decoded in
draft mode at a reduced scale that is still at least ``DRAFT_MARGIN`` times the
wire size on both sides.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from photocore.wireimage import WIRE_SIZE, to_wire

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000
DRAFT_MARGIN = 1.5
"""Both sides of a draft (DCT-scaled) decode stay >= this times the wire size.

1.5, not 2: with 2, a 3000x2000 photo (short side < 1024) was decoded at full
size and then squashed, 90 ms instead of 34 ms, for a wire image that differs
by 0.17 grey levels on average (bench/e2e.py, tests/test_nomad_images.py).
"""
_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageError(Exception):
    """An image could not be used; ``reason`` is a stats code.

    Codes: "bomb" (too many pixels), "truncated", "bad_format" (not an allowed
    format), "animated" (GIF/PNG/WebP with frames; an MPO phone photo is not
    animated: its first frame is used), "decode_error".
    """

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


@dataclass
class Decoded:
    """A decoded image: the wire array and the real size/format of the original."""

    wire: np.ndarray
    """``uint8[wire_size, wire_size, 3]`` from ``photocore.wireimage.to_wire``."""
    width: int
    """Full-resolution width after EXIF orientation (not the draft-mode size)."""
    height: int
    format: str
    """"jpeg", "png" or "webp"."""


def _open(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exc:
        raise ImageError("bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("bad_format", f"not one of {', '.join(formats)}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(_classify(exc), f"cannot read header: {exc}") from exc


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError) or "premature end" in text:
        return "truncated"
    if "decompressed data too large" in text or "too large" in text:
        return "bomb"
    return "decode_error"


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a malformed EXIF block is not worth rejecting the image for
        orientation = None
    return (h, w) if orientation in _SWAPPED_ORIENTATIONS else (w, h)


def _check(im: Image.Image, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError("decode_error", f"empty image {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")


def _format_name(im: Image.Image) -> str:
    """The format as nomad names it: an MPO (multi-picture JPEG) is a "jpeg"."""
    return "jpeg" if im.format == "MPO" else str(im.format).lower()


def _animated(im: Image.Image) -> bool:
    """A real animation (GIF/PNG/WebP frames).

    Phone photos are often MPO: a JPEG whose extra frames are a depth map or a
    preview, not an animation. Pillow opens it with the JPEG plugin and calls it
    animated; its first frame is the photo (gallery_bridge reads it the same way).
    """
    return im.format != "MPO" and bool(getattr(im, "is_animated", False))


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] = DEFAULT_FORMATS) -> tuple[int, int, str]:
    """``(width, height, format)`` from the header only (cheap), EXIF orientation applied.

    Raises ImageError("bomb") above ``max_pixels`` and "bad_format" for other formats.
    """
    with _open(data, formats) as im:
        _check(im, max_pixels)
        w, h = _oriented_size(im)
        return w, h, _format_name(im)


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    wire_size: int = WIRE_SIZE,
    reject_animated: bool = True,
) -> Decoded:
    """Decode ``data`` to the wire format; raises ImageError with a stats code on any problem."""
    with _open(data, formats) as im:
        _check(im, max_pixels)
        fmt = _format_name(im)
        if reject_animated and _animated(im):
            raise ImageError("animated", f"{fmt} with {getattr(im, 'n_frames', '?')} frames")
        if im.format == "MPO":
            im.seek(0)  # the photo; later frames are depth maps or previews
        width, height = _oriented_size(im)
        if im.format == "JPEG":
            # DCT scaling: decode at 1/2, 1/4 or 1/8 while both sides stay >= 1.5x the
            # wire size, so the final bicubic resize still has enough detail.
            side = int(DRAFT_MARGIN * wire_size)
            im.draft("RGB", (side, side))
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageError("bomb", str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise ImageError(_classify(exc), str(exc)) from exc
        try:
            upright = ImageOps.exif_transpose(im) or im
            wire = to_wire(upright, wire_size)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(_classify(exc), str(exc)) from exc
        return Decoded(wire=wire, width=width, height=height, format=fmt)
