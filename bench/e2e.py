"""Benchmark: end-to-end images/s (nomad -> anti_sus -> gallery_bridge) vs anti_sus alone.

Both are measured in the same run, in interleaved rounds, on the same images:
N large JPEG photos (3000x2000 by default) served by the loopback emulator as
reddit posts, and the same server process with real model architectures and
random weights (CLIP ViT-B/16 + tf_efficientnetv2_b0 + GMM 16 full; built once by
bench/anti_sus.py's code into .cache/bench-anti-sus).

- e2e:        `nomad once --source reddit` (a fresh state and gallery each round) with permissive
              thresholds so every image travels the whole path: listing, HTTPS
              download with the SSRF guard, safe decode (draft mode), batch to
              anti_sus, ingest with dedup, thumbnail and page into the folder gallery.
              Wall time of nomad's process, its start-up included; anti_sus
              and gallery_bridge are services already running (the gallery
              is fresh in each run, and answers a ping before the clock starts).
- e2e steady: in each round also `nomad once` over feeds of N/2 and 3N/2
              photos; N / (t(3N/2) - t(N/2)) is the rate of a crawl that is
              under way: start-up, the first batch's fill and the last batch's
              delivery are in both runs and cancel out. (3N/2 stays within one
              reddit listing page of 100 posts: a first run reads one page.) This is the
              figure that matters for a crawler that runs for months, so the
              goal (>= 0.85x anti_sus alone) is checked on it as well as on
              the whole one-shot run.
- anti_sus:   this process sends the same images, already decoded to the wire
              format, in batches of 32 through the anti_sus client.
- e2e end of cycle (``--end-of-cycle``): the same `nomad once` with
              ``--no-background-delivery`` (the gallery gets every image at the
              end of the cycle instead of each batch while the next is filtered,
              the default), in the same rounds, the two runs alternating which
              goes first: what background delivery gains, side by side.

    .venv/bin/python bench/e2e.py                  # 64 images (and 32, 96 for the steady rate), 3 rounds
    .venv/bin/python bench/e2e.py --images 32 --rounds 2
    .venv/bin/python bench/e2e.py --tiny --profile /tmp/e2e-prof   # where nomad's time goes

``collect(quick)`` returns the figures for bench/report.py (quick: tiny models,
a few small photos, seconds). ``--profile DIR`` runs nomad under cProfile in the
last round and prints its top functions by cumulative time (the gallery's own
per-ingest time is in its log, ``gallery_bridge_ingest_seconds``).
"""
from __future__ import annotations

import argparse
import contextlib
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
from gallery_bridge.client import IngestClient  # noqa: E402
from bench.anti_sus import build_models  # noqa: E402
from nomad import images as nomad_images  # noqa: E402
from stack.procs import Service, free_port, python_module, wait_until  # noqa: E402
from stack.emulator import Emulator, Scenario  # noqa: E402

PERMISSIVE = ["--gmm-threshold=-1e30", "--watermark-threshold=1.0"]
LISTING_PAGE = 100
"""Posts in one reddit listing page: a first run of `nomad once` reads one page, so a feed stays within it."""


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
    """The same images nomad will download, decoded to the wire format (done once, outside the timing).

    Rendering them here also fills the emulator's cache: during the timing it
    serves stored files, as a remote image host would, instead of spending
    ~70 ms of this machine's CPU on making each photo again.
    """
    emu.prerender()
    out = []
    for i in range(n):
        res = emu.scenario.files[("i.redd.it", f"/bench{i:04d}.jpeg")]
        out.append(nomad_images.decode(emu.image_bytes(res)).wire)
    return np.stack(out)


