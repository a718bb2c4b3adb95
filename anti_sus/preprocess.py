"""The preprocessing contract: one function per model, numpy and Pillow only.

Every path that turns pixels into model input goes through this module: the
server, ``models.fit_gmm``, ``anti-sus score``/``tune`` and the evaluation tools.
A GMM fitted through one path and served through another would score a
different distribution, so there is exactly one way to do it.

The rule, everywhere: **squash, never crop.** An image is resized to the square
model input ignoring its aspect ratio. Cropping would cut off the corners and
borders, which is exactly where watermarks live, and would make the watermark
stage blind to them. The mining rules already cap the aspect ratio (W/H <= 3,
H/W <= 2), so the distortion is bounded.

Two steps:

1. ``to_wire(image)``: a decoded PIL image (any mode) -> ``uint8[H, W, 3]`` RGB at
   the wire size (``WIRE_SIZE`` = 512, the upstream batch format). Clients
   (nomad, fit_gmm, score/tune) call this before sending or scoring.
2. ``clip_input(batch)`` / ``watermark_input(batch)``: ``uint8[N, H, W, 3]`` ->
   ``float32[N, 3, S, S]`` normalised, channels first. The server calls these on
   what arrives over the wire; offline tools call them on ``to_wire`` output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

WIRE_SIZE = 512
"""Side of the square uint8 images clients send (upstream's 512x512x3 format)."""

RESAMPLE = Image.Resampling.BICUBIC
"""One resampling filter for every resize in the contract (CLIP was trained with bicubic)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessSpec:
    """How one model wants its input; stored per artifact in manifest.json."""

    name: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    resample: str = "bicubic"
    layout: str = "NCHW"
    dtype: str = "float32"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {
            "name": self.name,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "resample": self.resample,
            "layout": self.layout,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        """Read back a manifest entry; rejects rules this module does not implement."""
        spec = cls(
            name=str(d["name"]),
            size=int(d["size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            resize=str(d.get("resize", "squash")),
            resample=str(d.get("resample", "bicubic")),
            layout=str(d.get("layout", "NCHW")),
            dtype=str(d.get("dtype", "float32")),
        )
        if spec.resize != "squash" or spec.resample != "bicubic" or spec.layout != "NCHW":
            raise ValueError(f"unsupported preprocessing spec for {spec.name}: {dict(d)}")
        if len(spec.mean) != 3 or len(spec.std) != 3 or spec.size <= 0:
            raise ValueError(f"malformed preprocessing spec for {spec.name}: {dict(d)}")
        return spec


CLIP_SPEC = PreprocessSpec("clip", 224, CLIP_MEAN, CLIP_STD)
WATERMARK_SPEC = PreprocessSpec("watermark", 512, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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


def to_wire(image: Image.Image, size: int = WIRE_SIZE) -> np.ndarray:
    """A decoded image -> ``uint8[size, size, 3]`` RGB, squashed (the wire format).

    Greyscale stays one byte per pixel until it has been resized (squashing then
    copying the grey into three channels gives the same pixels as the other way
    round, at a quarter of the memory: Pillow keeps RGB as 4 bytes per pixel).
    """
    if image.mode in _INT_GREY or image.mode == "F":
        small = _grey_to_l(image)
    elif image.mode == "L":
        small = image
    else:
        small = to_rgb(image)
    if small.size != (size, size):
        small = small.resize((size, size), RESAMPLE)
    return np.asarray(small.convert("RGB"), dtype=np.uint8).copy()


def stack_wire(images: Sequence[Image.Image], size: int = WIRE_SIZE) -> np.ndarray:
    """Several decoded images -> one contiguous ``uint8[N, size, size, 3]`` batch."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = to_wire(im, size)
    return out


def _check_batch(batch: np.ndarray) -> None:
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8[N, H, W, 3], got {batch.dtype}{list(batch.shape)}")


def resize_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Squash every image of ``uint8[N, H, W, 3]`` to ``size`` x ``size`` (bicubic)."""
    _check_batch(batch)
    n, h, w, _ = batch.shape
    if (h, w) == (size, size):
        return batch
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(batch[i], "RGB").resize((size, size), RESAMPLE))
    return out


def normalise(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """``uint8[N, S, S, 3]`` -> ``float32[N, 3, S, S]`` with the spec's mean/std."""
    # Fold /255, -mean, /std into one multiply-add per channel.
    scale = (1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32))).reshape(1, 3, 1, 1)
    shift = (np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    x *= scale
    x -= shift
    return x


def model_input(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The whole contract for one model: squash to ``spec.size`` then normalise."""
    return normalise(resize_batch(batch, spec.size), spec)


def clip_input(batch: np.ndarray, spec: PreprocessSpec = CLIP_SPEC) -> np.ndarray:
    """Wire batch -> CLIP visual input ``float32[N, 3, 224, 224]``."""
    return model_input(batch, spec)


def watermark_input(batch: np.ndarray, spec: PreprocessSpec = WATERMARK_SPEC) -> np.ndarray:
    """Wire batch -> watermark classifier input ``float32[N, 3, 512, 512]``."""
    return model_input(batch, spec)


def load_image(path: str, max_pixels: int = 89_478_485) -> Image.Image:
    """Open an image file for offline tools, with Pillow's bomb limit as an error.

    EXIF orientation is applied so a photo is seen the way a viewer shows it.
    """
    import warnings

    from PIL import ImageOps

    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; a bomb is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Image.DecompressionBombError(f"{path}: {w}x{h} exceeds {max_pixels} pixels")
            im.load()
            # In place: exif_transpose otherwise returns a full copy even when there is nothing to turn.
            ImageOps.exif_transpose(im, in_place=True)
            return im
