"""Export an open_clip visual tower to ONNX (``clip_visual.onnx``), L2-normalised inside the graph.

    python -m models.export_clip --out var/models --pretrained openai          # operator, with internet
    python -m models.export_clip --out /tmp/m --pretrained none           # random weights, offline
    python -m models.export_clip --out var/models --images ~/good-photos   # int8 gated on real images

Artifact contract: input ``image`` float32[N,3,S,S] (S from the model, 224 for
ViT-B-16), output ``features`` float32[N,D] with unit L2 norm. The parity gate
compares ONNX Runtime with torch on the same tensors; failing it exits non-zero.
By default ``clip_int8`` is built too, through the int8 gate of ``models.quantize``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from anti_sus.modeldir import ARTIFACTS, artifact_entry, write_manifest
from anti_sus.preprocess import CLIP_SPEC, PreprocessSpec

from ._cli import EnvParser, UserError, run_main
from .onnx_export import MAX_ABS, MIN_COSINE, OPSET, example_input, export_onnx, run_onnx, utc_now, versions

log = logging.getLogger(__name__)

DEFAULT_ARCH = "ViT-B-16"
CLIP_FILE = ARTIFACTS["clip"][0]
CLIP_INT8_FILE = ARTIFACTS["clip_int8"][0]


def normalized_visual(visual: Any) -> Any:
    """Wrap a visual tower so its output is L2-normalised (the server compares unit vectors)."""
    import torch

    class NormalizedVisual(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            f = self.inner(image)
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return NormalizedVisual(visual).eval()


def build_visual(arch: str = DEFAULT_ARCH, pretrained: str | None = None, vision_cfg: dict[str, Any] | None = None,
                 embed_dim: int | None = None, seed: int = 0) -> tuple[Any, PreprocessSpec]:
    """The visual tower of ``arch`` and its preprocessing spec.

    ``pretrained`` None builds random weights (seeded) without touching the
    network; ``vision_cfg``/``embed_dim`` override the architecture (``models.tiny``).
    """
    import open_clip
    import torch

    torch.manual_seed(seed)
    if pretrained:
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, require_pretrained=True)
        except Exception as exc:  # download/tag errors come in many types; all are the user's to fix
            raise UserError(f"could not load open_clip {arch} weights {pretrained!r}: {exc}") from None
        visual = model.visual
        cfg = getattr(visual, "preprocess_cfg", None) or {}
    else:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        base = open_clip.get_model_config(arch)
        if base is None and vision_cfg is None:
            raise UserError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        vcfg = dict(base["vision_cfg"] if base else {}) if vision_cfg is None else dict(vision_cfg)
        dim = embed_dim or (base or {}).get("embed_dim", 512)
        # Only the visual tower: building the text tower of a random model is wasted time.
        visual = _build_vision_tower(dim, CLIPVisionCfg(**vcfg), quick_gelu=bool((base or {}).get("quick_gelu", False)))
        cfg = {}
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(v) for v in cfg.get("mean", CLIP_SPEC.mean))
    std = tuple(float(v) for v in cfg.get("std", CLIP_SPEC.std))
    spec = PreprocessSpec("clip", size, mean, std)  # type: ignore[arg-type]
    return visual.eval(), spec


def gate_int8(out: Path, spec: PreprocessSpec, images: Path | None = None, threads: int = 1,
              write: bool = True) -> tuple[Any, dict[str, Any] | None]:
    """Run the int8 gate (``models.quantize``) on the fresh ``clip``; returns (report, entry or None).

    With ``images`` (real photos, e.g. the taste images) they calibrate and judge
    the variants; without, procedural images do and the report says so. The GMM
    decision is checked only when a GMM fitted on this very clip is in ``out``
    (at first export there is none: ``stack.ensure_models`` and
    ``python -m models.quantize`` rerun the gate after the fit, see docs/models.md).
    """
    from . import quantize, synth
    from anti_sus.preprocess import model_input, stack_wire

    decisions = [d for d in [quantize.gmm_decision(out)] if d is not None]
    if images is not None:
        from .fit_gmm import find_images

        calib, held = quantize.split(find_images(images))
        cx, hx = quantize.load_inputs(calib, spec), quantize.load_inputs(held, spec)
        what = f"{len(hx)} held out / {len(cx)} calibration of the images under {images}"
    else:
        x = model_input(stack_wire(synth.backgrounds(48, seed=7, size=256)), spec)
        ci, hi = quantize.split(list(range(len(x))))
        cx, hx = x[ci], x[hi]
        what = f"{len(hx)} held out / {len(cx)} calibration procedural images (models.synth; no real images given)"
    return quantize.build_int8(out, "clip", cx, hx, decisions, images=what, threads=threads, write=write)


def export_clip(out: Path, *, arch: str = DEFAULT_ARCH, pretrained: str | None = None, int8: bool = False,
                images: Path | None = None,
                opset: int = OPSET, min_cosine: float = MIN_COSINE, max_abs: float = MAX_ABS, threads: int = 1,
                vision_cfg: dict[str, Any] | None = None, embed_dim: int | None = None, seed: int = 0,
                write: bool = True) -> dict[str, dict[str, Any]]:
    """Build, export, gate and (with ``write``) add ``clip`` (and ``clip_int8``) to ``out``'s manifest.

    Returns the manifest entries. Raises :class:`ParityError` when the gate fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    visual, spec = build_visual(arch, pretrained, vision_cfg, embed_dim, seed)
    module = normalized_visual(visual)
    parity = export_onnx(module, out / CLIP_FILE, size=spec.size, output_name="features", opset=opset,
                         min_cosine=min_cosine, max_abs=max_abs, threads=threads)
    dim = int(run_onnx(out / CLIP_FILE, example_input(1, spec.size)).shape[1])
    io = {
        "input": {"name": "image", "shape": ["N", 3, spec.size, spec.size], "dtype": "float32"},
        "output": {"name": "features", "dim": dim, "normalized": True},
        "preprocess": spec.to_dict(),
    }
    provenance = {
        "arch": arch if vision_cfg is None else f"{arch} (custom: {vision_cfg}, embed_dim {embed_dim})",
        "pretrained": pretrained or "none",
        "seed": None if pretrained else seed,
        "tool": "models.export_clip",
        "versions": versions(),
        "opset": opset,
        "parity": parity.to_dict(),
        "created": utc_now(),
    }
    entries = {"clip": artifact_entry(out, CLIP_FILE, kind="onnx", **io, provenance=provenance)}
    if write:
        write_manifest(out, entries)
    if int8:
        # The gate reads the manifest's clip entry, so it runs after the fp32 entry is written.
        report, entry = gate_int8(out, spec, images, threads, write)
        print(report.summary())
        if entry is not None:
            entries["clip_int8"] = entry
    return entries


