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
   (nomad, fit_gmm, score/tune) call this before sending or scoring. It is part
   of the wire contract, so it lives in :mod:`photocore.wireimage` (nomad
   imports it from there); it is re-exported here for the offline tools.
2. ``clip_input(batch)`` / ``watermark_input(batch)``: ``uint8[N, H, W, 3]`` ->
   ``float32[N, 3, S, S]`` normalised, channels first. The server calls these on
   what arrives over the wire; offline tools call them on ``to_wire`` output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image

from photocore.wireimage import RESAMPLE, WIRE_SIZE, stack_wire, to_rgb, to_wire  # noqa: F401  (step 1 of the contract)

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
