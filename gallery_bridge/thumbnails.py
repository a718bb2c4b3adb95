"""Thumbnails like scenery's: JPEG, 750 px on the long side, never enlarged."""
from __future__ import annotations

import io

from PIL import Image, ImageOps

from .validate import to_8bit

THUMB_SIDE = 750
THUMB_QUALITY = 80


def make_thumbnail(image: Image.Image, side: int = THUMB_SIDE) -> bytes:
    """Encoded JPEG bytes of the image reduced to ``side`` px on its long side."""
    # 16-bit grey scaled to 8 bits first: convert("RGBA") would clip it to white.
    img = to_8bit(ImageOps.exif_transpose(image))
    if img.mode not in ("RGB", "L"):
        # Flatten transparency onto white rather than black (PNG logos, webp).
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        img = bg
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()
