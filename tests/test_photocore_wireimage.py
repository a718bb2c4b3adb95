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


def test_box_squashes_only_that_region() -> None:
    """A box (a DCT draft's exact extent) leaves the padding beyond it out of the wire."""
    im = Image.new("RGB", (101, 50), (0, 0, 255))
    im.paste((255, 0, 0), (100, 0, 101, 50))  # a red last column: padding outside the picture
    with_pad = to_wire(im, 64)
    boxed = to_wire(im, 64, box=(0, 0, 100, 50))
    assert with_pad[:, -1, 0].min() > 100, "without a box the padding reaches the wire"
    # Only the bicubic tail past the box's edge reaches in (Pillow samples around the box, as it should).
    assert boxed[:, -1, 0].max() < 40 and boxed[:, :-1, 0].max() == 0
    same = Image.new("L", (64, 64), 9)
    assert to_wire(same, 64, box=(0, 0, 32, 32)).shape == (64, 64, 3), "a box applies even at the wire size"
