"""Benchmark: anti_sus peak memory (RSS), for docs/anti_sus.md.

1. Decoding: peak RSS of ``load_image`` + ``to_wire`` on a 16-bit greyscale PNG
   (6000x6500 by default, a smooth gradient, so the file is small), each in a
   fresh process, against the whole-image float64 formula ``to_rgb`` used before
   (re-created here as "old"), and an 8-bit RGB JPEG of the same size for scale.
2. Queued work: an ``anti_sus`` server in its own process (a stub pipeline that
   takes ``--batch-seconds`` per batch, so work piles up) and 4 clients sending 4
   requests each of 64 images of 1024x1024 (201 MB, the largest the default
   limits allow) at once; the server's peak RSS (VmHWM) for several
   ``--max-queued-bytes`` values, with how many requests were served or answered busy.
   The peak is the bound plus what ZeroMQ holds while receiving (each incoming
   message is allocated whole, so up to one request per client sending at once).
3. Models: the server's pipeline with real-size models (CLIP ViT-B/16 +
   tf_efficientnetv2_b0, random weights, built once into .cache/bench-anti-sus-memory),
   each configuration in a fresh process: peak RSS (VmHWM) and RSS after the
   batch, at batch 1 and at the default batch (32, the watermark stage on every
   image), fp32 and int8 CLIP, with the default ``--memory-budget``, and the old
   way (one call per request, arena keeping its peak) for comparison; then the
   throughput of budgeted vs unbudgeted pipelines in one process, interleaved
   round by round (the only timing here: a ratio, which survives a shared machine).

    .venv/bin/python bench/anti_sus_memory.py                  # all parts
    .venv/bin/python bench/anti_sus_memory.py --skip-queue     # decoding and models (needs ~3.5 GB free)
    .venv/bin/python bench/anti_sus_memory.py --skip-decode --skip-queue   # models only

``collect(quick)`` returns the models part's figures for bench/report.py
(quick=True: tiny models, seconds, for a test).

Part 2 holds up to ~3.5 GB in the unbounded case; run it on a machine with that much free.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import cpu_model  # noqa: E402

MB = 1024 * 1024

DECODE_CHILD = r"""
import json, sys
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[3])
from anti_sus.preprocess import load_image, to_wire

