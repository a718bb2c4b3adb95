"""nomad.images: safe decode to the wire format (bombs, truncation, orientation, colour modes)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

from photocore.wireimage import to_wire
from nomad.images import Decoded, ImageError, decode, draft_scale, probe
from stack.emulator import images as gen
from tests.nomad_fakes import pillow_load_sizes

pytestmark = pytest.mark.timeout(60)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def halves(w: int = 400, h: int = 300) -> Image.Image:
    """Left half red, right half blue: orientation is visible in the result."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def test_decode_jpeg_to_wire() -> None:
    d = decode(gen.picture(1600, 1200, "jpeg", 3))
    assert isinstance(d, Decoded)
    assert (d.width, d.height, d.format) == (1600, 1200, "jpeg")
    assert d.wire.shape == (512, 512, 3) and d.wire.dtype == np.uint8
    assert d.wire.std() > 5, "a real picture, not a blank"


def test_wire_is_exactly_the_preprocessing_contract() -> None:
    data = gen.picture(700, 900, "png", 5)
    d = decode(data)
    assert np.array_equal(d.wire, to_wire(Image.open(io.BytesIO(data))))
    assert decode(data, wire_size=224).wire.shape == (224, 224, 3)


def test_large_jpeg_draft_mode_close_to_full_decode() -> None:
    data = gen.picture(4000, 3000, "jpeg", 9)
    d = decode(data)
    assert (d.width, d.height) == (4000, 3000), "the real size, not the draft size"
    full = to_wire(Image.open(io.BytesIO(data)))
    diff = np.abs(d.wire.astype(int) - full.astype(int)).mean()
    assert diff < 2.0, f"draft decode drifted {diff:.2f} levels from the full decode"


def loaded_sizes(monkeypatch: pytest.MonkeyPatch, data: bytes) -> tuple[list[tuple[int, int]], Decoded]:
    """The size Pillow decodes ``data`` at inside ``decode`` (the draft size for a JPEG)."""
    return pillow_load_sizes(monkeypatch, lambda: decode(data))


def test_3000x2000_jpeg_is_draft_decoded_at_a_quarter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A common camera size decodes at 1/4 (750x500, 2% under the wire on its short side), not 1/2."""
    data = gen.picture(3000, 2000, "jpeg", 8)
    sizes, d = loaded_sizes(monkeypatch, data)
    assert sizes and sizes[0] == (750, 500)
    assert (d.width, d.height) == (3000, 2000)
    full = to_wire(Image.open(io.BytesIO(data)))
    assert np.abs(d.wire.astype(int) - full.astype(int)).mean() < 1.0


def test_mpo_phone_photo_is_draft_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Phone photos are often MPO: their first frame is a JPEG and gets the same DCT scaling."""
    data = mpo(Image.open(io.BytesIO(gen.picture(4000, 3000, "jpeg", 12))), Image.new("RGB", (320, 240)))
    sizes, d = loaded_sizes(monkeypatch, data)
    assert sizes and sizes[0] == (1000, 750)
    assert (d.width, d.height, d.format) == (4000, 3000, "jpeg")


@pytest.mark.parametrize("size,k", [
    ((3000, 2000), 4), ((2000, 3000), 4), ((4000, 3000), 4), ((3024, 4032), 4), ((6000, 4000), 8),
    ((4608, 3456), 4), ((2048, 1365), 2), ((1600, 1200), 2), ((1920, 1080), 2), ((1000, 800), 1),
    ((973, 5000), 2), ((972, 5000), 1),  # 486.5 >= 0.95 * 512 = 486.4 > 486
])
def test_draft_scale(size: tuple[int, int], k: int) -> None:
    """The largest 1/k whose short side stays >= 95% of the wire (a <= 5% upscale on one axis)."""
    assert draft_scale(*size) == k
    assert draft_scale(size[0] * 2, size[1] * 2, 1024) == k, "relative to the wire size asked for"


def busy_photo(w: int, h: int, seed: int, orientation: int = 1) -> bytes:
    """A q90 JPEG that is hard on a draft: colour field, film grain and hard-edged rectangles."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 100 + 2, w // 100 + 2, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC), np.int16)
    arr = arr + rng.normal(0, 8, size=(h, w, 1)).astype(np.int16)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        arr[y0:y0 + int(rng.integers(8, h // 4)), x0:x0 + int(rng.integers(8, w // 4))] = rng.integers(0, 256, 3)
    kw = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    return encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), "JPEG", quality=90, **kw)


def reference_wire(data: bytes) -> np.ndarray:
    """Every pixel decoded, turned upright, then squashed: what the draft path must look like."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_wire(ImageOps.exif_transpose(im))


