"""Safe decoding of downloaded images into the wire format (``photocore.wireimage.to_wire``).

The bytes come from strangers, so Pillow is only allowed the formats nomad
accepts, the pixel count is checked from the header *before* any pixel is
decoded (a 100000x100000 PNG of a few kB must cost nothing), truncated files are
errors (``LOAD_TRUNCATED_IMAGES`` stays off), and large JPEGs are decoded in
draft mode: libjpeg scales the DCT by 1/2, 1/4 or 1/8 (``draft_scale``), which
skips most of the inverse DCT, the colour conversion and the resize work.

Order of the steps for speed: the (draft) decode is squashed to the wire
first, over the draft's exact extent, and the EXIF orientation is applied to the
512x512 result (a square: rotating it after the resize gives the picture of
rotating before, within one grey level of rounding), so no full-size rotated or
copied intermediate is ever made.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from photocore.wireimage import WIRE_SIZE, to_wire

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000
DRAFT_MIN_FILL = 0.95
"""A JPEG is DCT-scaled by the largest 1/k (k = 8, 4, 2) whose short side is still >= this times the wire size.

So a draft may be up to 5% *under* the wire on its short side (a tiny bicubic
upscale on that axis): a 3000x2000 photo decodes at 1/4, 750x500, instead of
1/2, 1500x1000, and a 4000x3000 one at 1000x750 instead of 2000x1500.

Why this is acceptable (measured with ``python -m bench.nomad`` and a grid of
sizes, docs/nomad.md "decoding"): the difference from the reference (full
decode, exif_transpose, to_wire) is of the order of what two equally good
resize filters differ by. On synthetic worst cases (1/f "natural image" spectra
with hard-edged rectangles, JPEG q90) the wire differs by 0.6-1.9 grey levels
on average and <= 10 at the 99th percentile, 1600x1200 to 6000x4000,
EXIF-rotated included (Lanczos instead of bicubic on the same full decode:
0.85 mean, 4 p99); after anti_sus's resize to CLIP's 224 px input, <= 0.5 mean
and <= 2 p99. Photo-like colour fields with film grain: <= 1.2 mean, <= 4 p99.
The watermark model reads the 512 px wire itself, and is trained with blur and
JPEG artefacts well beyond this. At 2x zoom, 3000x2000 wire crops of the
reference, the old 1/2 path and this 1/4 one look the same; the 1/4 one is 3%
softer on its upscaled axis, the 1/2 one 4% sharper (DCT aliasing).
The previous rule (both sides >= 1.5x the wire) kept 3000x2000 at 1/2, about
twice the CPU (bench.nomad: 23.9 vs 11.9 ms on the e2e benchmark's photos).
Below 0.95 the upscale starts to show (1/8 of 4000x3000, 500x375: 2.8 mean,
16 p99 on the worst cases). Independently of the rule, a draft is squashed over
its exact extent (``to_wire``'s box): a 2250-row photo at 1/4 has 562.5 rows of
picture in 563 decoded ones, and squashing all 563 moved hard edges by up to
half a wire pixel (2.3 mean, 15 p99 instead of 1.2 / 6).
"""
_ORIENTATION_TAG = 0x0112
SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


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


def _open(data: bytes | Path, formats: tuple[str, ...]) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data, formats=list(formats))
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


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that shows the picture upright (as ``ImageOps.exif_transpose``)."""


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, 1 (upright) when absent or unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block is not worth rejecting the image for
        return 1
    return value if isinstance(value, int) else 1


def _oriented_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if orientation in SWAPPED_ORIENTATIONS else (w, h)


def draft_scale(width: int, height: int, size: int | tuple[int, int] = WIRE_SIZE, fill: float = DRAFT_MIN_FILL) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) for decoding a ``width`` x ``height`` JPEG to ``size``.

    The largest k whose draft keeps each side >= ``fill`` x the target's side
    (``size``: a square side, or ``(w, h)`` in the same orientation as ``width``
    and ``height``). ``decode``'s wire is square, so only the short side counts.
    """
    tw, th = (size, size) if isinstance(size, int) else size
    for k in (8, 4, 2):
        if width / k >= fill * tw and height / k >= fill * th:
            return k
    return 1


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` as shown for an EXIF ``orientation`` (the same image when there is nothing to turn)."""
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


@dataclass
class Source:
    """An opened image that passed the header checks (format, pixel cap, animation); nothing decoded yet."""

    image: Image.Image
    width: int
    """Full-resolution width after EXIF orientation."""
    height: int
    format: str
    """"jpeg", "png" or "webp" (an MPO is a "jpeg")."""
    orientation: int
    """The EXIF orientation (1: stored upright); ``load`` does not apply it, ``upright`` does."""

    def load(self, size: int | tuple[int, int], fill: float = DRAFT_MIN_FILL) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
        """Decode the pixels, a JPEG DCT-scaled by ``draft_scale`` for an upright target ``size``.

        Returns the decoded (not yet upright) image and the picture's exact
        extent in it when draft-scaled (its last row/column may be partial:
        resize over that box), else None. Raises ImageError.
        """
        im = self.image
        box = None
        if im.format in ("JPEG", "MPO"):
            tw, th = (size, size) if isinstance(size, int) else size
            if self.orientation in SWAPPED_ORIENTATIONS:
                tw, th = th, tw  # the target in stored pixels
            k = draft_scale(im.width, im.height, (tw, th), fill)
            if k > 1:
                # Pillow picks the largest power of two <= min(w // rw, h // rh): exactly k here.
                drafted = im.draft("RGB", (im.width // k, im.height // k))
                if drafted is not None:
                    box = drafted[1]
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageError("bomb", str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise ImageError(_classify(exc), str(exc)) from exc
        return im, box


@contextmanager
def opened(
    source: bytes | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    reject_animated: bool = True,
) -> Iterator[Source]:
    """Open image bytes or a file with nomad's checks, before any pixel is decoded.

    Only ``formats``; the pixel count from the header against ``max_pixels``
    ("bomb"); animations rejected unless ``reject_animated`` is False; an MPO at
    its first frame. Raises ImageError. ``decode`` (the wire) and the review
    copy (``nomad.delivery.review``) both start here.
    """
    with _open(source, formats) as im:
        _check(im, max_pixels)
        fmt = _format_name(im)
        if reject_animated and _animated(im):
            raise ImageError("animated", f"{fmt} with {getattr(im, 'n_frames', '?')} frames")
        if im.format == "MPO":
            im.seek(0)  # the photo; later frames are depth maps or previews
        orientation = _orientation(im)  # the EXIF block is parsed once
        width, height = _oriented_size(im, orientation)
        yield Source(im, width, height, fmt, orientation)


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
        w, h = _oriented_size(im, _orientation(im))
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
    with opened(data, max_pixels=max_pixels, formats=formats, reject_animated=reject_animated) as src:
        im, box = src.load(wire_size)
        try:
            # Squash first, turn the 512x512 result: the wire is square, so this is the
            # picture of turning first, without a turned copy of the whole draft.
            wire = to_wire(im, wire_size, box=box)
            if src.orientation in _TRANSPOSE:
                wire = np.array(upright(Image.fromarray(wire, "RGB"), src.orientation), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(_classify(exc), str(exc)) from exc
        return Decoded(wire=wire, width=src.width, height=src.height, format=src.format)
