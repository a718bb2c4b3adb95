"""Build a complete tiny model directory for tests and the offline demo (seconds, random weights).

    python -m models.tiny --out /tmp/tiny-models
    python -m models.manifest verify /tmp/tiny-models

Same code paths as the real models, smaller networks:

- ``clip``: an open_clip CLIP vision transformer (224 input, patch 32, width 64,
  2 layers, 32-d output) exported by ``models.export_clip`` (L2-normalised,
  parity-gated).
- ``clip_text``/``clip_vocab``: an open_clip text transformer (CLIP's 49,408-id
  vocabulary and 77-token context, width 32, 2 layers, 32-d output, the visual
  tower's dimension) exported by the same command, and open_clip's BPE vocabulary file.
- ``gmm``/``gmm_meta``: ``models.fit_gmm`` on that encoder's features of
  procedural images (``models.synth``) pushed through the preprocessing contract.
- ``watermark``: timm ``test_efficientnet`` (one logit, 512 input) exported by
  ``models.export_watermark``.

The weights are random: scores mean nothing, shapes and wiring are real.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from anti_sus.preprocess import WATERMARK_SPEC, stack_wire

from . import fit_gmm, synth
from ._cli import EnvParser, run_main, setup
from .export_clip import export_clip
from .export_watermark import export_watermark
from .manifest import verified
from .watermark_net import build as build_watermark_net

log = logging.getLogger(__name__)

TINY_ARCH = "tiny-ViT-32"
TINY_VISION_CFG = {"image_size": 224, "patch_size": 32, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0}
TINY_EMBED_DIM = 32
# CLIP's real vocabulary and context (the tokenizer and the copied vocabulary file are the real ones), a tiny transformer.
TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_WATERMARK_ARCH = "test_efficientnet"
N_IMAGES = 128
N_COMPONENTS = 4


def build(out: Path, seed: int = 0, n_images: int = N_IMAGES, int8: bool = False, threads: int = 1) -> Path:
    """Write clip, gmm, gmm_meta, watermark (and clip_int8, watermark_int8 with ``int8``) plus manifest into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    export_clip(out, arch=TINY_ARCH, vision_cfg=TINY_VISION_CFG, text_cfg=TINY_TEXT_CFG, embed_dim=TINY_EMBED_DIM,
                seed=seed, threads=threads)
    clip = fit_gmm.ClipModel.from_dir(out)
    # The GMM's "good images": procedural backgrounds through to_wire -> clip_input -> ONNX, as the server sees them.
    images = synth.backgrounds(n_images, seed=seed + 1, size=256)
    batches = (stack_wire(images[i:i + 32]) for i in range(0, len(images), 32))
    feats = fit_gmm.encode_wire(batches, clip, threads).astype(np.float64)
    gm, _ = fit_gmm.fit(feats, [N_COMPONENTS], "full", seed=seed, reg_covar=1e-4)
    fit_gmm.save(out, gm, feats, clip, percentile=5.0, sweep=[], seed=seed,
                 source=f"models.tiny: {n_images} procedural images (seed {seed + 1})", histogram=out / fit_gmm.HIST_FILE)
    if int8:
        # After the fit, as stack.ensure_models does: the gate then checks the GMM's decisions too.
        from .quantize import build_int8_from_images

        # min_speedup 0: int8 is slower than fp32 on models this small; the tiny models test the gate's logic.
        build_int8_from_images(out, images, "procedural images (the GMM's own)", threads, min_speedup=0.0)
    net = build_watermark_net(TINY_WATERMARK_ARCH, seed=seed)
    export_watermark(net, out, arch=TINY_WATERMARK_ARCH, spec=WATERMARK_SPEC, threads=threads,
                     provenance={"pretrained": "none", "seed": seed, "trained": False, "built_by": "models.tiny"},
                     int8=int8, min_speedup=0.0)
    return verified(out, "tiny model directory", t0)


def parser() -> EnvParser:
    p = EnvParser("tiny", description=__doc__.split("\n\n")[0])
    p.add_tiny("model directory to create or overwrite", N_IMAGES)
    p.add_env("--int8", action="store_true", help="also write the int8 CLIP and watermark variants (through the int8 gate of models.quantize)")
    p.add_common()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args)
    t0 = time.monotonic()
    build(args.out, seed=args.seed, n_images=args.images, int8=args.int8, threads=args.threads)
    print(f"built tiny model directory {args.out} in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
