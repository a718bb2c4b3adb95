"""gallery_bridge benchmark: ingest throughput and near-duplicate lookup time.

    .venv/bin/python bench/gallery.py [--images 12] [--size 3000x2000] [--sizes 10000,100000,1000000]

Prints medians measured side by side in one run:

1. ingest into the folder target (decode + checks, hashes, original + thumbnail
   written with fsync, catalogue commits, index.html), in-process and through
   the ZeroMQ service on loopback; and per image, side by side on the same
   files, the one reduced decode (JPEG draft) against the former full decode
   (stages: decode, hashes, thumbnail);
2. near-duplicate lookup among N stored hashes: the packed-uint64 popcount index
   against unpacked-bool numpy (and a Python loop over imagehash objects at
   10k), plus the whole ``Deduplicator.find`` for a new image and for a
   cropped copy of a stored one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402
from gallery_bridge import dedup as D  # noqa: E402
from stack.emulator import photos as T  # noqa: E402
from gallery_bridge.catalogue import Catalogue  # noqa: E402
from gallery_bridge.client import IngestClient  # noqa: E402
from gallery_bridge.ingest import Ingester  # noqa: E402
from gallery_bridge.server import Server, ServerConfig  # noqa: E402
from gallery_bridge.targets.folder import FolderTarget  # noqa: E402
from gallery_bridge.thumbnails import make_thumbnail  # noqa: E402
from gallery_bridge.validate import Limits, Meta, check_image  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def full_decode(data: bytes, limits: Limits):
    """The former ingest decode: check_image with the reduction switched off (every pixel decoded)."""
    from PIL import Image

    from gallery_bridge import validate

    saved = validate.reduction
    validate.reduction = lambda w, h, steps=None: 1  # type: ignore[assignment]
    try:
        checked = check_image(data, limits)
    finally:
        validate.reduction = saved
    assert isinstance(checked.image, Image.Image)
    return checked


def stage_costs(payloads: list[bytes], repeat: int) -> dict[str, float]:
    """Median ms per stage, reduced vs full decode, interleaved on the same files."""
    limits = Limits()
    times: dict[str, list[float]] = {f"{p}_{s}": [] for p in ("reduced", "full") for s in ("decode", "hashes", "thumb")}
    for decode in (check_image, full_decode):  # warm-up: first calls import scipy and fill caches
        img = decode(payloads[0], limits)
        D.fingerprint(img.image)
        make_thumbnail(img.image)
    for _ in range(repeat):
        for data in payloads:
            for path, decode in (("reduced", check_image), ("full", full_decode)):
                t0 = time.perf_counter()
                img = decode(data, limits)
                t1 = time.perf_counter()
                D.fingerprint(img.image)
                t2 = time.perf_counter()
                make_thumbnail(img.image)
                t3 = time.perf_counter()
                for stage, took in (("decode", t1 - t0), ("hashes", t2 - t1), ("thumb", t3 - t2)):
                    times[f"{path}_{stage}"].append(1000 * took)
    out = {k: statistics.median(v) for k, v in times.items()}
    for path in ("reduced", "full"):
        out[f"{path}_total"] = sum(out[f"{path}_{s}"] for s in ("decode", "hashes", "thumb"))
    out["speedup"] = out["full_total"] / out["reduced_total"]
    return out


def bench_ingest(n_images: int, size: tuple[int, int] = (3000, 2000), repeat: int = 3) -> dict[str, float]:
    """Print the ingest figures; return them for bench/report.py."""
    print(f"== ingest into the folder target: {n_images} distinct {size[0]}x{size[1]} JPEGs (quality 92)")
    payloads = [T.encode(T.photo(1000 + i, size), quality=92) for i in range(n_images)]
    limits = Limits()
    stages = stage_costs(payloads[: min(4, n_images)], repeat)
    with tempfile.TemporaryDirectory() as tmp:
        target = FolderTarget(Path(tmp) / "inproc")
        ing = Ingester(Catalogue(target.catalogue_path), target)
        per = []
        t0 = time.perf_counter()
        for i, data in enumerate(payloads):
            s = time.perf_counter()
            out = ing.ingest(f"bench:{i}", Meta(title=f"b{i}"), check_image(data, limits))
            per.append(time.perf_counter() - s)
            assert out.status == "added", out
        inproc = n_images / (time.perf_counter() - t0)
        ing.close()

        target = FolderTarget(Path(tmp) / "zmq")
        ing = Ingester(Catalogue(target.catalogue_path), target)
        server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        with IngestClient(server.endpoint, timeout=60, retries=0) as client:
            t0 = time.perf_counter()
            for i, data in enumerate(payloads):
                assert client.ingest(f"bench:{i}", {"title": f"b{i}"}, data).status == "added"
            over_zmq = n_images / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i, data in enumerate(payloads):
                assert client.ingest(f"bench:{i}", {}, data).status == "duplicate"
            redeliver = n_images / (time.perf_counter() - t0)
        server.stop()
        thread.join()
        ing.close()
    print(f"  per image, median, side by side on the same files ({repeat} rounds):")
    print(f"  {'':>20}  {'decode+checks':>13}  {'hashes':>7}  {'thumbnail':>9}  {'total':>7}")
    for path, label in (("reduced", "one reduced decode"), ("full", "full decode (old)")):
        print(f"  {label:>20}  {stages[path + '_decode']:10.1f} ms  {stages[path + '_hashes']:4.1f} ms"
              f"  {stages[path + '_thumb']:6.1f} ms  {stages[path + '_total']:4.1f} ms")
    print(f"  speed-up of decode+hashes+thumbnail: {stages['speedup']:.2f}x")
    print(f"  in-process ingest: {inproc:.2f} images/s (median {1000 * statistics.median(per):.1f} ms per image)")
    print(f"  through the ZeroMQ service: {over_zmq:.2f} images/s  (ratio to in-process {over_zmq / inproc:.2f})")
    print(f"  redelivery (duplicate by key): {redeliver:.1f} images/s  ({redeliver / over_zmq:.0f}x a new image)")
    return {
        "ingest_reduced_ms": round(stages["reduced_total"], 1),
        "ingest_full_decode_ms": round(stages["full_total"], 1),
        "ingest_decode_speedup": round(stages["speedup"], 2),
        "thumbnail_reduced_ms": round(stages["reduced_thumb"], 1),
        "thumbnail_full_decode_ms": round(stages["full_thumb"], 1),
        "ingest_inproc_img_s": round(inproc, 2),
        "ingest_zmq_img_s": round(over_zmq, 2),
    }




def collect(quick: bool) -> dict[str, float | str]:
    """The ingest figures for bench/report.py: quick=True runs in seconds (small images, few rounds)."""
    if quick:
        figures: dict[str, float | str] = dict(bench_ingest(2, (3000, 2000), repeat=1))
    else:
        figures = dict(bench_ingest(12, (3000, 2000), repeat=3))
    figures["cpu"] = cpu_model()
    return figures


def bench_lookup(sizes: list[int]) -> None:
    print("== near-duplicate lookup among N stored hashes (median of 9 queries)")
    rng = np.random.default_rng(0)
    top = max(sizes)
    phashes = rng.integers(0, 2**63, size=(top, D.PHASH_WORDS), dtype=np.int64).view(np.uint64)
    coarse = rng.integers(0, 2**63, size=(top, 1), dtype=np.int64).view(np.uint64)
    photo = T.photo(5, (800, 600))
    query = D.fingerprint(photo)
    stored_copy = D.fingerprint(T.crop_fraction(photo, left=0.02, top=0.01))  # the duplicate, when present
    unrelated = D.fingerprint(T.photo(6, (800, 600))).signature
    print(f"  {'hashes':>9}  {'popcount scan':>13}  {'unpacked bools':>14}  {'ratio':>6}  {'imagehash loop':>14}"
          f"  {'find(): new':>11}  {'find(): crop dup':>16}")
    for n in sizes:
        index = D.HashIndex(D.PHASH_WORDS)
        index.add_many(np.arange(n), phashes[:n])
        q = phashes[n // 2].copy()
        t_packed = median_ms(lambda: index.search([q], 64), 9)
        if n <= 100_000:
            bits = np.unpackbits(phashes[:n].view(np.uint8), axis=1).astype(bool)
            qbits = np.unpackbits(q.view(np.uint8)).astype(bool)
            t_bool = median_ms(lambda: np.flatnonzero((bits != qbits).sum(axis=1) <= 64), 9)
            bool_txt, ratio = f"{t_bool:11.1f} ms", f"{t_bool / t_packed:5.0f}x"
            del bits
        else:
            bool_txt, ratio = f"{'(576 MB)':>14}", f"{'':>6}"
        if n <= 10_000:
            import imagehash

            def as_obj(h: np.ndarray) -> imagehash.ImageHash:
                return imagehash.ImageHash(np.unpackbits(h.astype(">u8").view(np.uint8)).astype(bool).reshape(24, 24))

            objs = [as_obj(h) for h in phashes[:n]]
            qh = as_obj(q)
            t_loop = median_ms(lambda: [i for i, h in enumerate(objs) if h - qh <= 64], 3)
            loop_txt = f"{t_loop:11.1f} ms"
        else:
            loop_txt = f"{'(skipped)':>14}"
        # Random stored hashes stand in for the gallery; coarse-hash candidates
        # (~3 per 10k at random) get the unrelated signature and stop at the gate.
        dd = D.Deduplicator(D.DedupConfig(), lambda i: stored_copy.signature if i == n else unrelated)
        dd.phash.add_many(np.arange(n), phashes[:n])
        dd.coarse.add_many(np.arange(n), coarse[:n])
        t_new = median_ms(lambda: dd.find(query), 9)
        dd.phash.add(n, stored_copy.phash)
        dd.coarse.add(n, stored_copy.coarse)
        assert (m := dd.find(query)) is not None and m.entry_id == n and m.reason == "crop"
        t_dup = median_ms(lambda: dd.find(query), 9)
        print(f"  {n:>9,}  {t_packed:10.1f} ms  {bool_txt}  {ratio}  {loop_txt}  {t_new:8.1f} ms  {t_dup:13.1f} ms")
    print("  popcount scan: one 576-bit query; find(): the image and its mirror in one scan, coarse")
    print("  candidates, gate, and (crop dup) one crop-aligned verification of the 2%-cropped copy.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12, help="images for the ingest benchmark")
    ap.add_argument("--size", default="3000x2000", help="photo size WxH for the ingest benchmark")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="index sizes for the lookup benchmark")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    bench_ingest(args.images, tuple(int(x) for x in args.size.lower().split("x")))  # type: ignore[arg-type]
    bench_lookup([int(x) for x in args.sizes.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
