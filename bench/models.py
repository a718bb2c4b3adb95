"""Model inference benchmark: real architectures with random weights, measured side by side in one run.

    .venv/bin/python bench/models.py                 # threads = 2, batch 1, 10 timed runs
    .venv/bin/python bench/models.py --threads 4 --batch 8 --runs 5

Compares, with torch and ONNX Runtime pinned to the same thread count:
CLIP ViT-B/16 visual (ORT fp32 vs torch eager fp32, ORT int8 vs ORT fp32),
tf_efficientnetv2_b0 at 512 (ORT fp32 vs torch eager fp32), and the numpy GMM
scorer (16 full components, 512-d, 32 vectors). Prints images/s medians and
ratios. Weights are random: speed does not depend on them, accuracy is not measured.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_rate(fn: Callable[[], object], images: int, runs: int, warmup: int = 2) -> float:
    """Median images/s over ``runs`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")), help="threads for both engines [env: BENCH_THREADS]")
    ap.add_argument("--batch", type=int, default=int(os.environ.get("BENCH_BATCH", "1")), help="images per call [env: BENCH_BATCH]")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "10")), help="timed calls per engine [env: BENCH_RUNS]")
    args = ap.parse_args()

    import torch

    from anti_sus.stages.gmm import GmmScorer
    from models.export_clip import build_visual, export_clip, normalized_visual
    from models.export_watermark import export_watermark
    from models.onnx_export import ort_session
    from models.watermark_net import build as build_wm

    torch.set_num_threads(args.threads)
    rows: list[tuple[str, float]] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        export_clip(out, arch="ViT-B-16", int8=True, threads=args.threads)
        print(f"exported ViT-B-16 (fp32 + int8) in {time.perf_counter() - t0:.0f} s", flush=True)
        x = rng.standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
        fp32 = ort_session(out / "clip_visual.onnx", args.threads)
        int8 = ort_session(out / "clip_visual.int8.onnx", args.threads)
        visual, _ = build_visual("ViT-B-16")
        eager = normalized_visual(visual)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            rows.append(("clip ViT-B/16 torch eager fp32", median_rate(lambda: eager(xt), args.batch, args.runs)))
        rows.append(("clip ViT-B/16 ORT fp32", median_rate(lambda: fp32.run(None, {"image": x}), args.batch, args.runs)))
        rows.append(("clip ViT-B/16 ORT int8 (gate pick)", median_rate(lambda: int8.run(None, {"image": x}), args.batch, args.runs)))
        del fp32, int8, eager, visual

        net = build_wm("tf_efficientnetv2_b0").eval()
        export_watermark(net, out, arch="tf_efficientnetv2_b0", threads=args.threads, write=False)
        w = rng.standard_normal((args.batch, 3, 512, 512), dtype=np.float32)
        wm = ort_session(out / "watermark.onnx", args.threads)
        wt = torch.from_numpy(w)
        with torch.inference_mode():
            rows.append(("tf_efficientnetv2_b0@512 torch eager fp32", median_rate(lambda: net(wt), args.batch, args.runs)))
        rows.append(("tf_efficientnetv2_b0@512 ORT fp32", median_rate(lambda: wm.run(None, {"image": w}), args.batch, args.runs)))

    k, d = 16, 512
    a = rng.standard_normal((k, d, d)) * 0.01
    scorer = GmmScorer(np.full(k, 1 / k), rng.standard_normal((k, d)), np.triu(a) + np.eye(d)[None] * 5.0, "full")
    feats = rng.standard_normal((32, d))
    gmm_rate = median_rate(lambda: scorer.score(feats), 32, max(args.runs, 20))

    r = dict(rows)
    print(f"\nthreads={args.threads} (torch and ORT alike), batch={args.batch}, runs={args.runs}, medians")
    for name, rate in rows:
        print(f"  {name:45s} {rate:8.1f} img/s")
    print(f"  {'gmm 16x512 full, numpy, 32 vectors':45s} {32 / gmm_rate * 1e3:8.2f} ms per call")
    print("ratios")
    print(f"  clip ORT fp32 / torch eager fp32     {r['clip ViT-B/16 ORT fp32'] / r['clip ViT-B/16 torch eager fp32']:.2f}x")
    print(f"  clip ORT int8 / ORT fp32             {r['clip ViT-B/16 ORT int8 (gate pick)'] / r['clip ViT-B/16 ORT fp32']:.2f}x")
    print(f"  effnetv2_b0 ORT fp32 / torch eager   {r['tf_efficientnetv2_b0@512 ORT fp32'] / r['tf_efficientnetv2_b0@512 torch eager fp32']:.2f}x")
    print(f"  clip ORT fp32 / effnetv2_b0 ORT fp32 {r['clip ViT-B/16 ORT fp32'] / r['tf_efficientnetv2_b0@512 ORT fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
