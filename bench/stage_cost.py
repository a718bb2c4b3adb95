"""Benchmark: what the feature stages (probe, prompt checks) cost per image next to CLIP (issue 12 point 6).

Both stages work on the CLIP features the server already has: the probe is one
dot product per image, the prompt checks one matrix product against every
prompt embedding plus a log-sum-exp per check. Goal: probe + prompts < 2% of
CLIP's time per image. Measured in one run on the same batch: the CLIP variant
the server serves (int8 when its gate kept one, else fp32) on ``--images``
procedural images, and each stage on those images' features, medians of
``--rounds`` (the stages repeated ``--repeats`` times per round, they are fast).

    .venv/bin/python bench/stage_cost.py                  # ViT-B/16 from bench/anti_sus.py's cache (built if absent)
    .venv/bin/python bench/stage_cost.py --tiny           # tiny models: a smoke run

The prompt checks are the model directory's ``prompts.npz`` when it has one of
the right dimension, else :data:`anti_sus.stages.prompts.DEFAULT_CHECKS` with
random unit embeddings (the cost depends on the number of prompts and the
dimension, not on the values); ``--extra-checks N`` adds N more checks of 8
prompts each to see how the cost grows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anti_sus.modeldir import int8_unusable, open_model_dir  # noqa: E402
from anti_sus.preprocess import PreprocessSpec, model_input, stack_wire  # noqa: E402
from anti_sus.stages.onnx import open_session  # noqa: E402
from anti_sus.stages.probe import ProbeStage  # noqa: E402
from anti_sus.stages.prompts import DEFAULT_CHECKS, CheckSpec, PromptChecks  # noqa: E402

GOAL = 0.02


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / ".cache" / "bench-anti-sus", help="model directory")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (models.tiny) instead of ViT-B/16")
    ap.add_argument("--images", type=int, default=16, help="images per CLIP batch")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    ap.add_argument("--repeats", type=int, default=200, help="stage runs per round (each on the whole batch)")
    ap.add_argument("--threads", type=int, default=0, help="ORT threads for CLIP (0: all cores)")
    ap.add_argument("--extra-checks", type=int, default=0, help="extra prompt checks of 8 prompts each")
    return ap


def _checks(models: Path, dim: int, extra: int) -> PromptChecks:
    from anti_sus.stages.prompts import load_dir

    try:
        found = load_dir(models)
    except Exception:  # noqa: BLE001 - a stale or foreign file: measure the defaults instead
        found = None
    specs = found.specs() if found is not None and found.dim == dim else list(DEFAULT_CHECKS)
    specs += [CheckSpec(f"extra-{i}", tuple(f"r{i}-{j}" for j in range(4)), tuple(f"a{i}-{j}" for j in range(4)))
              for i in range(extra)]
    rng = np.random.default_rng(0)
    if found is not None and found.dim == dim and not extra:
        return found
    return PromptChecks.encode(specs, lambda ts: rng.normal(size=(len(ts), dim)).astype(np.float32))


def _per_image(fn: Callable[[], Any], n: int, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats / n


def run(args: argparse.Namespace) -> dict[str, float | str]:
    if args.tiny and args.models == REPO / ".cache" / "bench-anti-sus":
        args.models = REPO / ".cache" / "bench-anti-sus-tiny"
    if not (args.models / "manifest.json").is_file():
        args.models.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            from models import tiny

            tiny.build(args.models, n_images=48)
        else:
            from bench.anti_sus import build_models

            build_models(args.models, args.threads or 2, 64)
    arts = open_model_dir(args.models)
    served = "clip" if int8_unusable(arts) else "clip_int8"
    spec = PreprocessSpec.from_dict(arts["clip"].entry["preprocess"])
    clip = open_session(arts[served].path, args.threads)
    from models import synth

    x = model_input(stack_wire(synth.backgrounds(args.images, seed=5, size=256)), spec)
    n = len(x)
    feats = clip.run(None, {"image": x})[0]  # warm-up, and the features the stages score
    dim = int(feats.shape[1])
    rng = np.random.default_rng(1)
    probe = ProbeStage(rng.normal(size=dim), 0.1, 0.5)
    checks = _checks(args.models, dim, args.extra_checks)
    clip_s, probe_s, prompt_s = [], [], []
    for _ in range(args.rounds):
        clip_s.append(_per_image(lambda: clip.run(None, {"image": x}), n, 1))
        probe_s.append(_per_image(lambda: probe.prob(feats), n, args.repeats))
        prompt_s.append(_per_image(lambda: checks.scores(feats), n, args.repeats))
    c, p, q = statistics.median(clip_s), statistics.median(probe_s), statistics.median(prompt_s)
    share = (p + q) / c
    print(f"{served} ({dim}-d) on {n} images: {c * 1000:.2f} ms/image; probe {p * 1e6:.2f} µs/image; "
          f"prompts ({len(checks.names)} checks, {len(checks.texts)} prompts) {q * 1e6:.2f} µs/image; "
          f"probe + prompts = {share * 100:.4f}% of CLIP (goal < {GOAL * 100:.0f}%)")
    return {"clip_ms_per_image": round(c * 1000, 3), "probe_us_per_image": round(p * 1e6, 3),
            "prompts_us_per_image": round(q * 1e6, 3), "prompt_checks": len(checks.names),
            "prompts": len(checks.texts), "stages_share_of_clip": share, "clip_variant": served}


def collect(quick: bool) -> dict[str, float | str]:
    """Figures for bench/report.py (quick: tiny models, few repeats)."""
    argv = ["--tiny", "--images", "8", "--rounds", "1", "--repeats", "20"] if quick else []
    return run(parser().parse_args(argv))


def main() -> int:
    out = run(parser().parse_args())
    return 0 if float(out["stages_share_of_clip"]) < GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