def measure(images: int, rounds: int, size: tuple[int, int], threads: int, models: Path, *,
            tiny: bool = False, profile: Path | None = None, end_of_cycle: bool = False,
            steady: bool = True) -> dict[str, float]:
    """Median img/s of anti_sus alone and of the whole path, measured in interleaved rounds.

    ``end_of_cycle``: also the whole path with ``--no-background-delivery`` in each round.
    ``steady``: also crawls of N/2 and 3N/2 images in each round; the steady
    rate is the extra images over the extra time, ``N / (t(3N/2) - t(N/2))``:
    start-up, the first batch's fill and the last batch's delivery are in both
    runs and cancel, as they do for a crawler that runs for months.
    """
    if not (models / "manifest.json").is_file():
        models.mkdir(parents=True, exist_ok=True)
        if tiny:
            from models import tiny as tiny_models

            tiny_models.build(models, threads=threads)
        else:
            build_models(models, threads, 256)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    a_ep, g_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    anti = Service("anti_sus", python_module("anti_sus", "serve", "--models", str(models), "--bind", a_ep,
                                             "--threads", str(threads)), work / "anti_sus.log").start()
    variants = [("", ())] + ([("eoc", ("--no-background-delivery",))] if end_of_cycle else [])
    rates: dict[str, list[float]] = {tag: [] for tag, _ in variants}
    steady_rates: dict[str, list[float]] = {tag: [] for tag, _ in variants}
    alone_rates: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.callback(anti.stop)
        emu = stack.enter_context(Emulator(scenario_of(images, size), rate_limit=10_000))
        pair = (images // 2, images * 3 // 2)
        if steady and pair[1] > LISTING_PAGE:
            raise RuntimeError(f"the steady figure needs 3N/2 <= {LISTING_PAGE} images (one listing page); N is {images}")
        feeds = [stack.enter_context(Emulator(scenario_of(n, size), rate_limit=10_000)) for n in pair] if steady else []
        batch = wire_batch(emu, images)
        for feed in feeds:
            feed.prerender()
        client = stack.enter_context(FilterClient(a_ep, timeout=600, retries=0))
        wait_until(lambda: _pings(client), 120, 0.5, "anti_sus")
        client.filter(batch[:2], **_permissive())  # warm-up: first ORT runs allocate
        for r in range(rounds):
            t = time.perf_counter()
            for i in range(0, images, 32):
                client.filter(batch[i:i + 32], **_permissive())
            alone_rates.append(images / (time.perf_counter() - t))
            # Alternate which variant goes first: neither always gets the warmer machine.
            for tag, extra in (variants if r % 2 == 0 else variants[::-1]):
                prof = profile if (profile and r == rounds - 1 and not tag) else None
                took = _crawl(emu, images, work / f"r{r}{tag}", a_ep, g_ep, extra, prof)
                rates[tag].append(images / took)
                if feeds:
                    small, big = (_crawl(feed, n, work / f"r{r}{tag}n{n}", a_ep, g_ep, extra, None)
                                  for feed, n in zip(feeds, pair))
                    steady_rates[tag].append((pair[1] - pair[0]) / max(big - small, 1e-9))
            print(f"round {r + 1}: anti_sus alone {alone_rates[-1]:.2f} img/s, "
                  + ", ".join(f"e2e{' ' + tag if tag else ''} {rates[tag][-1]:.2f} img/s"
                              + (f" (steady {steady_rates[tag][-1]:.2f})" if steady_rates[tag] else "")
                              for tag, _ in variants), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    a = statistics.median(alone_rates)
    out = {"anti_sus_alone_img_s": round(a, 2)}
    for tag, _ in variants:
        name = "e2e_end_of_cycle" if tag else "e2e"
        e = statistics.median(rates[tag])
        out.update({f"{name}_img_s": round(e, 2), f"{name}_ratio": round(e / a, 3)})
        if steady_rates[tag]:
            q = statistics.median(steady_rates[tag])
            out.update({f"{name}_steady_img_s": round(q, 2), f"{name}_steady_ratio": round(q / a, 3)})
    return out


def _crawl(emu: Emulator, images: int, work: Path, a_ep: str, g_ep: str, extra: tuple[str, ...],
           profile: Path | None) -> float:
    """One ``nomad once`` over the emulator's feed into a fresh gallery; its wall time (start-up included)."""
    work.mkdir(parents=True)
    gal = Service("gallery_bridge", python_module("gallery_bridge", "serve", "--bind", g_ep, "--target",
                                                  f"folder:{work / 'gallery'}"), work.with_suffix(".gallery.log")).start()
    try:
        # A gallery is a long-running service, like anti_sus: up before the clock starts.
        with IngestClient(g_ep, timeout=2, retries=0) as gallery:
            wait_until(lambda: _pings(gallery), 60, 0.1, "gallery_bridge")
        prof = ["-m", "cProfile", "-o", str(profile / "nomad.prof")] if profile else []
        # --source reddit: the feed is reddit's; polling the three empty key-less sources would only add their
        # fixed listing time (Bluesky's Jetstream waits out an idle end) to every run.
        cmd = [sys.executable, *prof, "-m", "nomad", "once", "--source", "reddit", *emu.nomad_args(), *PERMISSIVE,
               "--state-dir", str(work / "state"), "--anti-sus", a_ep, "--gallery", g_ep, "--batch-size", "32",
               "--workers", "4", "--log-format", "json", *extra]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, **emu.nomad_env()}, capture_output=True, text=True, timeout=1800)
        took = time.perf_counter() - t
    finally:
        gal.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"nomad once failed:\n{proc.stderr[-3000:]}")
    got = _delivered(work / "state")
    if got != images:
        raise RuntimeError(f"nomad delivered {got} of {images} images; see {work}")
    return took


