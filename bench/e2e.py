"""Benchmark: end-to-end images/s (nomad -> anti_sus -> gallery_bridge) vs anti_sus alone.

Both are measured in the same run, in interleaved rounds, on the same images:
N large JPEG photos (3000x2000 by default) served by the loopback emulator as
reddit posts, and the same server process with real model architectures and
random weights (CLIP ViT-B/16 + tf_efficientnetv2_b0 + GMM 16 full; built once by
bench/anti_sus.py's code into .cache/bench-anti-sus).

- e2e:        `nomad once` (a fresh state and gallery each round) with permissive
              thresholds so every image travels the whole path: listing, HTTPS
              download with the SSRF guard, safe decode (draft mode), batch to
              anti_sus, ingest with dedup, thumbnail and page into the folder gallery.
              Wall time of the process, start-up included.
- anti_sus:   this process sends the same images, already decoded to the wire
              format, in batches of 32 through the anti_sus client.

    .venv/bin/python bench/e2e.py                  # 64 images, 3 rounds
    .venv/bin/python bench/e2e.py --images 32 --rounds 2
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from anti_sus.client import FilterClient  # noqa: E402
from bench.anti_sus import build_models  # noqa: E402
from nomad import images as nomad_images  # noqa: E402
from stack.procs import Service, free_port, python_module, wait_until  # noqa: E402
from stack.emulator import Emulator, Scenario  # noqa: E402
from stack.emulator.images import picture  # noqa: E402

PERMISSIVE = ["--gmm-threshold=-1e30", "--watermark-threshold=1.0"]


def scenario_of(n: int, size: tuple[int, int]):
    """A reddit /r/all/new with ``n`` direct i.redd.it photo posts of ``size``."""
    def make(port: int) -> Scenario:
        s = Scenario(port)
        for i in range(n):
            url = s.add_image("i.redd.it", f"bench{i:04d}.jpeg", *size, seed=1000 + i)
            s.add_post(f"be{i:04d}", url, preview=size, subreddit="EarthPorn")
        return s
    return make


def wire_batch(emu: Emulator, n: int) -> np.ndarray:
    """The same images nomad will download, decoded to the wire format (done once, outside the timing)."""
    out = []
    for i in range(n):
        res = emu.scenario.files[("i.redd.it", f"/bench{i:04d}.jpeg")]
        out.append(nomad_images.decode(picture(res.width, res.height, res.fmt, res.seed)).wire)
    return np.stack(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="3000x2000", help="photo size WxH")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ONNX Runtime threads in anti_sus")
    ap.add_argument("--models", type=Path, default=REPO / ".cache" / "bench-anti-sus")
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.lower().split("x"))
    if not (args.models / "manifest.json").is_file():
        args.models.mkdir(parents=True, exist_ok=True)
        build_models(args.models, args.threads, 256)

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    a_ep, g_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    anti = Service("anti_sus", python_module("anti_sus", "serve", "--models", str(args.models), "--bind", a_ep,
                                             "--threads", str(args.threads)), work / "anti_sus.log").start()
    e2e_rates: list[float] = []
    alone_rates: list[float] = []
    try:
        with Emulator(scenario_of(args.images, size), rate_limit=10_000) as emu:
            batch = wire_batch(emu, args.images)
            with FilterClient(a_ep, timeout=600, retries=0) as client:
                wait_until(lambda: _pings(client), 120, 0.5, "anti_sus")
                client.filter(batch[:2], **_permissive())  # warm-up: first ORT runs allocate
                for r in range(args.rounds):
                    t = time.perf_counter()
                    for i in range(0, args.images, 32):
                        client.filter(batch[i:i + 32], **_permissive())
                    alone_rates.append(args.images / (time.perf_counter() - t))

                    gallery_dir, state = work / f"gallery{r}", work / f"state{r}"
                    gal = Service("gallery_bridge", python_module("gallery_bridge", "serve", "--bind", g_ep, "--target",
                                                                  f"folder:{gallery_dir}"), work / f"gallery{r}.log").start()
                    try:
                        cmd = python_module("nomad", "once", *emu.nomad_args(), *PERMISSIVE, "--state-dir", str(state),
                                            "--anti-sus", a_ep, "--gallery", g_ep, "--batch-size", "32",
                                            "--workers", "4", "--log-format", "json")
                        t = time.perf_counter()
                        proc = subprocess.run(cmd, env={**os.environ, **emu.nomad_env()}, capture_output=True, text=True, timeout=1800)
                        took = time.perf_counter() - t
                    finally:
                        gal.stop()
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:])
                        return 1
                    got = _delivered(state)
                    if got != args.images:
                        print(f"round {r}: nomad delivered {got} of {args.images} images; see {work}")
                        return 1
                    e2e_rates.append(args.images / took)
                    print(f"round {r + 1}: anti_sus alone {alone_rates[-1]:.2f} img/s, e2e {e2e_rates[-1]:.2f} img/s", flush=True)
    finally:
        anti.stop()
    a, e = statistics.median(alone_rates), statistics.median(e2e_rates)
    print(f"\n{args.images} photos {size[0]}x{size[1]}, {args.rounds} rounds, {os.cpu_count()} cores, medians:")
    print(f"  anti_sus alone (client -> server, wire batches of 32): {a:7.2f} img/s")
    print(f"  end to end (nomad once -> anti_sus -> gallery_bridge):  {e:7.2f} img/s")
    print(f"  ratio e2e / anti_sus alone: {e / a:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _delivered(state: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{state / 'nomad.sqlite3'}?mode=ro", uri=True) as con:
        return int(con.execute("SELECT COUNT(*) FROM images WHERE state = 'delivered'").fetchone()[0])


def _permissive() -> dict[str, float]:
    return {"gmm_threshold": -1e30, "watermark_threshold": 1.0}


def _pings(client: FilterClient) -> bool:
    try:
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


if __name__ == "__main__":
    raise SystemExit(main())
