"""Checks on everything an ingest request carries, before anything is written.

The key and metadata come from the crawler, which copies them from the open
web: every string is length-capped, URLs must be http(s), and nothing from
them is ever used to build a file path (files are named by catalogue id).
The image is checked by magic bytes, then decoded by Pillow with a pixel cap.

That decode is the only one an ingest makes: validation, the hashes and the
thumbnail all use it. It is a *reduced* decode: a large JPEG is decoded with
DCT scaling (``draft``, 1/2, 1/4 or 1/8) and other formats are box-reduced
(``Image.reduce``) right after decoding, down to the smallest size that still
has ``WORK_LONG_SIDE`` px on the long side and ``WORK_SHORT_SIDE`` on the short
one. Every byte of the file is still read and entropy-decoded, so truncated and
corrupt files fail exactly as before; the full-size dimensions are recorded.
"""
from __future__ import annotations

import io
import math
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from photocore.protocol import ProtocolError
from photocore.sniff import pillow_format

WORK_LONG_SIDE = 750
"""Long side the reduced decode keeps at least: the thumbnail's 750 px. libjpeg's
scaled IDCT is itself a clean low-pass downscale: a 3000x2000 photo decoded at
1/4 gives a thumbnail 0.7 grey levels (mean) from the full decode's LANCZOS one,
against 0.6 at 1/2, for half the cost of decode + hashes + thumbnail."""
WORK_SHORT_SIDE = 384
"""Short side it keeps at least: four times the 96 px dedup signature, so the
signature's LANCZOS resize still averages many source pixels per output pixel."""

MAX_KEY = 256
MAX_URL = 2048
MAX_TEXT = 300
MAX_SCORES = 16

# Formats a gallery shows: what browsers display and scenery accepts (jpg/png), plus webp.
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

URL_FIELDS = ("source_url", "permalink")
TEXT_FIELDS = ("title", "subreddit", "author", "licence", "source")


@dataclass
class Limits:
    """Size caps; the server derives its ZMQ_MAXMSGSIZE from them."""

    max_image_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 100_000_000
    min_side: int = 64
    max_features_dim: int = 4096


@dataclass
class Meta:
    """Cleaned metadata: only known fields, only safe values."""

    source_url: str | None = None
    permalink: str | None = None
    title: str | None = None
    subreddit: str | None = None
    author: str | None = None
    licence: str | None = None
    source: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v not in (None, {})}


@dataclass
class CheckedImage:
    """A decoded image that passed every check.

    ``image`` is the reduced decode (see the module docstring), what hashes and
    thumbnail are made from; ``width``/``height`` are the file's full size.
    """

    data: bytes
    image: Image.Image
    ext: str
    width: int
    height: int
    _upright: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def upright(self) -> Image.Image:
        """:func:`upright` of ``image``, made once: the hashes and the thumbnail share it."""
        if self._upright is None:
            self._upright = upright(self.image)
        return self._upright


