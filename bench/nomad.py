"""Benchmark nomad's image path: draft vs full JPEG decode, and loopback download throughput.

    python -m bench.nomad [--images 6] [--repeats 3] [--workers 4] [--downloads 24]

1. decode + resize of 12-megapixel (4000x3000) JPEGs to the wire input
   (``uint8[512,512,3]`` via ``anti_sus.preprocess.to_wire``): ``nomad.images.decode``
   (JPEG draft mode) vs a full decode of the same bytes; median per image and ratio.
2. download + decode throughput against the loopback emulator (real TLS, SSRF
   guard on, ``--resolve`` pins; the emulator in its own process), 1 worker vs N
   workers in a thread pool, same run: once with an instant server, once with an
   emulated server latency (``--delay-ms``), which is what workers are for.

Every figure is a median measured side by side in this one run.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Callable

from pathlib import Path

# Run as a script, bench/ is sys.path[0], where bench/anti_sus.py would shadow the anti_sus package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from anti_sus.preprocess import to_wire  # noqa: E402
from nomad.http import HttpClient, HttpConfig
from nomad.images import decode


def photo_like(width: int, height: int, seed: int, grain_std: float = 10.0) -> bytes:
    """A JPEG with photo-like entropy: a smooth colour field plus fine grain (quality 90).

    Grain sets the entropy: 10 gives ~4.5 MB per 12 MP (a phone photo), 0 a smooth ~1 MB file.
    """
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 150 + 2, width // 150 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC), np.int16)
    grain = rng.normal(0, grain_std, size=(height, width, 1)).astype(np.int16)
    arr = np.clip(base + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def full_decode(data: bytes) -> np.ndarray:
    """The naive path: decode every pixel, then the same contract resize."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_wire(ImageOps.exif_transpose(im) or im)


def time_each(fn: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for b in blobs:
            t0 = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - t0)
    return times


def bench_decode(n_images: int, repeats: int, grain_std: float) -> dict[str, float]:
    blobs = [photo_like(4000, 3000, seed, grain_std) for seed in range(n_images)]
    mb = statistics.mean(len(b) for b in blobs) / 1e6
    # Warm-up, and agreement between both paths (draft must not change the picture much).
    drift = float(np.mean([np.abs(decode(b).wire.astype(int) - full_decode(b).astype(int)).mean() for b in blobs[:2]]))
    # Interleave the two paths so background load hits both alike.
    draft_t: list[float] = []
    full_t: list[float] = []
    for _ in range(repeats):
        draft_t += time_each(lambda b: decode(b), blobs, 1)
        full_t += time_each(full_decode, blobs, 1)
    d, f = statistics.median(draft_t), statistics.median(full_t)
    print(f"decode 4000x3000 JPEG, grain {grain_std:g} ({mb:.1f} MB avg, {n_images} images x {repeats}) -> 512x512x3")
    print(f"  full decode + resize : {f * 1000:7.1f} ms median")
    print(f"  draft mode (nomad)   : {d * 1000:7.1f} ms median")
    print(f"  ratio full/draft     : {f / d:7.2f}x   (mean abs difference {drift:.2f} levels)")
    return {"full_ms": f * 1000, "draft_ms": d * 1000, "ratio": f / d}


def _serve(conn: Connection, n: int, delay: float) -> None:
    """Child process: the emulator with ``n`` images spread over four hosts."""
    from stack.emulator import Emulator, Scenario

    scn = Scenario()
    with Emulator(scn) as emu:
        hosts = ["i.redd.it", "i.imgur.com", "live.staticflickr.com", "cdn.photohost.example"]
        urls = [scn.add_image(hosts[i % len(hosts)], f"bench/{i}.jpg", 2000, 1500, "jpeg", seed=i, delay=delay)
                for i in range(n)]
        conn.send((emu.resolve_entries(), emu.ca_bundle, urls))
        conn.recv()  # until the parent is done


def bench_download(n: int, workers: int, rounds: int, delay: float) -> dict[str, float]:
    # The emulator runs in its own process, as a remote server would: it does not
    # share this process's GIL with the downloading and decoding threads.
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, n, delay), daemon=True)
    proc.start()
    try:
        resolve, ca_bundle, urls = parent.recv()
        cfg = HttpConfig(resolve=resolve, ca_bundle=ca_bundle, per_host=2, retries=0)
        # Fetch every image once up front (the emulator caches the encoded bytes).
        with HttpClient(cfg) as c:
            for u in urls:
                c.download_image(u)
        total_mb = 0.0

        def run(k: int) -> float:
            nonlocal total_mb
            with HttpClient(cfg) as client, ThreadPoolExecutor(k) as pool:
                t0 = time.perf_counter()
                sizes = list(pool.map(lambda u: _fetch_decode(client, u), urls))
                dt = time.perf_counter() - t0
            total_mb = sum(sizes) / 1e6
            return n / dt

        one, many = [], []
        for _ in range(rounds):
            one.append(run(1))
            many.append(run(workers))
    finally:
        parent.send("stop")
        proc.join(10)
    o, m = statistics.median(one), statistics.median(many)
    print(f"download + decode, loopback HTTPS (emulator in its own process, guard on), server delay {delay * 1000:.0f} ms,")
    print(f"  {n} x 2000x1500 JPEG ({total_mb:.1f} MB) over 4 hosts, per-host limit 2, {rounds} rounds")
    print(f"  1 worker             : {o:7.1f} img/s median")
    print(f"  {workers} workers            : {m:7.1f} img/s median")
    print(f"  ratio                : {m / o:7.2f}x   (cpu cores: {os.cpu_count()})")
    return {"one": o, "many": m, "ratio": m / o}


def _fetch_decode(client: HttpClient, url: str) -> int:
    dl = client.download_image(url)
    decode(dl.data)
    return len(dl.data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nomad", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6, help="distinct 12-MP JPEGs for the decode benchmark")
    ap.add_argument("--repeats", type=int, default=3, help="passes over them")
    ap.add_argument("--downloads", type=int, default=24, help="images per download round")
    ap.add_argument("--workers", type=int, default=4, help="thread-pool size compared with 1")
    ap.add_argument("--rounds", type=int, default=3, help="download rounds per configuration")
    ap.add_argument("--delay-ms", type=float, default=100.0, help="emulated server latency for the second download run")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, Pillow {Image.__version__}, {os.cpu_count()} cpu")
    for grain in (10.0, 0.0):
        bench_decode(args.images, args.repeats, grain)
    bench_download(args.downloads, args.workers, args.rounds, 0.0)
    bench_download(args.downloads, args.workers, args.rounds, args.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