@pytest.mark.parametrize("w,h,orientation", [
    (3000, 2000, 1), (2000, 3000, 6), (3000, 2000, 8), (4000, 2250, 3), (1600, 1200, 1), (4000, 3000, 1),
])
def test_draft_decode_fidelity(w: int, h: int, orientation: int) -> None:
    """Close to the full decode at every scale the rule picks, rotated or not.

    Measured: mean 0.4-0.8 levels, p99 2-6. A scale one step too coarse (1/8 for
    4000x3000) gives p99 11, a dropped orientation a mean of ~70.
    """
    data = busy_photo(w, h, 5, orientation)
    d = decode(data)
    diff = np.abs(d.wire.astype(int) - reference_wire(data).astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8, (diff.mean(), np.percentile(diff, 99))


def test_draft_extent_keeps_edges_in_place() -> None:
    """A 4001x2251 photo at 1/4 holds 1000.25x562.75 pixels of picture in 1001x563: squash that, not the padding."""
    arr = np.zeros((2251, 4001), np.uint8)
    for x in range(200, 4001, 400):
        arr[:, x:x + 200] = 255  # hard vertical edges across the whole width
    for y in range(150, 2251, 300):
        arr[y:y + 150, :] = 255 - arr[y:y + 150, :]
    data = encode(Image.fromarray(arr, "L").convert("RGB"), "JPEG", quality=95)
    assert draft_scale(4001, 2251) == 4
    diff = np.abs(decode(data).wire.astype(int) - reference_wire(data).astype(int))
    # Measured: mean 0.85, p99 25 (hard edges through a DCT draft); squashing the padding: 3.1, 62.
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 40, f"edges moved: {diff.mean():.2f}, {np.percentile(diff, 99)}"


def test_pixel_bomb_rejected_before_decoding() -> None:
    bomb = gen.pixel_bomb(100_000, 100_000)
    assert len(bomb) < 10_000
    t0 = time.monotonic()
    for fn in (probe, decode):
        with pytest.raises(ImageError) as ei:
            fn(bomb, max_pixels=40_000_000)
        assert ei.value.reason == "bomb"
    assert time.monotonic() - t0 < 1.0


def test_bomb_limit_is_per_call() -> None:
    data = gen.picture(1600, 1200, "png", 1)
    with pytest.raises(ImageError) as ei:
        decode(data, max_pixels=1_000_000)
    assert ei.value.reason == "bomb"
    assert decode(data, max_pixels=2_000_000).width == 1600
    # Below Pillow's own threshold (89M pixels) Pillow would decode it; our per-call limit refuses.
    mid = gen.pixel_bomb(9_000, 9_000)
    with pytest.raises(ImageError) as ei:
        probe(mid, max_pixels=40_000_000)
    assert ei.value.reason == "bomb"


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated(fmt: str) -> None:
    data = gen.picture(1600, 1200, fmt, 2)
    with pytest.raises(ImageError) as ei:
        decode(data[: len(data) // 2])
    assert ei.value.reason == "truncated"
    assert not getattr(__import__("PIL.ImageFile").ImageFile, "LOAD_TRUNCATED_IMAGES")


def test_emulator_truncated_jpeg() -> None:
    with pytest.raises(ImageError) as ei:
        decode(gen.truncated_jpeg())
    assert ei.value.reason == "truncated"


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>", b"\xff\xd8\xff" + b"\0" * 100])
def test_garbage(data: bytes) -> None:
    with pytest.raises(ImageError) as ei:
        decode(data)
    assert ei.value.reason in ("bad_format", "decode_error", "truncated")


def test_formats_restricted() -> None:
    for fmt in ("BMP", "TIFF"):
        with pytest.raises(ImageError) as ei:
            decode(encode(halves(), fmt))
        assert ei.value.reason == "bad_format"
    gif = gen.picture(300, 200, "gif", 1)
    with pytest.raises(ImageError) as ei:
        decode(gif)
    assert ei.value.reason == "bad_format"
    # An explicit allow-list can admit it (and then the animation is what rejects it).
    with pytest.raises(ImageError) as ei:
        decode(gif, formats=("GIF",))
    assert ei.value.reason == "animated"


@pytest.mark.parametrize("orientation,expect_size,top_colour", [
    (1, (400, 300), None),
    (6, (300, 400), "red"),     # rotate 90 CW to display: the left (red) edge goes to the top
    (8, (300, 400), "blue"),    # rotate 90 CCW: the right (blue) edge goes to the top
    (3, (400, 300), None),
])
def test_exif_orientation(orientation: int, expect_size: tuple[int, int], top_colour: str | None) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves(), "JPEG", quality=95, exif=exif.tobytes())
    assert probe(data, max_pixels=10**7)[:2] == expect_size
    d = decode(data)
    assert (d.width, d.height) == expect_size
    top = d.wire[:200].reshape(-1, 3).mean(axis=0)
    left = d.wire[:, :200].reshape(-1, 3).mean(axis=0)
    if top_colour == "red":
        assert top[0] > 200 and top[2] < 60
    elif top_colour == "blue":
        assert top[2] > 200 and top[0] < 60
    elif orientation == 3:  # upside down: blue ends on the left
        assert left[2] > 200
    else:
        assert left[0] > 200


def test_cmyk_jpeg() -> None:
    data = encode(halves().convert("CMYK"), "JPEG", quality=95)
    d = decode(data)
    assert d.wire.shape == (512, 512, 3)
    assert d.wire[:, :200, 0].mean() > 200 and d.wire[:, :200, 2].mean() < 60


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.full((300, 400), 32768, np.uint16)  # mid grey in 16 bits
    data = encode(Image.fromarray(arr), "PNG")
    d = decode(data)
    assert 100 < d.wire.mean() < 156, f"16-bit mid grey became {d.wire.mean():.0f}"


def test_rgba_over_white() -> None:
    arr = np.zeros((300, 400, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, 200:, 3] = 255  # right half opaque red, left half fully transparent
    d = decode(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert d.wire[:, :200].min() > 240, "transparent pixels are white"
    assert d.wire[:, 320:, 1].max() < 20


def test_la_and_palette_with_transparency() -> None:
    la = Image.fromarray(np.stack([np.full((300, 400), 0, np.uint8), np.full((300, 400), 0, np.uint8)], -1), "LA")
    assert decode(encode(la, "PNG")).wire.min() > 240  # fully transparent black -> white
    p = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    idx_red = p.getpixel((0, 0))
    p.info["transparency"] = idx_red
    d = decode(encode(p, "PNG", transparency=idx_red))
    assert d.wire[:, :200].min() > 240 and d.wire[:, 320:, 2].mean() > 200


def test_webp() -> None:
    d = decode(gen.picture(1600, 1200, "webp", 4))
    assert (d.width, d.height, d.format) == (1600, 1200, "webp")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_rejected(fmt: str) -> None:
    frames = [halves(), halves().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ImageError) as ei:
        decode(data)
    assert ei.value.reason == "animated"
    assert decode(data, reject_animated=False).width == 400


def test_probe_is_header_only() -> None:
    data = gen.picture(1600, 1200, "jpeg", 11)
    assert probe(data, max_pixels=10**8) == (1600, 1200, "jpeg")
    # Header-only: a file cut right after its header still probes.
    assert probe(data[:2000], max_pixels=10**8) == (1600, 1200, "jpeg")
    with pytest.raises(ImageError) as ei:
        probe(b"GIF89a" + b"\0" * 20, max_pixels=10**8)
    assert ei.value.reason == "bad_format"


def mpo(first: Image.Image, second: Image.Image) -> bytes:
    """A two-frame MPO (a phone photo plus e.g. a depth map), as Pillow writes it."""
    return encode(first, "MPO", save_all=True, append_images=[second])


def test_mpo_phone_photo_uses_the_first_frame() -> None:
    photo = halves(1600, 1200)
    depth = Image.new("RGB", (320, 240), (0, 255, 0))  # a different size and colour: must not leak in
    data = mpo(photo, depth)
    assert Image.open(io.BytesIO(data)).format == "MPO" and Image.open(io.BytesIO(data)).n_frames == 2
    d = decode(data)
    assert (d.width, d.height, d.format) == (1600, 1200, "jpeg")
    # The first frame's halves (red | blue), not the green second frame.
    left, right = d.wire[d.wire.shape[0] // 2, 10], d.wire[d.wire.shape[0] // 2, -10]
    assert left[0] > 200 and left[1] < 60 and right[2] > 200 and right[1] < 60
    assert probe(data, max_pixels=10**8) == (1600, 1200, "jpeg")


def test_animated_gif_still_rejected_when_gif_is_allowed() -> None:
    frames = [halves(), halves().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ImageError) as ei:
        decode(data, formats=("GIF", "JPEG"))
    assert ei.value.reason == "animated"