def parser() -> EnvParser:
    p = EnvParser("export_clip", description=__doc__.split("\n\n")[0])
    p.add_env("--arch", default=DEFAULT_ARCH, help="open_clip architecture name")
    p.add_env("--pretrained", default="none",
              help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b88k; downloads) or 'none' for random weights")
    p.add_env("--seed", type=int, default=0, help="seed for random weights (--pretrained none)")
    p.add_env("--int8", action="store_true", default=True,
              help="also build clip_int8 through the int8 gate (models.quantize: dynamic and static QDQ, the fastest "
                   "variant with parity on held-out images is kept); --no-int8 skips it")
    p.add_env("--images", type=Path, default=None,
              help="real images (e.g. the taste images) that calibrate and judge the int8 variants (default: procedural images)")
    p.add_export()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_export(argv)
    pretrained = None if args.pretrained.lower() in ("", "none", "random") else args.pretrained
    entries = export_clip(args.out, arch=args.arch, pretrained=pretrained, int8=args.int8, images=args.images, opset=args.opset,
                          min_cosine=args.min_cosine, max_abs=args.max_abs, threads=args.threads, seed=args.seed)
    p = entries["clip"]["provenance"]["parity"]
    print(f"wrote {args.out / CLIP_FILE}: dim {entries['clip']['output']['dim']}, parity cosine {p['cosine']}, max-abs {p['max_abs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
