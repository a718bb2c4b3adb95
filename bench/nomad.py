"""Benchmark nomad's image path: JPEG decode to the wire (new, old, full), and loopback download throughput.

    python -m bench.nomad [--images 4] [--repeats 3] [--workers 4] [--downloads 24] [--decode-only]

1. decode + resize of large JPEGs to the wire input (``uint8[512,512,3]``,
   ``photocore.wireimage.to_wire``), three paths side by side on the same bytes:
   ``nomad.images.decode`` (DCT draft at the largest 1/k whose short side is
   >= 95% of the wire, squashed over the draft's exact extent, oriented after),
   the previous path (draft only while both sides stay >= 1.5x the wire, then
   exif_transpose + to_wire: 1/2 for 3000x2000), and the full decode. Median
   wall and CPU (this thread's) ms per image, and each path's difference from
   the full decode (mean and 99th percentile, grey levels).
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

from bench.machine import cpu_model  # noqa: E402
from nomad.http import HttpClient, HttpConfig  # noqa: E402
from nomad.images import decode, draft_scale  # noqa: E402
from photocore.wireimage import WIRE_SIZE, to_wire  # noqa: E402
from stack.emulator import images as emulator_images  # noqa: E402

OLD_DRAFT_SIDE = int(1.5 * WIRE_SIZE)
"""The previous rule: Pillow's draft at (768, 768), i.e. both sides of the draft >= 1.5x the wire."""


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


def old_decode(data: bytes) -> np.ndarray:
    """nomad's previous path: 1/2 draft for 3000x2000 (both sides >= 768), upright copy, then squash."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (OLD_DRAFT_SIDE, OLD_DRAFT_SIDE))
        im.load()
        return to_wire(ImageOps.exif_transpose(im) or im)


def time_each(fn: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> list[tuple[float, float]]:
    """(wall, this thread's CPU) seconds per call: CPU is what a shared 2-core machine loses to nomad."""
    times = []
    for _ in range(repeats):
        for b in blobs:
            t0, c0 = time.perf_counter(), time.thread_time()
            fn(b)
            times.append((time.perf_counter() - t0, time.thread_time() - c0))
    return times


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()


DECODE_CASES: dict[str, Callable[[int], bytes]] = {
    # The e2e benchmark's photos: the emulator's smooth colour fields, ~0.3 MB.
    "3000x2000 emulator": lambda seed: emulator_images.picture(3000, 2000, "jpeg", 1001 + seed),
    "3000x2000 grain 10": lambda seed: photo_like(3000, 2000, seed, 10.0),
    "2000x3000 grain 10, EXIF 6": lambda seed: _rotated(photo_like(2000, 3000, seed, 10.0), 6),
    "4000x3000 grain 10": lambda seed: photo_like(4000, 3000, seed, 10.0),
    "1600x1200 grain 10": lambda seed: photo_like(1600, 1200, seed, 10.0),
}


def _rotated(data: bytes, orientation: int) -> bytes:
    """The same pixels re-encoded (q90) with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def bench_decode(n_images: int, repeats: int, cases: list[str] | None = None) -> dict[str, dict[str, float]]:
    """New vs old vs full decode per case, interleaved so background load hits all three alike."""
    paths: dict[str, Callable[[bytes], np.ndarray]] = {
        "new (nomad)": lambda b: decode(b).wire, "old (1.5x rule)": old_decode, "full decode": full_decode,
    }
    results: dict[str, dict[str, float]] = {}
    print(f"decode -> {WIRE_SIZE}x{WIRE_SIZE}x3 wire, {n_images} images x {repeats}; "
          "difference from the full decode in grey levels (mean / 99th percentile)")
    for name in cases or list(DECODE_CASES):
        blobs = [DECODE_CASES[name](seed) for seed in range(n_images)]
        with Image.open(io.BytesIO(blobs[0])) as im:
            w, h = im.size
            old_k = min(w // OLD_DRAFT_SIDE, h // OLD_DRAFT_SIDE)
        old_k = max(s for s in (1, 2, 4, 8) if s <= max(old_k, 1))
        ref = [full_decode(b) for b in blobs]
        diffs = {p: np.concatenate([_difference(fn(b), r) for b, r in zip(blobs, ref)]) for p, fn in paths.items()}
        times: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
        for _ in range(repeats):
            for p, fn in paths.items():
                times[p] += time_each(fn, blobs, 1)
        mb = statistics.mean(len(b) for b in blobs) / 1e6
        print(f"  {name} ({mb:.1f} MB avg; draft 1/{draft_scale(w, h)} new, 1/{old_k} old)")
        row: dict[str, float] = {}
        for p in paths:
            wall = statistics.median(t[0] for t in times[p]) * 1000
            cpu = statistics.median(t[1] for t in times[p]) * 1000
            d = diffs[p]
            print(f"    {p:16s}: {wall:7.1f} ms wall {cpu:7.1f} ms cpu   diff {d.mean():.2f} / {np.percentile(d, 99):.0f}")
            row[f"{p.split()[0]}_cpu_ms"] = cpu
            row[f"{p.split()[0]}_mean"] = float(d.mean())
        print(f"    {'old/new cpu':16s}: {row['old_cpu_ms'] / row['new_cpu_ms']:7.2f}x")
        results[name] = row
    return results


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
    ap.add_argument("--images", type=int, default=4, help="distinct JPEGs per decode case")
    ap.add_argument("--repeats", type=int, default=3, help="passes over them")
    ap.add_argument("--downloads", type=int, default=24, help="images per download round")
    ap.add_argument("--workers", type=int, default=4, help="thread-pool size compared with 1")
    ap.add_argument("--rounds", type=int, default=3, help="download rounds per configuration")
    ap.add_argument("--delay-ms", type=float, default=100.0, help="emulated server latency for the second download run")
    ap.add_argument("--decode-only", action="store_true", help="skip the download benchmark")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, Pillow {Image.__version__}, {os.cpu_count()} cpu: {cpu_model()}")
    bench_decode(args.images, args.repeats)
    if args.decode_only:
        return 0
    bench_download(args.downloads, args.workers, args.rounds, 0.0)
    bench_download(args.downloads, args.workers, args.rounds, args.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
