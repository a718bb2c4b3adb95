"""Benchmark: anti_sus peak memory (RSS), for docs/anti_sus.md. Memory only, no timing claims.

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

    .venv/bin/python bench/anti_sus_memory.py                  # both parts
    .venv/bin/python bench/anti_sus_memory.py --skip-queue     # decoding only (needs ~1.5 GB free)

Part 2 holds up to ~3.5 GB in the unbounded case; run it on a machine with that much free.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


if __name__ == "__main__":
    main()