def clean_text(value: Any, name: str, cap: int) -> str | None:
    """A string with control characters removed and length capped (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_meta", f"meta.{name} must be a string, got {type(value).__name__}")
    # Control and format characters (newlines, bidi overrides) have no place in a title.
    text = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C" or ch == " ")
    text = text.strip()
    return text[:cap] or None


def clean_url(value: Any, name: str) -> str | None:
    """An http(s) URL or None: anything else (javascript:, data:, file:) is dropped."""
    text = clean_text(value, name, MAX_URL + 1)
    if text is None:
        return None
    if len(text) > MAX_URL:
        return None  # a truncated URL points elsewhere: drop it rather than store it
    lower = text.lower()
    if not (lower.startswith("https://") or lower.startswith("http://")) or any(c.isspace() for c in text):
        return None
    return text


def check_key(value: Any) -> str:
    """The idempotency key: a short printable string such as ``reddit:t3_abc:0``."""
    if not isinstance(value, str) or not value:
        raise ProtocolError("bad_header", "header needs a non-empty string 'key'")
    if len(value) > MAX_KEY:
        raise ProtocolError("bad_header", f"key is {len(value)} characters, limit {MAX_KEY}")
    if any(unicodedata.category(ch)[0] == "C" for ch in value):
        raise ProtocolError("bad_header", "key contains control characters")
    return value


def check_meta(value: Any) -> Meta:
    """Validate the ``meta`` object; unknown fields are ignored, wrong types refused."""
    if value is None:
        return Meta()
    if not isinstance(value, dict):
        raise ProtocolError("bad_meta", "meta must be a JSON object")
    meta = Meta()
    for name in URL_FIELDS:
        setattr(meta, name, clean_url(value.get(name), name))
    for name in TEXT_FIELDS:
        setattr(meta, name, clean_text(value.get(name), name, MAX_TEXT))
    scores = value.get("scores")
    if scores is not None:
        if not isinstance(scores, dict) or len(scores) > MAX_SCORES:
            raise ProtocolError("bad_meta", f"meta.scores must be an object of at most {MAX_SCORES} numbers")
        for k, v in scores.items():
            if not isinstance(k, str) or len(k) > 64:
                raise ProtocolError("bad_meta", "meta.scores keys must be short strings")
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ProtocolError("bad_meta", f"meta.scores.{k[:64]} must be a finite number")
            meta.scores[clean_text(k, "scores key", 64) or "?"] = float(v)
    return meta


def reduction(width: int, height: int, *, steps: tuple[int, ...] | None = None) -> int:
    """The largest factor that keeps ``WORK_LONG_SIDE``/``WORK_SHORT_SIDE`` px.

    ``steps`` limits the choice (JPEG's DCT scaling offers 1, 2, 4 and 8); any
    integer factor otherwise. 1 means the image is used at full size.
    """
    long_side, short_side = max(width, height), min(width, height)
    best = max(1, min(long_side // WORK_LONG_SIDE, short_side // WORK_SHORT_SIDE))
    if steps is not None:
        best = max(s for s in steps if s <= best or s == 1)
    return best


JPEG_SCALES = (1, 2, 4, 8)


def reduce_decoded(image: Image.Image, factor: int) -> Image.Image:
    """Box-reduce an already decoded image by ``factor`` (EXIF and info kept)."""
    if factor <= 1:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = to_8bit(image)  # Image.reduce has no 16-bit modes
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "La", "CMYK", "F"):
        # Palette and 1-bit images: reduce needs real samples.
        info = image.info
        image = image.convert("RGBA" if "transparency" in info else "RGB")
        image.info = dict(info)
    return image.reduce(factor)


def check_image(data: bytes, limits: Limits) -> CheckedImage:
    """Magic bytes, then one reduced Pillow decode under a pixel cap; raises ``bad_image``/``too_large``."""
    if len(data) > limits.max_image_bytes:
        raise ProtocolError("too_large", f"image is {len(data)} bytes, limit {limits.max_image_bytes}")
    fmt = pillow_format(data)
    if fmt is None:
        raise ProtocolError("bad_image", "not a JPEG, PNG or WebP file (magic bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ProtocolError("too_large", f"{width}x{height} pixels, limit {limits.max_pixels}")
            # Phone JPEGs are often MPO (the photo plus a depth map or preview):
            # the first frame is the photo. Animated PNG/WebP are not photos.
            if image.format in ("PNG", "WEBP") and getattr(image, "is_animated", False):
                raise ProtocolError("bad_image", "animated images are not photos")
            if image.format in ("JPEG", "MPO"):
                scale = reduction(width, height, steps=JPEG_SCALES)
                if scale > 1:
                    # DCT scaling: libjpeg skips the high frequencies instead of
                    # computing pixels that a resize would throw away.
                    image.draft(None, (width // scale, height // scale))
                image.load()
            else:
                image.load()
                image = reduce_decoded(image, reduction(width, height))
    except ProtocolError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProtocolError("too_large", f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise ProtocolError("bad_image", f"cannot decode {fmt}: {exc}") from None
    return CheckedImage(data=data, image=image, ext=FORMATS[fmt], width=width, height=height)


_ROTATING = frozenset(range(2, 9))
"""EXIF orientations that move pixels (1 is upright; other values are invalid and ignored, as exif_transpose does)."""


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: EXIF orientation applied, 16-bit grey scaled to 8 bits.

    ``ImageOps.exif_transpose`` followed by :func:`to_8bit`, except that an
    image neither of them changes is returned as is instead of as a copy: for
    the usual unrotated 8-bit photo that is a full pass over its pixels saved
    (the result is only read: hashed and resized). A rotated image comes
    back with its orientation tag removed, so calling this again on the result
    returns it unchanged.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _ROTATING:
        image = ImageOps.exif_transpose(image)
    return to_8bit(image)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey (PNG ``I;16``, or ``I``) scaled to 8-bit ``L``; other modes unchanged.

    Pillow's ``convert("L")``/``convert("RGB")`` clip such images at 255
    instead of scaling them, so a mid-grey 16-bit photo comes out white and
    every photo gets the same hash. 16-bit PNG colour images already decode
    to 8-bit RGB(A), so only the grey modes need this.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image)
        if image.mode == "I":  # 32-bit container: PNG puts 16-bit samples in it
            arr = np.clip(arr, 0, 65535)
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), "L")
    return image


def check_features(frame: bytes | None, declared: Any, limits: Limits) -> np.ndarray | None:
    """Optional float32 CLIP features: dimension declared or inferred, values finite."""
    if frame is None or len(frame) == 0:
        if declared not in (None, 0):
            raise ProtocolError("size_mismatch", f"features_dim {declared} declared but no features frame")
        return None
    if len(frame) % 4:
        raise ProtocolError("size_mismatch", f"features frame is {len(frame)} bytes, not a multiple of 4")
    dim = len(frame) // 4
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared != dim):
        raise ProtocolError("size_mismatch", f"features_dim {declared!r} but the frame holds {dim} float32")
    if dim > limits.max_features_dim:
        raise ProtocolError("too_large", f"{dim} features, limit {limits.max_features_dim}")
    vec = np.frombuffer(frame, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vec)):
        raise ProtocolError("bad_shape", "features contain NaN or infinity")
    return vec