def old_to_wire(image):
    # the formula to_rgb used before: a whole-image float64 copy and its temporaries
    arr = np.asarray(image, dtype=np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(arr, "L").convert("RGB")
    return np.asarray(rgb.resize((512, 512), Image.Resampling.BICUBIC)).copy()

def hwm_kb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent, VmHWM starts afresh
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

fn = to_wire if sys.argv[2] == "now" else old_to_wire
fn(Image.fromarray(np.zeros((64, 64), np.uint16)))  # warm up lazy imports and allocators
before = hwm_kb()
im = load_image(sys.argv[1])
w, h = im.size
wire = fn(im)
after = hwm_kb()
print(json.dumps({"pixels": w * h, "mode": im.mode, "before_kb": before, "after_kb": after, "shape": list(wire.shape)}))
"""

SERVER_CHILD = r"""
import json, signal, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits

class Stub:
    # the server's part of the work, with a fixed compute time per batch instead of models
    has_watermark = False
    gmm_threshold = 0.0
    watermark_threshold = 0.5
    def clip_input(self, batch): return batch[:, 0, 0, :1].astype(np.float32)
    def embed(self, x):
        time.sleep(float(sys.argv[2]))
        return np.hstack([x, np.zeros((len(x), 3), np.float32)])
    def gmm_score(self, f): return f[:, 0].astype(np.float64)
    def watermark_input(self, b): raise AssertionError
    def watermark_prob(self, x): raise AssertionError
    def info(self): return {"models": "stub", "thresholds": {}}

cfg = ServerConfig(binds=["tcp://127.0.0.1:*"], limits=Limits(64, 1024 * 1024), max_batch=64, max_queue=1 << 20,
                   max_queued_bytes=int(sys.argv[1]))
server = FilterServer(Stub(), cfg)
print(server.bind()[0], flush=True)
signal.signal(signal.SIGTERM, lambda *_: server.stop())
server.serve_forever()
"""

MODELS_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from anti_sus.pipeline import Pipeline, Task, evaluate
from anti_sus.stages import onnx as onnx_stage

def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

models, precision, batch, budget, rounds = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
if budget == "old":  # before: one model call per request and an arena that keeps its peak
    onnx_stage.SHRINK_ARENA = None
pipe = Pipeline.load(models, int8=precision == "int8", fp32=precision != "int8", threads=int(sys.argv[7]), max_batch=32,
                     memory_budget=None if budget == "old" else int(budget), gmm_threshold=float("-inf"))
images = np.random.default_rng(0).integers(0, 256, (batch, 512, 512, 3), np.uint8)
loaded = kb("VmRSS:")
for _ in range(rounds):
    evaluate(pipe, [Task(images, float("-inf"), 0.5)], watermark_all=True)
print(json.dumps({"loaded": loaded, "peak": kb("VmHWM:"), "after": kb("VmRSS:"),
                  "sub_batch": [pipe.clip.sub_batch, pipe.watermark.sub_batch]}))
"""

SPEED_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from anti_sus.pipeline import Pipeline, Task, evaluate
from anti_sus.stages import onnx as onnx_stage

models, batch, rounds, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
shrink = onnx_stage.SHRINK_ARENA
pipes = {"budgeted": Pipeline.load(models, fp32=True, threads=threads, max_batch=32, gmm_threshold=float("-inf")),
         "unbudgeted": Pipeline.load(models, fp32=True, threads=threads, max_batch=32, memory_budget=None,
                                     gmm_threshold=float("-inf"))}
images = np.random.default_rng(1).integers(0, 256, (batch, 512, 512, 3), np.uint8)
times = {k: [] for k in pipes}
out = {}
for r in range(rounds + 1):  # round 0 warms both up
    for name, pipe in (pipes.items() if r % 2 else reversed(pipes.items())):
        onnx_stage.SHRINK_ARENA = shrink if name == "budgeted" else None  # unbudgeted = the old arena too
        t0 = time.perf_counter()
        o = evaluate(pipe, [Task(images, float("-inf"), 0.5)], watermark_all=True)[0]
        if r:
            times[name].append(time.perf_counter() - t0)
        out[name] = o
same = bool(np.array_equal(out["budgeted"].gmm, out["unbudgeted"].gmm)
            and np.array_equal(out["budgeted"].watermark, out["unbudgeted"].watermark))
print(json.dumps({"times": times, "identical": same}))
"""

MODELS_DIR = REPO / ".cache" / "bench-anti-sus-memory"


def build_real_models(out: Path, threads: int) -> None:
    """ViT-B/16 (fp32 + int8) and tf_efficientnetv2_b0 with random weights, a small GMM on their features."""
    from anti_sus.preprocess import stack_wire
    from models import fit_gmm, synth
    from models.export_clip import export_clip
    from models.export_watermark import export_watermark
    from models.watermark_net import build as build_watermark

    print(f"building real-size models in {out} (once) ...", flush=True)
    export_clip(out, arch="ViT-B-16", pretrained=None, int8=True, threads=threads)
    clip = fit_gmm.ClipModel.from_dir(out)
    imgs = synth.backgrounds(96, seed=1, size=256)
    feats = fit_gmm.encode_wire((stack_wire(imgs[i:i + 16]) for i in range(0, len(imgs), 16)), clip, threads)
    gm, _ = fit_gmm.fit(feats.astype(np.float64), [4], "diag", reg_covar=1e-3)
    fit_gmm.save(out, gm, feats.astype(np.float64), clip, percentile=5.0, sweep=[], source="bench/anti_sus_memory.py")
    export_watermark(build_watermark("tf_efficientnetv2_b0"), out, arch="tf_efficientnetv2_b0", threads=threads,
                     provenance={"pretrained": "none", "built_by": "bench/anti_sus_memory.py"})


def _child(code: str, *args: object) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(REPO), *map(str, args)], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"bench child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_models(models: Path, *, batch: int, repeats: int, rounds: int, speed_rounds: int,
                   threads: int) -> dict[str, float | str]:
    """Peak RSS per configuration (median of ``repeats`` fresh processes) and the budgeted/unbudgeted throughput."""
    from anti_sus.defaults import DEFAULT_MEMORY_BUDGET

    from anti_sus.modeldir import open_model_dir

    has_int8 = "clip_int8" in open_model_dir(models)  # the tiny models' int8 may not pass the int8 gate
    configs = [(p, b, bud) for p in (["fp32", "int8"] if has_int8 else ["fp32"])
               for b, bud in ((1, DEFAULT_MEMORY_BUDGET), (batch, DEFAULT_MEMORY_BUDGET), (batch, "old"))]
    res: dict[str, float | str] = {"cpu": cpu_model(), "models": str(models.name), "default_batch": float(batch),
                                   "memory_budget_mib": DEFAULT_MEMORY_BUDGET / MB}
    for precision, b, budget in configs:
        runs = [_child(MODELS_CHILD, models, precision, b, budget, rounds, threads) for _ in range(repeats)]
        key = f"{precision}_batch{b}_{'old' if budget == 'old' else 'budget'}"
        res[f"peak_rss_mb_{key}"] = statistics.median(r["peak"] for r in runs) / MB
        res[f"after_rss_mb_{key}"] = statistics.median(r["after"] for r in runs) / MB
        res[f"sub_batch_{key}"] = "clip {} / watermark {}".format(*runs[0]["sub_batch"])
    speed = _child(SPEED_CHILD, models, batch, speed_rounds, threads)
    for name, times in speed["times"].items():
        res[f"img_per_s_{name}"] = batch / statistics.median(times)
    # Median of the per-round ratios: both ran back to back in each round, so load from other jobs mostly cancels.
    res["throughput_budgeted_vs_unbudgeted"] = statistics.median(
        u / b for b, u in zip(speed["times"]["budgeted"], speed["times"]["unbudgeted"]))
    res["scores_identical"] = "yes" if speed["identical"] else "NO"
    return res


def collect(quick: bool) -> dict[str, float | str]:
    """The models part for bench/report.py: real-size models, or (``quick``) tiny ones in seconds."""
    if quick:
        from models import tiny

        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            d = tiny.build(Path(tmp) / "models", n_images=32, int8=True)
            return measure_models(d, batch=4, repeats=1, rounds=1, speed_rounds=1, threads=1)
    if not (MODELS_DIR / "manifest.json").is_file():
        build_real_models(MODELS_DIR, os.cpu_count() or 1)
    return measure_models(MODELS_DIR, batch=32, repeats=3, rounds=2, speed_rounds=5, threads=os.cpu_count() or 1)


def part_models(res: dict[str, float | str]) -> None:
    print(f"\n## models ({res['models']}; batch of {res['default_batch']:.0f}, "
          f"watermark stage on every image; --memory-budget {res['memory_budget_mib']:.0f} MiB; medians of fresh processes)")
    print("| CLIP | batch | model calls | sub-batch (clip / watermark) | peak RSS | RSS after |")
    print("|---|---|---|---|---|---|")
    for key in [k[len("peak_rss_mb_"):] for k in res if k.startswith("peak_rss_mb_")]:
        precision, b, how = key.split("_")
        label = "one per request, arena keeps its peak (before)" if how == "old" else "budgeted, arena shrinks (now)"
        print(f"| {precision} | {b[5:]} | {label} | {res['sub_batch_' + key]} | {res['peak_rss_mb_' + key]:.0f} MB "
              f"| {res['after_rss_mb_' + key]:.0f} MB |")
    print(f"\nthroughput, fp32, interleaved in one process: budgeted {res['img_per_s_budgeted']:.2f} img/s, "
          f"unbudgeted {res['img_per_s_unbudgeted']:.2f} img/s, budgeted/unbudgeted (median of per-round ratios) "
          f"{res['throughput_budgeted_vs_unbudgeted']:.3f}; "
          f"scores identical: {res['scores_identical']}")




def write_png16(path: Path, width: int, height: int) -> None:
    from PIL import Image

    # A smooth 16-bit gradient: tiny as a PNG, every value above 255 (so it is scaled, not clipped).
    row = np.linspace(256, 65535, width).astype(np.uint16)
    Image.fromarray(np.broadcast_to(row, (height, width)).copy()).save(path, compress_level=9)


def decode(path: Path, variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", DECODE_CHILD, str(path), variant, str(REPO)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"decode child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def part_decode(width: int, height: int) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "grey16.png"
        write_png16(png, width, height)
        jpg = Path(tmp) / "rgb.jpg"
        Image.new("RGB", (width, height), (90, 140, 200)).save(jpg, quality=90)
        print(f"\n## decoding ({width}x{height}; 16-bit PNG {png.stat().st_size / 1024:.0f} KB)")
        print("| input | code | peak RSS over baseline | bytes/pixel |")
        print("|---|---|---|---|")
        for label, path, variant in (("16-bit grey PNG", png, "old"), ("16-bit grey PNG", png, "now"),
                                     ("8-bit RGB JPEG", jpg, "now")):
            r = decode(path, variant)
            delta = (r["after_kb"] - r["before_kb"]) * 1024
            name = "before (float64 to_rgb)" if variant == "old" else "now"
            print(f"| {label} ({r['mode']}) | {name} | {delta / MB:.0f} MB | {delta / r['pixels']:.1f} |")


def vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_queue(limit: int, clients: int, per_client: int, batch_seconds: float) -> dict:
    import zmq

    proc = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, str(limit), str(batch_seconds), str(REPO)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        idle = vmhwm(proc.pid)
        payload = np.full((64, 1024, 1024, 3), 150, np.uint8)
        header = json.dumps({"v": 1, "op": "filter", "shape": list(payload.shape), "dtype": "uint8"}).encode()
        counts = {"ok": 0, "busy": 0, "other": 0}
        lock = threading.Lock()
        ctx = zmq.Context()

        def client(k: int) -> None:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            for i in range(per_client):  # all at once: a client with several requests outstanding
                s.send_multipart([b"", header, payload.data], copy=False)
            for _ in range(per_client):
                if not s.poll(300_000):
                    break
                reply = json.loads(s.recv_multipart()[1])
                key = "ok" if reply["ok"] else reply["error"]["code"] if reply["error"]["code"] == "busy" else "other"
                with lock:
                    counts[key] += 1
            s.close(0)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = vmhwm(proc.pid)
        ctx.term()
        return {"limit": limit, "idle": idle, "peak": peak, **counts}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def part_queue(limits: list[int], clients: int, per_client: int, batch_seconds: float) -> None:
    size = 64 * 1024 * 1024 * 3
    print(f"\n## queued work ({clients} clients x {per_client} requests of {size / 1e6:.0f} MB, sent at once; "
          f"{batch_seconds:g} s per batch)")
    print("| --max-queued-bytes | served | busy | server peak RSS (VmHWM) |")
    print("|---|---|---|---|")
    for limit in limits:
        r = run_queue(limit, clients, per_client, batch_seconds)
        print(f"| {limit / MB:.0f} MiB | {r['ok']} | {r['busy']} | {r['peak'] / MB:.0f} MB (idle {r['idle'] / MB:.0f} MB) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=6500)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--batch-seconds", type=float, default=0.5)
    ap.add_argument("--limits", default="16384,1024,512", help="--max-queued-bytes values in MiB, comma-separated")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-queue", action="store_true")
    ap.add_argument("--skip-models", action="store_true")
    a = ap.parse_args()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        have = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
        flags = " ".join(f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have)
    except (OSError, StopIteration):
        pass
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores visible; flags: {flags})")
    if not a.skip_decode:
        part_decode(a.width, a.height)
    if not a.skip_queue:
        part_queue([int(x) * MB for x in a.limits.split(",")], a.clients, a.per_client, a.batch_seconds)
    if not a.skip_models:
        part_models(collect(False))


if __name__ == "__main__":
    main()