def print_profile(path: Path, top: int = 25) -> None:
    import pstats

    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top)


def collect(quick: bool) -> dict[str, float | str]:
    """The e2e figures for bench/report.py; quick=True: tiny models, 8 photos of 3000x2000, one round; else 64, five rounds."""
    from bench.machine import cpu_model

    threads = os.cpu_count() or 2
    if quick:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-tiny-") as models:
            figures: dict[str, float | str] = dict(measure(8, 1, (3000, 2000), threads, Path(models), tiny=True))
    else:
        # Five rounds: the steady rate is a difference of two runs, so it needs more rounds than a ratio of one.
        figures = dict(measure(64, 5, (3000, 2000), threads, REPO / ".cache" / "bench-anti-sus"))
    figures["cpu"] = cpu_model()
    return figures


def main() -> int:
    from bench.machine import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="3000x2000", help="photo size WxH")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ONNX Runtime threads in anti_sus")
    ap.add_argument("--models", type=Path, default=None,
                    help="model directory (default .cache/bench-anti-sus, or .cache/bench-e2e-tiny with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models: shows the cost of everything but the models")
    ap.add_argument("--profile", type=Path, default=None, help="run nomad under cProfile in the last round; DIR for the file")
    ap.add_argument("--no-steady", action="store_true",
                    help="skip the N/2 and 3N/2 crawls of each round that give the steady rate (start-up and fill cancel out)")
    ap.add_argument("--end-of-cycle", action="store_true",
                    help="also run nomad with --no-background-delivery in each round (what background delivery gains)")
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.lower().split("x"))
    models = args.models or REPO / ".cache" / ("bench-e2e-tiny" if args.tiny else "bench-anti-sus")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        fig = measure(args.images, args.rounds, size, args.threads, models, tiny=args.tiny, profile=args.profile,
                      end_of_cycle=args.end_of_cycle, steady=not args.no_steady)
    except RuntimeError as exc:
        print(f"bench/e2e.py: {exc}", file=sys.stderr)
        return 1
    print(f"\n{args.images} photos {size[0]}x{size[1]}, {args.rounds} rounds, {cpu_model()}, {os.cpu_count()} cores, medians:")
    print(f"  anti_sus alone (client -> server, wire batches of 32): {fig['anti_sus_alone_img_s']:7.2f} img/s")
    for name, label in (("e2e", "end to end (nomad once -> anti_sus -> gallery)"),
                        ("e2e_end_of_cycle", "end to end, --no-background-delivery")):
        if f"{name}_ratio" not in fig:
            continue
        print(f"  {label + ':':50s} {fig[f'{name}_img_s']:7.2f} img/s (ratio {fig[f'{name}_ratio']:.2f}), "
              + (f"steady {fig[f'{name}_steady_img_s']:.2f} img/s (ratio {fig[f'{name}_steady_ratio']:.2f})"
                 if f"{name}_steady_ratio" in fig else "no steady figure"))
    if args.profile:
        print_profile(args.profile / "nomad.prof")
    return 0


def _delivered(state: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{state / 'nomad.sqlite3'}?mode=ro", uri=True) as con:
        return int(con.execute("SELECT COUNT(*) FROM images WHERE state = 'delivered'").fetchone()[0])


def _permissive() -> dict[str, float]:
    return {"gmm_threshold": -1e30, "watermark_threshold": 1.0}


def _pings(client: FilterClient | IngestClient) -> bool:
    try:
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


if __name__ == "__main__":
    raise SystemExit(main())
