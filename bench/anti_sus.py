"""Benchmark: anti_sus server throughput vs bare ONNX CLIP vs the upstream batch-1 PIL approach.

Real architectures with random weights (no download): CLIP ViT-B/16 visual
tower (open_clip) and timm tf_efficientnetv2_b0, exported by the models
package's own export code; the GMM (16 components, full covariance) is fitted on
CLIP features of procedural images. All figures come from one run, measured in
interleaved rounds on the same images; medians are printed.

    .venv/bin/python bench/anti_sus.py                 # builds models into .cache/bench-anti-sus once
    .venv/bin/python bench/anti_sus.py --images 64 --rounds 3

Measured, in images/s (wall clock) and CPU-ms per image (user+system of every process involved,
which stays meaningful when other jobs share the machine):
- bare CLIP:      ORT session.run on already-normalised [32,3,224,224] tensors (model only; the CLIP variant
                  the server serves, int8 when the int8 gate kept one)
- bare models:    bare CLIP + GMM + bare watermark on the survivors (the model work the server must do)
- bare all-wm:    bare CLIP + GMM + bare watermark on every image (worst case: everything passes the GMM)
- server:         `anti-sus serve` in its own process, this process as client, uint8 batches of 32 at 512x512
                  over tcp loopback (watermark on GMM survivors, as deployed)
- server all-wm:  same server, per-request gmm_threshold so low that the watermark stage sees every image
- server -wm:     same with --no-watermark (CLIP + GMM only), comparable to bare CLIP
- server fp32:    the same server with --fp32 (refuses the int8 models); "server" serves the int8 CLIP (and
                  watermark model) that the int8 gate (models.quantize) kept, as deployed by default; the
                  bare rows run the same variants
- upstream:       per image in fp32: PIL bicubic resize, normalise, CLIP batch 1, GMM, watermark batch 1 if kept,
                  in plain ORT sessions (their threads spin while waiting: ORT's default)
- upstream nospin: the same with the server's session setting (threads do not spin), so the headline's
                  ratio can be read without that difference too

The headline is server (int8) / upstream (fp32), goal >= 2.2x on AVX-512 VNNI machines; the CPU model and
its avx2/avx512f/avx512_vnni/amx flags are printed with it. ``collect(quick)`` returns the figures for
bench/report.py (quick: tiny models, a few images, seconds).
"""
from __future__ import annotations

import argparse
import json
from typing import Any
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anti_sus.client import FilterClient  # noqa: E402
from anti_sus.modeldir import open_model_dir  # noqa: E402
from anti_sus.preprocess import PreprocessSpec, model_input, normalise, stack_wire  # noqa: E402
from anti_sus.stages.gmm import GmmScorer  # noqa: E402
from anti_sus.stages.onnx import open_session  # noqa: E402
from anti_sus.stages.watermark import sigmoid  # noqa: E402


