"""Synthetic watermark data: varied backgrounds with and without overlaid watermarks.

    python -m models.watermark_data --out data/wm --count 2000
    python -m models.train_watermark --data data/wm --out runs/wm/watermark.safetensors

Writes ``OUT/watermark/*.jpg`` and ``OUT/clear/*.jpg`` (the layout
``train_watermark`` reads). Backgrounds come from ``models.synth`` (gradients,
noise, stripes, shapes, scikit-image sample photos). Watermarks are:

- text: several fonts (the DejaVu/STIX/Computer Modern faces matplotlib ships,
  Pillow's default), sizes, opacities, colours, positions (corners, centre,
  anywhere) and angles, with an optional outline or shadow;
- logos: a ring or box with initials, semi-transparent;
- tiled marks: a phrase repeated across the whole image at an angle.

By default the images come in pairs: the same picture clear and watermarked
(same file name in both folders), so the mark is the only thing that tells
the classes apart. Half of the pictures also get opaque *scene* elements
(solid shapes that belong to the picture), so "has a sharp-edged object" is not
a shortcut. ``--unpaired`` draws independent backgrounds per class instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import synth
from ._cli import EnvParser, UserError, run_main, setup

log = logging.getLogger(__name__)

WORDS = ("SAMPLE", "PREVIEW", "© Getty Images", "shutterstock", "iStock", "Adobe Stock", "Dreamstime", "123RF",
         "alamy", "© 2024 J. Doe Photography", "@lens.and.light", "www.photostock.example", "PROOF", "DRAFT",
         "CONFIDENTIAL", "Copyright", "Depositphotos", "watermark", "Photo by M. Rossi", "not for resale")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono-Bold.ttf",
              "STIXGeneral.ttf", "STIXGeneralBol.ttf", "cmss10.ttf", "cmr10.ttf", "DejaVuSans-Oblique.ttf")
KINDS = ("text", "logo", "tiled")


@dataclass(frozen=True)
class Style:
    """Ranges the marks are drawn from, as fractions of the image side and of full opacity."""

    text_size: tuple[float, float] = (0.05, 0.16)
    text_opacity: tuple[float, float] = (0.35, 0.9)
    logo_size: tuple[float, float] = (0.12, 0.3)
    logo_opacity: tuple[float, float] = (0.35, 0.85)
    tile_size: tuple[float, float] = (0.035, 0.08)
    tile_opacity: tuple[float, float] = (0.25, 0.6)


STYLES = {
    # Faint and small marks too, like real stock-photo watermarks.
    "normal": Style(),
    # Larger, more opaque marks: a CPU-sized smoke test of the training loop (tests/test_models_watermark.py).
    "bold": Style((0.1, 0.2), (0.6, 0.95), (0.25, 0.4), (0.6, 0.9), (0.06, 0.1), (0.5, 0.8)),
}


@lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """TrueType fonts available without downloads (matplotlib ships DejaVu, STIX, Computer Modern)."""
    try:
        import matplotlib

        root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        return tuple(str(root / f) for f in FONT_FILES if (root / f).is_file())
    except ImportError:  # matplotlib is a runtime dependency, but be robust: Pillow's default font still works
        return ()


def _font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    paths = font_paths()
    size = max(6, int(size))
    if paths and rng.random() < 0.9:
        return ImageFont.truetype(paths[int(rng.integers(len(paths)))], size)
    return ImageFont.load_default(size=size)


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    r = rng.random()
    if r < 0.45:
        return (255, 255, 255)
    if r < 0.75:
        return (0, 0, 0)
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _text_tile(rng: np.random.Generator, text: str, px: int, alpha: int) -> Image.Image:
    """Text on a transparent tile, optionally outlined or shadowed (how stock marks look)."""
    font = _font(rng, px)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    pad = max(2, px // 6)
    tile = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(tile)
    ink = _ink(rng)
    style = rng.random()
    if style < 0.25:
        d.text((pad - left + 2, pad - top + 2), text, font=font, fill=(0, 0, 0, alpha // 2))  # shadow
    stroke = int(max(1, px // 18)) if 0.25 <= style < 0.5 else 0
    outline = (0, 0, 0, alpha) if sum(ink) > 380 else (255, 255, 255, alpha)
    d.text((pad - left, pad - top), text, font=font, fill=(*ink, alpha), stroke_width=stroke, stroke_fill=outline)
    return tile


def _paste(layer: Image.Image, tile: Image.Image, rng: np.random.Generator, where: str) -> None:
    w, h = layer.size
    tw, th = tile.size
    if where == "center":
        x, y = (w - tw) // 2, (h - th) // 2
    elif where == "corner":
        m = int(0.03 * w)
        x = m if rng.random() < 0.5 else w - tw - m
        y = m if rng.random() < 0.5 else h - th - m
    else:
        x, y = int(rng.integers(-tw // 4, max(1, w - 3 * tw // 4))), int(rng.integers(-th // 4, max(1, h - 3 * th // 4)))
    # The layer is empty and gets one tile, so a plain paste (which clips at the edges) is exact.
    layer.paste(tile, (x, y))


def text_mark(rng: np.random.Generator, size: int, style: Style = Style()) -> Image.Image:
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    text = WORDS[int(rng.integers(len(WORDS)))]
    px = int(size * rng.uniform(*style.text_size))
    tile = _text_tile(rng, text, px, int(255 * rng.uniform(*style.text_opacity)))
    angle = float(rng.choice([0.0, 0.0, rng.uniform(-45, 45)]))
    if angle:
        tile = tile.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    if tile.width > size:  # long phrases at big sizes: shrink to fit so the mark stays visible
        tile = tile.resize((size - 4, max(1, int(tile.height * (size - 4) / tile.width))), Image.Resampling.LANCZOS)
    _paste(layer, tile, rng, str(rng.choice(["center", "corner", "corner", "anywhere"])))
    return layer


def logo_mark(rng: np.random.Generator, size: int, style: Style = Style()) -> Image.Image:
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    s = int(size * rng.uniform(*style.logo_size))
    tile = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(tile)
    alpha = int(255 * rng.uniform(*style.logo_opacity))
    ink = (*_ink(rng), alpha)
    width = max(2, s // 14)
    if rng.random() < 0.5:
        d.ellipse([width, width, s - width, s - width], outline=ink, width=width)
    else:
        d.rounded_rectangle([width, width, s - width, s - width], radius=s // 6, outline=ink, width=width)
    letters = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(1, 4))))
    font = _font(rng, s * 0.38)
    d.text((s / 2, s / 2), letters, font=font, fill=ink, anchor="mm")
    if rng.random() < 0.5:
        tile = tile.rotate(float(rng.uniform(-30, 30)), resample=Image.Resampling.BICUBIC)
    _paste(layer, tile, rng, str(rng.choice(["center", "corner", "anywhere"])))
    return layer


def tiled_mark(rng: np.random.Generator, size: int, style: Style = Style()) -> Image.Image:
    text = WORDS[int(rng.integers(len(WORDS)))]
    px = int(size * rng.uniform(*style.tile_size))
    tile = _text_tile(rng, text, px, int(255 * rng.uniform(*style.tile_opacity)))
    big = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
    step_x, step_y = tile.width + int(px * rng.uniform(1, 3)), tile.height + int(px * rng.uniform(1.5, 4))
    for row, y in enumerate(range(0, 2 * size, step_y)):
        for x in range(-(row % 2) * step_x // 2, 2 * size, step_x):
            big.alpha_composite(tile, (max(0, x), y))
    big = big.rotate(float(rng.uniform(-40, 40)), resample=Image.Resampling.BICUBIC)
    return big.crop((size // 2, size // 2, size // 2 + size, size // 2 + size))


MARKS = {"text": text_mark, "logo": logo_mark, "tiled": tiled_mark}


def scene_elements(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Opaque solid shapes that belong to the picture (negatives that are not just empty backgrounds)."""
    d = ImageDraw.Draw(img)
    size = img.width
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 12, size // 3, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    return img


