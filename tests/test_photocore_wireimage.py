"""photocore.wireimage: any decoded picture -> the wire's uint8[512, 512, 3], squashed."""
from __future__ import annotations

import numpy as np
from PIL import Image

from photocore.wireimage import WIRE_SIZE, stack_wire, to_rgb, to_wire


def test_any_size_is_squashed_not_cropped() -> None:
    im = Image.new("RGB", (300, 100), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 100))  # a red band at the left edge (where watermarks live)
    wire = to_wire(im)
    assert wire.shape == (WIRE_SIZE, WIRE_SIZE, 3) and wire.dtype == np.uint8
    assert wire[256, 5].tolist() == [255, 0, 0] and wire[256, 400].tolist() == [0, 0, 255]


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    im = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).convert("I;16")
    px = to_wire(im, 8)[0, 0]
    assert px.tolist() == [128, 128, 128]


def test_transparency_is_composited_over_white() -> None:
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]


def test_stack_wire() -> None:
    batch = stack_wire([Image.new("L", (10, 20), 7), Image.new("RGB", (5, 5), (1, 2, 3))], 16)
    assert batch.shape == (2, 16, 16, 3) and batch[0, 0, 0].tolist() == [7, 7, 7] and batch[1, 3, 3].tolist() == [1, 2, 3]