def build_models(out: Path, threads: int, gmm_images: int) -> None:
    """ViT-B/16 + tf_efficientnetv2_b0 (random weights) and a GMM(16, full) in ``out``."""
    from models import fit_gmm, synth
    from models.export_clip import export_clip
    from models.export_watermark import export_watermark
    from models.watermark_net import build as build_watermark

    t0 = time.perf_counter()
    print(f"building benchmark models in {out} (once; reuse with --models) ...", flush=True)
    from models.quantize import build_int8_from_images

    export_clip(out, arch="ViT-B-16", pretrained=None, threads=threads)
    clip = fit_gmm.ClipModel.from_dir(out)
    imgs = synth.backgrounds(gmm_images, seed=1, size=256)
    feats = fit_gmm.encode_wire((stack_wire(imgs[i:i + 16]) for i in range(0, len(imgs), 16)), clip, threads)
    gm, _ = fit_gmm.fit(feats.astype(np.float64), [16], "full", reg_covar=1e-3)
    fit_gmm.save(out, gm, feats.astype(np.float64), clip, percentile=5.0, sweep=[],
                 source=f"bench: {gmm_images} procedural images")
    # int8 after the GMM, as stack.ensure_models does: the gate checks GMM decisions on held-out images.
    report, _ = build_int8_from_images(out, imgs, "procedural images (the GMM's own)", threads)
    print(report.summary(), flush=True)
    # int8 too, through its gate (kept only when faster than fp32 with parity), as models.export_watermark does.
    export_watermark(build_watermark("tf_efficientnetv2_b0"), out, arch="tf_efficientnetv2_b0", threads=threads,
                     provenance={"pretrained": "none", "built_by": "bench/anti_sus.py"}, int8=True)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict[str, str]:
    """The CPU model and which of the flags that int8 speed depends on it has (from /proc/cpuinfo)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + "/".join(CPU_FLAGS)}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of this process or of ``pid``: robust to other load on the box."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, threads: int, batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    ep = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "anti_sus", "serve", "--models", str(models), "--bind", ep,
                             "--threads", str(threads), "--max-batch", str(batch), "--log-level", "WARNING", *extra],
                            cwd=REPO)
    with FilterClient(ep, timeout=2, retries=0) as c:
        for _ in range(120):
            try:
                c.ping()
                return proc, ep
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit("server failed to start")
    raise SystemExit("server did not answer")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / ".cache" / "bench-anti-sus", help="model directory (built if empty)")
    ap.add_argument("--images", type=int, default=64, help="images per measurement")
    ap.add_argument("--batch", type=int, default=32, help="images per request / model call")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=0, help="ORT threads (0: all cores), same for every contender")
    ap.add_argument("--gmm-images", type=int, default=64, help="procedural images the benchmark GMM is fitted on")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (models.tiny) instead of ViT-B/16: a smoke run")
    return ap


def collect(quick: bool) -> dict[str, float | str]:
    """The figures for bench/report.py: quick = tiny models, 8 images, one round (seconds); else the real run."""
    argv = ["--tiny", "--images", "8", "--batch", "4", "--rounds", "1"] if quick else []
    return run(parser().parse_args(argv))


def main() -> int:
    run(parser().parse_args())
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every contender side by side, print the table, return the medians and the headline ratios."""
    if args.tiny and args.models == REPO / ".cache" / "bench-anti-sus":
        args.models = REPO / ".cache" / "bench-anti-sus-tiny"

    if not (args.models / "manifest.json").is_file():
        args.models.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            from models import tiny

            tiny.build(args.models, n_images=48, int8=True)
        else:
            build_models(args.models, max(args.threads, os.cpu_count() or 1), args.gmm_images)
    from anti_sus.modeldir import int8_unusable, read_manifest

    why = int8_unusable(read_manifest(args.models)["artifacts"])
    if why:  # e.g. a directory built by bench/e2e.py or an older version of this script
        from models import synth as _synth
        from models.quantize import build_int8_from_images

        print(f"int8 CLIP: {why}; running the int8 gate once ...", flush=True)
        report, _ = build_int8_from_images(args.models, _synth.backgrounds(args.gmm_images, seed=1, size=256),
                                           "procedural images (the GMM's kind)", max(args.threads, os.cpu_count() or 1),
                                           **({"min_speedup": 0.0} if args.tiny else {}))
        print(report.summary(), flush=True)
    wm_prov = (read_manifest(args.models)["artifacts"].get("watermark") or {}).get("provenance") or {}
    if not args.tiny and wm_prov.get("built_by") == "bench/anti_sus.py" and "static_same_pads" not in wm_prov:
        # This cache's watermark predates static "same" pads in the export: export it again (same random weights).
        from models.export_watermark import export_watermark
        from models.watermark_net import build as build_watermark

        print("watermark: exporting it again with static pads ...", flush=True)
        export_watermark(build_watermark("tf_efficientnetv2_b0"), args.models, arch="tf_efficientnetv2_b0",
                         threads=max(args.threads, os.cpu_count() or 1),
                         provenance={"pretrained": "none", "built_by": "bench/anti_sus.py"})
    arts_now = read_manifest(args.models)["artifacts"]
    tried = args.models / "watermark_int8.gate-tried"  # this cache's note: the gate ran on this watermark model
    wm_sha = (arts_now.get("watermark") or {}).get("sha256")
    if wm_sha and int8_unusable(arts_now, "watermark_int8", "watermark") and \
            not (tried.is_file() and tried.read_text().strip() == wm_sha):
        # A directory from before the watermark's int8: run its gate once; a failed gate (e.g. int8 slower than
        # fp32 on this machine) leaves fp32 served, and the note keeps it from running again on the same model.
        from models.export_watermark import gate_int8

        print("int8 watermark: running its gate once ...", flush=True)
        gate_int8(args.models, None, max(args.threads, os.cpu_count() or 1), min_speedup=0.0 if args.tiny else None)
        tried.write_text(wm_sha + "\n")
    arts = open_model_dir(args.models)
    clip_spec = PreprocessSpec.from_dict(arts["clip"].entry["preprocess"])
    wm_spec = PreprocessSpec.from_dict(arts["watermark"].entry["preprocess"])
    from anti_sus.modeldir import int8_unusable

    # The bare rows run the CLIP the server serves (so server / bare is the server's own overhead);
    # upstream runs fp32, as the upstream approach does.
    served = "clip" if int8_unusable(arts) else "clip_int8"
    clip = open_session(arts[served].path, args.threads)
    # upstream: a plain ORT session (its threads spin, ORT's default), as the upstream code opens it.
    clip_fp32 = open_session(arts["clip"].path, args.threads, spin=True)
    wm_fp32 = open_session(arts["watermark"].path, args.threads, spin=True)
    clip_fp32_nospin = open_session(arts["clip"].path, args.threads, spin=False)
    wm_fp32_nospin = open_session(arts["watermark"].path, args.threads, spin=False)
    wm_served = "watermark" if int8_unusable(arts, "watermark_int8", "watermark") else "watermark_int8"
    wm = open_session(arts[wm_served].path, args.threads)
    gmm = GmmScorer.load(arts["gmm"].path)
    threshold = float(json.loads(arts["gmm_meta"].path.read_text())["suggested_threshold"])

    from models import synth

    # Procedural backgrounds at the 512x512 wire size (the GMM's own kind of image; with random CLIP
    # weights and a GMM fitted on only --gmm-images of them, few pass: the all-wm rows show the other extreme).
    images = stack_wire(synth.backgrounds(args.images, seed=99, size=512))
    clip_x = model_input(images, clip_spec)  # bare CLIP gets its tensors ready-made
    n = len(images)
    b = args.batch

    kept = [0]

    def bare_clip() -> float:
        t0 = time.perf_counter()
        for i in range(0, n, b):
            clip.run(None, {"image": clip_x[i:i + b]})
        return n / (time.perf_counter() - t0)

    def bare_models(all_kept: bool = False):
        def run() -> float:
            t0 = time.perf_counter()
            feats = np.concatenate([clip.run(None, {"image": clip_x[i:i + b]})[0] for i in range(0, n, b)])
            scores = gmm.score(feats)
            keep = np.arange(n) if all_kept else np.flatnonzero(scores >= threshold)
            for i in range(0, len(keep), b):
                sigmoid(wm.run(None, {"image": normalise(images[keep[i:i + b]], wm_spec)})[0])
            kept[0] = int((scores >= threshold).sum())
            return n / (time.perf_counter() - t0)
        return run

    def upstream_with(clip_s: Any, wm_s: Any):
        def upstream() -> float:
            from PIL import Image

            t0 = time.perf_counter()
            for im in images:
                small = np.asarray(Image.fromarray(im).resize((clip_spec.size, clip_spec.size), Image.Resampling.BICUBIC))
                f = clip_s.run(None, {"image": normalise(small[None], clip_spec)})[0]
                if gmm.score(f)[0] >= threshold:
                    sigmoid(wm_s.run(None, {"image": normalise(im[None], wm_spec)})[0])
            return n / (time.perf_counter() - t0)
        return upstream

    servers = {}
    try:
        servers["server"] = start_server(args.models, args.threads, b, [])
        servers["server -wm"] = start_server(args.models, args.threads, b, ["--no-watermark"])
        servers["server fp32"] = start_server(args.models, args.threads, b, ["--fp32"])
        clients = {k: FilterClient(ep, timeout=600, retries=0) for k, (_, ep) in servers.items()}
        clip_info = clients["server"].info()["models"]["clip"]
        clients_info = {"variant": clip_info.get("variant"), **(clip_info.get("int8_gate") or {})}
        wm_info = clients["server"].info()["models"].get("watermark") or {}

        def via(name: str, gmm_threshold: float | None = None):
            def run() -> float:
                c = clients[name]
                t0 = time.perf_counter()
                for i in range(0, n, b):
                    c.filter(images[i:i + b], gmm_threshold=gmm_threshold)
                return n / (time.perf_counter() - t0)
            return run

        contenders = {"bare CLIP": bare_clip, "bare models": bare_models(), "bare all-wm": bare_models(True),
                      "server": via("server"), "server all-wm": via("server", -1e30), "server -wm": via("server -wm"),
                      "server fp32": via("server fp32"), "upstream": upstream_with(clip_fp32, wm_fp32),
                      "upstream nospin": upstream_with(clip_fp32_nospin, wm_fp32_nospin)}
        # Warm-up: first runs allocate ORT arenas.
        clip.run(None, {"image": clip_x[:2]})
        for c in clients.values():
            c.filter(images[:2])
        results: dict[str, list[float]] = {k: [] for k in contenders}
        cpu: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            for name, fn in contenders.items():
                key = "server" if name == "server all-wm" else name
                pid = servers[key][0].pid if key in servers else None
                c0, s0 = cpu_seconds(), cpu_seconds(pid) if pid else 0.0
                results[name].append(fn())
                used = cpu_seconds() - c0 + (cpu_seconds(pid) - s0 if pid else 0.0)
                cpu[name].append(used / n)
                print(f"round {r + 1}/{args.rounds} {name:12s} {results[name][-1]:7.2f} img/s  "
                      f"{cpu[name][-1] * 1000:7.1f} CPU-ms/img", flush=True)
        for c in clients.values():
            c.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in results.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    print()
    print(f"anti_sus benchmark: {n} images of 512x512, batches of {b}, {args.rounds} rounds, "
          f"ORT threads {args.threads or 'all'} on {os.cpu_count()} CPUs; "
          f"{kept[0]}/{n} images pass the GMM (watermark runs on those; on all in the all-wm rows); load average {os.getloadavg()[0]:.1f}")
    print(f"{'contender':14s} {'img/s (median)':>15s} {'vs bare CLIP':>13s} {'vs bare models':>15s} "
          f"{'CPU-ms/img':>11s} {'CPU vs bare CLIP':>17s}")
    for k, v in med.items():
        print(f"{k:14s} {v:15.2f} {v / med['bare CLIP']:12.2f}x {v / med['bare models']:14.2f}x "
              f"{cpu_med[k] * 1000:11.1f} {cpu_med['bare CLIP'] / cpu_med[k]:16.2f}x")
    print("(CPU vs bare CLIP: bare CLIP's CPU time per image / this one's, i.e. throughput on an otherwise idle machine)")
    print(f"\nserver -wm / bare CLIP = {med['server -wm'] / med['bare CLIP']:.2f}x wall, "
          f"{cpu_med['bare CLIP'] / cpu_med['server -wm']:.2f}x CPU (goal >= 0.8x); "
          f"server / bare models = {med['server'] / med['bare models']:.2f}x wall, "
          f"{cpu_med['bare models'] / cpu_med['server']:.2f}x CPU; "
          f"server all-wm / bare all-wm = {med['server all-wm'] / med['bare all-wm']:.2f}x wall, "
          f"{cpu_med['bare all-wm'] / cpu_med['server all-wm']:.2f}x CPU; "
          f"server / upstream = {med['server'] / med['upstream']:.2f}x wall, {cpu_med['upstream'] / cpu_med['server']:.2f}x CPU")
    info = cpu_info()
    served = clients_info.get("variant", "?")
    print(f"\nserver ({served}) / upstream (fp32, per image) = {med['server'] / med['upstream']:.2f}x wall, "
          f"{cpu_med['upstream'] / cpu_med['server']:.2f}x CPU (goal >= 2.2x on AVX-512 VNNI); "
          f"server --fp32 / upstream = {med['server fp32'] / med['upstream']:.2f}x wall; "
          f"server / upstream nospin = {med['server'] / med['upstream nospin']:.2f}x wall, "
          f"{cpu_med['upstream nospin'] / cpu_med['server']:.2f}x CPU; "
          f"int8 gate kept {clients_info.get('method')} ({clients_info.get('speedup')}x fp32 in the gate); "
          f"watermark served {wm_info.get('variant')}")
    print(f"CPU: {info['cpu_model']}; flags: {info['cpu_flags']}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          "(shared machine: ratios from one run are the figures to quote)")
    out: dict[str, Any] = {f"{k} img/s": round(v, 3) for k, v in med.items()}
    out.update({"server variant": served, "int8 method": str(clients_info.get("method")),
                "server watermark variant": str(wm_info.get("variant")),
                "server int8 / upstream fp32": round(med["server"] / med["upstream"], 3),
                "server fp32 / upstream fp32": round(med["server fp32"] / med["upstream"], 3),
                "server int8 / server fp32": round(med["server"] / med["server fp32"], 3),
                "server int8 / upstream fp32 (CPU)": round(cpu_med["upstream"] / cpu_med["server"], 3),
                "server int8 / upstream fp32 nospin": round(med["server"] / med["upstream nospin"], 3), **info})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
