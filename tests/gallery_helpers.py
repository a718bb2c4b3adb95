"""Gallery test helpers: procedural photos plus ``scene_view`` (near-duplicate negatives).

``scene_view(seed, …)`` renders one layered scene from a camera position, with a
subject that can move and a light that can change: two views of one scene are
*different photos of the same place*, the honest negatives for near-duplicate
detection. The plain photos live in :mod:`stack.emulator.photos` (bench/ uses them
too); they are re-exported here so tests keep one import.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stack.emulator.photos import _smooth_field, crop_fraction, encode, photo

__all__ = ["crop_fraction", "encode", "photo", "scene_view"]


def scene_view(seed: int, camera_x: float = 0.0, subject_x: float = 0.5, light: float = 0.0,
               size: tuple[int, int] = (640, 480)) -> Image.Image:
    """One photo of a layered landscape.

    ``camera_x`` moves the camera sideways (fraction of the frame): far layers
    shift little, near ones a lot (parallax). ``subject_x`` places a subject
    (a figure) in the frame. ``light`` in [-1, 1] tilts the illumination (time
    of day, clouds).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    big_w = int(w * 1.6)
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = (1 - yy) * np.array([110, 160, 230], np.float32) + yy * np.array([200, 220, 240], np.float32)
    canvas = np.broadcast_to(sky, (h, w, 3)).copy()
    # Layers far -> near: mountains, hills, trees; each a ridge line with its own parallax.
    for depth, (base_y, amp, colour, parallax) in enumerate(
        [(0.45, 0.15, (90, 100, 130), 0.15), (0.6, 0.1, (70, 120, 60), 0.5), (0.78, 0.08, (40, 80, 35), 1.0)]
    ):
        ridge_small = rng.random(12 + 8 * depth)
        ridge = np.interp(np.linspace(0, len(ridge_small) - 1, big_w), np.arange(len(ridge_small)), ridge_small)
        shift = int((0.3 + camera_x * parallax) * w)
        ridge = ridge[shift:shift + w]
        top = ((base_y - amp * ridge) * h).astype(int)
        tex = _smooth_field(rng, big_w, h, 24)[:, shift:shift + w] * 0.25
        mask = np.arange(h)[:, None] >= top[None, :]
        layer = np.array(colour, np.float32)[None, None, :] + tex - 32
        canvas = np.where(mask[..., None], layer, canvas)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # The subject: a figure standing in the foreground.
    cx, base = int(subject_x * w), int(0.92 * h)
    draw.rectangle((cx - w // 30, base - h // 3, cx + w // 30, base), fill=(180, 40, 40))
    draw.ellipse((cx - w // 24, base - h // 3 - h // 10, cx + w // 24, base - h // 3), fill=(230, 190, 160))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    arr = arr * (1.0 + 0.35 * light * xx)
    grain = np.random.default_rng(seed + 1).normal(0, 4, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(arr + grain, 0, 255).astype(np.uint8), "RGB")