def add_mark(img: Image.Image, rng: np.random.Generator, kinds: Sequence[str] = KINDS, style: Style = Style()) -> Image.Image:
    """``img`` with a watermark of a random kind composited over it."""
    mark = MARKS[kinds[int(rng.integers(len(kinds)))]](rng, img.width, style)
    return Image.alpha_composite(img.convert("RGBA"), mark).convert("RGB")


def sample(rng: np.random.Generator, size: int, watermark: bool, kinds: Sequence[str] = KINDS, style: Style = Style()) -> Image.Image:
    """One RGB image, with a watermark of a random kind or clear."""
    img = synth.background(rng, size)
    if rng.random() < 0.5:
        img = scene_elements(img, rng)
    return add_mark(img, rng, kinds, style) if watermark else img


def pair(rng: np.random.Generator, size: int, kinds: Sequence[str] = KINDS, style: Style = Style()) -> tuple[Image.Image, Image.Image]:
    """(clear, watermarked) versions of the same picture.

    Pairs make the mark the *only* difference between the classes, so a small
    training set cannot be fitted by memorising backgrounds.
    """
    img = synth.background(rng, size)
    if rng.random() < 0.5:
        img = scene_elements(img, rng)
    return img, add_mark(img, rng, kinds, style)


@dataclass(frozen=True)
class Written:
    watermark: int
    clear: int


