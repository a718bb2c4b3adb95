"""Benchmark the duplicate skip: how much of a repost-heavy feed never reaches anti_sus, and the CLIP time saved.

    .venv/bin/python bench/dupskip.py            # real-size models (.cache/bench-anti-sus), 64 posts of 2000x1500
    .venv/bin/python bench/dupskip.py --quick    # tiny models, 24 posts of 800x600

One repost-heavy feed (stack/emulator/reposts.py: 75 % of the posts are the
same bytes, a recompressed or a resized copy of photos the gallery holds) is
crawled twice, side by side in this one run, by the real crawler over the
emulator (real HTTP, TLS, a real anti_sus with its models, a real
gallery_bridge seeded with the originals): once with ``--no-dupskip``, once
with the stage. Figures: the skip rate of the reposts, new photos wrongly
skipped (must be 0), images and seconds anti_sus spent with and without the
stage, and what the check itself costs per image (hash + ``have``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gallery_bridge.catalogue import Catalogue  # noqa: E402
from gallery_bridge.client import IngestClient  # noqa: E402
from gallery_bridge.ingest import Ingester  # noqa: E402
from gallery_bridge.server import Server, ServerConfig  # noqa: E402
from gallery_bridge.targets.folder import FolderTarget  # noqa: E402
from stack.emulator import Emulator, Scenario  # noqa: E402
from stack.emulator.reposts import RepostFeed, repost_feed  # noqa: E402
from stack.procs import Service, free_port, python_module, wait_until  # noqa: E402

PERMISSIVE = ["--gmm-threshold=-1e30", "--watermark-threshold=1.0"]  # every new photo passes: the plumbing is measured


class TimedFilter:
    """Wraps nomad's anti_sus client: counts the images sent and the seconds spent waiting for verdicts."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.images = 0
        self.seconds = 0.0

    def filter(self, batch: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.client.filter(batch, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.images += len(batch)

    def __getattr__(self, name: str) -> Any:  # info(), close(): the real client's
        return getattr(self.client, name)


def _models(models: Path, quick: bool, threads: int) -> None:
    if (models / "manifest.json").is_file():
        return
    models.mkdir(parents=True, exist_ok=True)
    if quick:
        from models import tiny as tiny_models

        tiny_models.build(models, threads=threads)
    else:
        from bench.anti_sus import build_models

        build_models(models, threads, 256)


def _crawl(emu: Emulator, feed: RepostFeed, work: Path, anti_sus: str, *, dupskip: bool, rules: list[str]) -> dict[str, float]:
    """One ``nomad once`` cycle (in process) into a fresh gallery holding the feed's originals."""
    from nomad.cli import build_crawler, build_parser

    name = "with" if dupskip else "without"
    target = FolderTarget(work / f"gallery_{name}")
    ing = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    try:
        with IngestClient(server.endpoint, timeout=60, retries=0) as client:
            for n, data in enumerate(feed.originals):
                client.ingest(f"seed:{n}", {}, data)
        env = emu.nomad_env()
        args = build_parser(env).parse_args(
            ["once", *emu.nomad_args(), "--source", "reddit", "--state-dir", str(work / f"state_{name}"),
             "--anti-sus", anti_sus, "--gallery", server.endpoint, "--batch-size", "32", "--workers", "4",
             "--anti-sus-timeout", "600", *PERMISSIVE, *rules, "--dupskip" if dupskip else "--no-dupskip"])
        crawler = build_crawler(args, threading.Event(), environ=env)
        timed = TimedFilter(crawler.filter_stage.client)
        crawler.filter_stage.client = timed
        check = 0.0
        if crawler.dupskip is not None:
            stage, inner = crawler.dupskip, crawler.dupskip.answers

            def answers(items: list[Any]) -> list[str]:
                nonlocal check
                t0 = time.perf_counter()
                try:
                    return inner(items)
                finally:
                    check += time.perf_counter() - t0

            stage.answers = answers  # type: ignore[method-assign]
        t0 = time.perf_counter()
        try:
            stats = crawler.cycle(final=True)
        finally:
            crawler.shutdown()
            crawler.store.close()
        took = time.perf_counter() - t0
        return {"sent": timed.images, "anti_sus_s": timed.seconds, "cycle_s": took, "check_s": check,
                "exact": stats.rejected["duplicate_exact"], "near": stats.rejected["duplicate_near"],
                "delivered": stats.delivered, "downloaded": stats.downloaded, "entries": ing.catalogue.count()}
    finally:
        server.close()
        ing.close()


def measure(feed: RepostFeed, models: Path, threads: int, rules: list[str]) -> dict[str, float | str]:
    """Both crawls, side by side in this run, against one anti_sus; the figures for the report."""
    work = Path(tempfile.mkdtemp(prefix="bench-dupskip-"))
    a_ep = f"tcp://127.0.0.1:{free_port()}"
    anti = Service("anti_sus", python_module("anti_sus", "serve", "--models", str(models), "--bind", a_ep,
                                             "--threads", str(threads)), work / "anti_sus.log").start()
    try:
        from anti_sus.client import FilterClient

        with FilterClient(a_ep, timeout=600, retries=0) as client:
            wait_until(lambda: _ping(client), 180, 0.5, "anti_sus")

        def scenario(port: int) -> Scenario:
            scn = Scenario(port)
            feed.add_to(scn)
            return scn

        with Emulator(scenario, rate_limit=10_000) as emu:
            # Warm-up crawl of the same feed into a throwaway gallery: first ORT runs allocate.
            _crawl(emu, feed, work / "warm", a_ep, dupskip=False, rules=rules)
            without = _crawl(emu, feed, work, a_ep, dupskip=False, rules=rules)
            with_ = _crawl(emu, feed, work, a_ep, dupskip=True, rules=rules)
    finally:
        anti.stop()
    shutil.rmtree(work, ignore_errors=True)
    kinds = feed.counts()
    posts, reposts = len(feed.posts), feed.reposts
    skipped = with_["exact"] + with_["near"]
    if with_["delivered"] + skipped != posts or without["sent"] != posts:
        raise RuntimeError(f"crawl did not see every post: without {without}, with {with_}")
    per_image = without["anti_sus_s"] / max(1, without["sent"])
    return {
        "posts": posts,
        "repost_share": round(reposts / posts, 3),
        "repost_skip_rate": round(skipped / max(1, reposts), 3),
        "skipped_exact": with_["exact"],
        "skipped_near": with_["near"],
        "new_photos_skipped": kinds["new"] - with_["delivered"],
        "images_to_anti_sus_without": without["sent"],
        "images_to_anti_sus_with": with_["sent"],
        "anti_sus_s_without": round(without["anti_sus_s"], 2),
        "anti_sus_s_with": round(with_["anti_sus_s"], 2),
        "anti_sus_time_saved": round(1 - with_["anti_sus_s"] / max(1e-9, without["anti_sus_s"]), 3),
        "check_ms_per_image": round(1000 * with_["check_s"] / max(1, with_["downloaded"]), 2),
        "anti_sus_ms_per_image": round(1000 * per_image, 1),
        "cycle_s_without": round(without["cycle_s"], 2),
        "cycle_s_with": round(with_["cycle_s"], 2),
    }


def _ping(client: Any) -> bool:
    try:
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def collect(quick: bool) -> dict[str, float | str]:
    """The figures for bench/report.py; quick: tiny models and 24 small posts, else real models and 64 posts."""
    threads = os.cpu_count() or 2
    if quick:
        feed = repost_feed(originals=6, posts=24, seed=7, size=(800, 600))
        with tempfile.TemporaryDirectory(prefix="bench-dupskip-tiny-") as models:
            _models(Path(models), True, threads)
            return measure(feed, Path(models), threads, ["--min-long-side", "0", "--min-short-side", "0"])
    feed = repost_feed(originals=16, posts=64, seed=7, size=(2000, 1500))
    models = REPO / ".cache" / "bench-anti-sus"
    _models(models, False, threads)
    return measure(feed, models, threads, [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, 24 small posts (seconds)")
    args = ap.parse_args()
    for key, value in collect(args.quick).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
