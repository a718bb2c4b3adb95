"""Export a trained watermark classifier to ONNX (``watermark.onnx``) with a parity gate.

    python -m models.export_watermark --weights runs/wm/watermark.safetensors --out var/models

Artifact contract: input ``image`` float32[N,3,S,S] (S = 512 by default,
preprocessing ``WATERMARK_SPEC``: squash, mean/std 0.5), output ``logit``
float32[N,1], a raw logit (the server applies the sigmoid). By default
``watermark_int8`` is built too, through the int8 gate of ``models.quantize``
(decisions at the served threshold agree on >= 99% of held-out images, the
probabilities stay within 0.05 and the variant is faster than fp32); anti_sus
serves it unless ``--fp32``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from anti_sus.modeldir import ARTIFACTS, artifact_entry, write_manifest
from anti_sus.preprocess import WATERMARK_SPEC, PreprocessSpec

from ._cli import EnvParser, UserError, run_main
from .onnx_export import MAX_ABS, MIN_COSINE, OPSET, export_onnx, utc_now, versions

log = logging.getLogger(__name__)

WATERMARK_FILE = ARTIFACTS["watermark"][0]


def static_same_padding(model: Any, size: int) -> int:
    """Give timm's TF-"same" convolutions fixed pads for ``size`` x ``size`` inputs, in place; returns how many.

    timm's ``tf_`` models (EfficientNetV2 among them) pad stride-2 convolutions
    at run time from the input's shape, which exports as Shape/Gather/Pad nodes
    ONNX Runtime cannot fold. The served input size is fixed by the manifest, so
    the pads are known: each such convolution becomes ``ZeroPad2d(pads)`` +
    ``Conv2d(padding=0)`` with the same weights (identical outputs at ``size``),
    and ONNX Runtime fuses the constant pads into the convolutions. Measured on
    tf_efficientnetv2_b0 at 512 (batches of 5, three runs): 70-73 vs 76-82
    CPU-ms per image, the outputs equal to 3e-8.
    """
    import importlib

    import torch
    from torch import nn

    try:
        same_cls = importlib.import_module("timm.layers.conv2d_same").Conv2dSame
        pad_same_arg = importlib.import_module("timm.layers.padding").pad_same_arg
    except (ImportError, AttributeError):  # another timm layout: export as is (still correct, a little slower)
        return 0
    convs = {name: mod for name, mod in model.named_modules() if isinstance(mod, same_cls)}
    if not convs:
        return 0
    sizes: dict[str, list[int]] = {}
    hooks = [mod.register_forward_pre_hook(lambda _m, inp, n=name: sizes.__setitem__(n, list(inp[0].shape[-2:])))
             for name, mod in convs.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    for name, mod in convs.items():
        pads = pad_same_arg(sizes[name], list(mod.weight.shape[-2:]), mod.stride, mod.dilation)
        conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, 0, mod.dilation, mod.groups,
                         mod.bias is not None)
        conv.load_state_dict(mod.state_dict())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return len(convs)


def export_watermark(model: Any, out: Path, *, arch: str, spec: PreprocessSpec = WATERMARK_SPEC, opset: int = OPSET,
                     min_cosine: float = MIN_COSINE, max_abs: float = MAX_ABS, threads: int = 1,
                     provenance: dict[str, Any] | None = None, write: bool = True, int8: bool = False,
                     images: Path | None = None, min_speedup: float | None = None) -> dict[str, Any]:
    """Export ``model`` (one logit) to ``out/watermark.onnx``, gate it and (with ``write``) add it to the manifest.

    With ``int8`` (and ``write``) ``watermark_int8`` is built through the int8 gate of
    ``models.quantize`` too: on ``images`` (real photos, watermarked and clean) or
    procedural ones, with the decision P(watermark) >= the server's default threshold.
    ``min_speedup`` (None: the gate's own) is passed to the gate (tiny test models use 0).
    """
    import torch

    if spec.size != WATERMARK_SPEC.size:
        log.warning("watermark input is %d, not the production %d", spec.size, WATERMARK_SPEC.size)
    with torch.no_grad():
        probe = model.eval()(torch.zeros(2, 3, spec.size, spec.size))
    if tuple(probe.shape) != (2, 1):
        raise UserError(f"watermark model must output one logit per image, got shape {list(probe.shape)}")
    out.mkdir(parents=True, exist_ok=True)
    # Fixed pads for the one served size (the parity gate below still compares with torch on this same model).
    static = static_same_padding(model, spec.size)
    if static:
        log.info("watermark: %d TF-'same' convolutions padded statically for %dpx", static, spec.size)
    parity = export_onnx(model, out / WATERMARK_FILE, size=spec.size, output_name="logit", opset=opset,
                         min_cosine=min_cosine, max_abs=max_abs, threads=threads)
    entry = artifact_entry(
        out, WATERMARK_FILE, kind="onnx",
        input={"name": "image", "shape": ["N", 3, spec.size, spec.size], "dtype": "float32"},
        output={"name": "logit", "shape": ["N", 1], "activation": "sigmoid", "positive": "watermark"},
        preprocess=spec.to_dict(),
        provenance={"arch": arch, "tool": "models.export_watermark", "versions": versions(), "opset": opset,
                    "parity": parity.to_dict(), "created": utc_now(), "static_same_pads": static, **(provenance or {})},
    )
    if write:
        write_manifest(out, {"watermark": entry})
        if int8:
            gate_int8(out, images, threads, min_speedup=min_speedup)
    return entry


def gate_int8(out: Path, images: Path | None, threads: int = 1, min_speedup: float | None = None) -> Any:
    """Run the int8 gate on ``out``'s watermark model (recording or dropping ``watermark_int8``); prints and returns the report."""
    from anti_sus.defaults import DEFAULT_WATERMARK_THRESHOLD

    from . import quantize, synth

    kw: dict[str, Any] = {} if min_speedup is None else {"min_speedup": min_speedup}
    if images is not None:
        report, _ = quantize.run_target(out, "watermark", images, threads=threads, watermark_threshold=DEFAULT_WATERMARK_THRESHOLD,
                                        **kw)
    else:
        from anti_sus.modeldir import read_manifest
        from anti_sus.preprocess import model_input, stack_wire

        spec = PreprocessSpec.from_dict(read_manifest(out)["artifacts"]["watermark"]["preprocess"])
        x = model_input(stack_wire(synth.backgrounds(24, seed=7, size=256)), spec)
        ci, hi = quantize.split(list(range(len(x))), max_calibration=8)
        report, _ = quantize.build_int8(out, "watermark", x[ci], x[hi], [quantize.watermark_decision(DEFAULT_WATERMARK_THRESHOLD)],
                                        images=f"{len(hi)} held out / {len(ci)} calibration procedural images (models.synth)",
                                        threads=threads, **kw)
    print(report.summary())
    return report


def parser() -> EnvParser:
    p = EnvParser("export_watermark", description=__doc__.split("\n\n")[0])
    p.add_env("--weights", type=Path, required=True, help="safetensors file written by models.train_watermark")
    p.add_env("--int8", action="store_true", default=True,
              help="also build watermark_int8 through the int8 gate (models.quantize: dynamic and static QDQ; kept only "
                   "when its decisions and scores match fp32 and it is faster); anti_sus serves it unless --fp32; "
                   "--no-int8 skips it")
    p.add_env("--images", type=Path, default=None, help="real images for the int8 gate (default: procedural images)")
    p.add_export()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .watermark_net import load_weights

    args = parser().parse_export(argv)
    model, meta = load_weights(args.weights)
    size = int(meta.get("size", WATERMARK_SPEC.size))
    spec = PreprocessSpec("watermark", size, WATERMARK_SPEC.mean, WATERMARK_SPEC.std)
    prov = {k: v for k, v in meta.items() if k not in ("arch", "size")}
    prov["weights_file"] = args.weights.name
    entry = export_watermark(model, args.out, arch=meta["arch"], spec=spec, opset=args.opset, min_cosine=args.min_cosine,
                             max_abs=args.max_abs, threads=args.threads, provenance=prov,
                             int8=args.int8, images=args.images)
    p = entry["provenance"]["parity"]
    print(f"wrote {args.out / WATERMARK_FILE}: {meta['arch']} at {size}px, parity cosine {p['cosine']}, max-abs {p['max_abs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