def generate(out: Path, count: int, size: int = 512, seed: int = 0, quality: int = 92, paired: bool = True,
             style: str = "normal", kinds: Sequence[str] = KINDS, progress: bool = True) -> Written:
    """Write ``count`` images (half watermarked) as JPEGs under ``out/watermark`` and ``out/clear``.

    With ``paired`` each background is written twice, clear and watermarked, under
    the same file name in the two folders.
    """
    from tqdm import tqdm

    if count < 2:
        raise UserError(f"--count must be at least 2, got {count}")
    if style not in STYLES or not kinds or set(kinds) - set(KINDS):
        raise UserError(f"style must be one of {sorted(STYLES)} and kinds a subset of {KINDS}")
    st = STYLES[style]
    rng = np.random.default_rng(seed)
    (out / "watermark").mkdir(parents=True, exist_ok=True)
    (out / "clear").mkdir(parents=True, exist_ok=True)
    n_wm = 0
    if paired:
        for i in tqdm(range(count // 2), desc="synthetic pairs", unit="pair", disable=not progress):
            clear, marked = pair(rng, size, kinds, st)
            clear.save(out / "clear" / f"{i:06d}.jpg", quality=quality)
            marked.save(out / "watermark" / f"{i:06d}.jpg", quality=quality)
        return Written(count // 2, count // 2)
    for i in tqdm(range(count), desc="synthetic", unit="img", disable=not progress):
        wm = i % 2 == 0
        img = sample(rng, size, wm, kinds, st)
        img.save(out / ("watermark" if wm else "clear") / f"{i:06d}.jpg", quality=quality)
        n_wm += wm
    return Written(n_wm, count - n_wm)


def parser() -> EnvParser:
    p = EnvParser("watermark_data", description=__doc__.split("\n\n")[0])
    p.add_env("--out", type=Path, required=True, help="output folder (gets watermark/ and clear/)")
    p.add_env("--count", type=int, default=2000, help="images in total, half of them watermarked")
    p.add_env("--size", type=int, default=512, help="image side in pixels")
    p.add_env("--seed", type=int, default=0, help="random seed")
    p.add_env("--quality", type=int, default=92, help="JPEG quality of the written files")
    p.add_env("--style", choices=sorted(STYLES), default="normal", help="mark size/opacity ranges (bold: larger, more opaque)")
    p.add_env("--kinds", default=",".join(KINDS), help="comma-separated mark kinds to draw")
    p.add_env("--unpaired", action="store_true", help="independent backgrounds per class instead of clear/marked pairs")
    p.add_common()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args, torch_threads=False)
    w = generate(args.out, args.count, args.size, args.seed, args.quality, paired=not args.unpaired,
                 style=args.style, kinds=tuple(k for k in args.kinds.split(",") if k))
    print(f"wrote {w.watermark} watermarked and {w.clear} clear images under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
