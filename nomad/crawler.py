"""The crawl loop, as a pipeline of small stages.

    listing sources (reddit, commons, flickr, bluesky: each with its own
    cursors) -> posts (rules) -> links expanded to image refs through the
    registry's URL -> expander map (rules on the reported size) -> download
    (bounded thread pool) -> decode (rules on the real size, per source) ->
    batch -> anti_sus -> outbox -> gallery_bridge / --save-dir

Every image key ends in the store with an outcome and a reason; the store is
consulted before anything is fetched, so a restart never downloads twice.
:meth:`Crawler._decide` is the one place an outcome is written: store row,
cycle stats and metrics together. What is counted lives in :mod:`nomad.outcomes`.

Over 400 lines on purpose: one class whose three stages share the store, the
batcher and ``_decide``; splitting the stages apart would pass all of that
between modules without making any of them simpler.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from anti_sus.client import AntiSusError
from nomad import images
from nomad.delivery import Batcher, Deliverer, Downloaded, FilterStage, Stopped, drain_outbox, ingest_meta
from nomad.delivery.dupskip import DupSkip, hashes_of
from nomad.delivery.outbox import DeliveryWorker
from nomad.delivery.review import ReviewSampler
from nomad.http import FetchError, HttpClient, reject_removed_placeholder
from nomad.outcomes import PERMANENT_FETCH, CycleStats, Metrics, classify_fetch
from nomad.rules import Rules
from nomad.sources.base import (
    Candidate, ImageRef, ListingSource, SourceError, direct_ref, headers_for, media_headers, site_of,
)
from nomad.sources.reddit import RedditClient
from nomad.sources.registry import ExpanderRegistry
from nomad.store import Store

log = logging.getLogger(__name__)

__all__ = ["Crawler", "CrawlerConfig", "CycleStats", "Metrics", "PERMANENT_FETCH", "classify_fetch"]


@dataclass
class CrawlerConfig:
    """The crawl's own knobs (rules, HTTP, sources and endpoints are configured elsewhere)."""

    workers: int = 4
    """Download threads (``--workers``); at most twice as many downloads are in flight."""
    batch_size: int = 64
    """Images per anti_sus request (``--batch-size``)."""
    batch_timeout: float = 30.0
    """Seconds a partial batch waits before it is sent (``--batch-timeout``)."""
    max_retries: int = 3
    """Times a failed download or expansion is retried, across cycles and restarts (``--max-retries``)."""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    """Largest image decoded: the decompression-bomb limit (``--max-pixels``)."""
    backoff_max: float = 30.0
    """Longest wait between retries to anti_sus and the gallery (``--backoff-max``)."""
    max_delivery_attempts: int = 10
    """Failed deliveries of one image before it becomes a dead letter (``--max-delivery-attempts``)."""
    background_delivery: bool = True
    """Deliver the outbox in a background thread during the cycle (``--background-delivery``, the default): the
    gallery ingests one batch while the next is downloaded and filtered, instead of everything waiting for the end of
    the cycle, so images reach the gallery a batch at a time and a gallery with cores (or a host) of its own works
    beside the models. On the 2-core benchmark machine, where all three share the CPU, it is about even with
    end-of-cycle delivery (bench/e2e.py --end-of-cycle, steady rate, two runs: 1.02x vs 0.81x and 0.84x vs 0.89x
    anti_sus alone)."""


class Crawler:
    """One crawler: sources, rules, store, download pool, batcher, anti_sus and delivery.

    ``size_rules`` maps a listing source's name to its own (min long side, min
    short side), e.g. flickr's key-less feed whose files are 1024 px; the other
    rules are shared.

    Time and chance are collaborators given at construction, so tests inject
    them instead of patching modules: ``clock`` (monotonic seconds: batch
    timeouts, cycle lengths, the shutdown's patience), ``sleep`` (a plain
    blocking sleep, used only by the shutdown's bounded patience after the stop
    flag is set) and ``rng`` (the jitter of delivery retries).
    """

    def __init__(
        self,
        config: CrawlerConfig,
        *,
        store: Store,
        rules: Rules,
        http: HttpClient,
        sources: list[ListingSource],
        expanders: ExpanderRegistry,
        size_rules: dict[str, tuple[int, int]] | None = None,
        filter_stage: FilterStage,
        deliverer: Deliverer,
        stop: threading.Event | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        review: ReviewSampler | None = None,
        dupskip: DupSkip | None = None,
    ) -> None:
        self.cfg = config
        self.dupskip = dupskip
        """Drops what the gallery already holds before anti_sus (nomad.delivery.dupskip; None: off)."""
        self.review = review
        """Sends a sample of the rejected images to the gallery's review queue (None: off)."""
        self.store = store
        self.rules = rules
        self.http = http
        self.sources = list(sources)
        self._media_headers = media_headers(self.sources)  # per image host, e.g. Wikimedia's contact UA
        self.expanders = expanders
        self._rules_by_source = {
            name: replace(rules, min_long=long_side, min_short=short_side)
            for name, (long_side, short_side) in (size_rules or {}).items()
        }
        self.filter_stage = filter_stage
        self.deliverer = deliverer
        self.stop = stop or threading.Event()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._blocking_sleep = sleep
        self.rng = rng or random.Random()
        self.batcher = Batcher(size=config.batch_size, timeout=config.batch_timeout, clock=clock)
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.workers), thread_name_prefix="nomad-dl")
        # One request to anti_sus at a time, in its own thread, so downloads go on while it filters.
        self._filter_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nomad-filter")
        self._sent: tuple[list[Downloaded], Future[Any]] | None = None
        """The batch anti_sus is scoring now and its answer to come (the filter thread's only work)."""
        self._stats = CycleStats()
        self._worker: DeliveryWorker | None = None
        """The background outbox drain while a cycle runs (``background_delivery``), else None."""
        filter_stage.sleep = self.sleep
        cleared = store.clear_spool()
        if cleared:
            log.info("removed %d originals of an unfinished batch (their keys are fetched again)", cleared)
        swept = store.sweep_outbox()
        if swept:
            log.info("removed %d outbox files no outbox row names (left by a crash)", swept)

    @property
    def reddit(self) -> RedditClient | None:
        """The reddit JSON client of the reddit source (``stack.ensure_models`` reads top listings with it)."""
        for src in self.sources:
            client = getattr(src, "client", None)
            if isinstance(client, RedditClient):
                return client
        return None

    def rules_for(self, key: str) -> Rules:
        """The rules of the listing source an image key (``<source>:<post>:<n>``) came from."""
        return self._rules_by_source.get(key.split(":", 1)[0], self.rules)

    def sleep(self, seconds: float) -> bool:
        """Wait that a stop request interrupts; True when interrupted."""
        return self.stop.wait(max(0.0, seconds))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._filter_pool.shutdown(wait=True, cancel_futures=True)
        if self.review is not None:
            self.review.close()
        if self.dupskip is not None:
            self.dupskip.close()
        self.http.close()

    # --- every outcome: store, stats and metrics together ----------------------------
    def _decide(
        self,
        stats: CycleStats,
        outcome: str,
        reason: str = "",
        *,
        post: Candidate | None = None,
        key: str | None = None,
        ref: ImageRef | None = None,
        post_id: str = "",
        error: str | None = None,
        scores: dict[str, Any] | None = None,
        accepted: tuple[Path, dict[str, Any], np.ndarray | None] | None = None,
    ) -> bool:
        """Record one outcome in the store, this cycle's stats and the metrics; the only place that does.

        ``outcome``: "rejected" or "failed" (``reason`` is the counted code,
        ``error`` the detail the store keeps, default the reason), "pending" (a
        new image key to download), "expanded" (a post), "accepted" (with
        ``accepted=(spool, meta, features)``) or "delivered" (``reason`` is the
        gallery's status; the outbox already wrote its row, it runs without a
        crawler too, so no ``key`` is needed). The subject is a ``post``, a new
        ``ref`` of ``post_id``, an image ``key``, or nothing (a listing that
        failed has no row).
        Returns False when a new ``ref`` was already known: nothing is counted.
        """
        failed = outcome == "failed"
        detail = (error or reason) if failed else None
        if ref is not None:
            state = "rejected" if outcome == "rejected" else "pending"
            if not self.store.add_image(ref, post_id, state=state, reason=reason or None):
                return False
            stats.candidates += 1
            key = ref.key
        elif post is not None:
            self.store.record_post(post, outcome, reason=reason if outcome == "rejected" else None, error=detail)
        elif key is not None and accepted is not None:
            spool, meta, features = accepted
            self.store.accept(key, spool, meta, features, scores or {})
        elif key is not None and outcome in ("rejected", "failed"):
            self.store.set_image(key, outcome, reason=reason, error=error, scores=scores)

        if outcome == "rejected":
            stats.rejected[reason] += 1
        elif failed:
            stats.failed[reason] += 1
            self.metrics.error(reason)
        elif outcome == "accepted":
            stats.accepted += 1
            if self._worker is not None:
                self._worker.kick()  # in the outbox now: the background drain takes it while the next batch is filtered
        elif outcome == "delivered":
            stats.delivered += 1

        if post is not None:
            self.metrics.post(outcome)
        elif outcome != "pending" and (key is not None or outcome == "delivered"):
            self.metrics.image(outcome, reason)
        return True

    # --- stage 1: listings and posts -------------------------------------------------
    def expand(self, post: Candidate) -> list[ImageRef]:
        """Image refs of a post, keyed ``<source>:<post id>:<index>``; raises SourceError."""
        prefix = f"{post.source}:{post.post_id}"
        refs: list[ImageRef] = []
        for link in post.links:
            key = f"{prefix}:{len(refs)}"
            site = site_of(link.url) if link.url else "none"
            expander = self.expanders.for_url(link.url) if link.media == "image" and site != "video" else None
            if expander is not None:
                refs.extend(expander.expand(link, prefix, len(refs)))
            elif link.media != "image" or site in ("none", "video", "unsupported"):
                media = link.media if link.media != "image" else ("video" if site == "video" else "unavailable")
                refs.append(ImageRef(key, link.url, animated=link.animated, media=media, meta=dict(link.meta)))
            else:
                refs.append(direct_ref(key, link, site))
        base = post.meta()
        for ref in refs:
            ref.meta = {**base, **ref.meta}
        return refs

    def handle_post(self, post: Candidate, stats: CycleStats) -> None:
        """Post rules, expansion, image rules on reported sizes; everything recorded."""
        reason = self.rules.check_post(post)
        if reason:
            self._decide(stats, "rejected", reason, post=post)
            return
        try:
            refs = self.expand(post)
        except SourceError as exc:
            if exc.reason == "stopped":
                raise Stopped() from exc
            self._decide(stats, "failed" if exc.transient else "rejected", exc.reason, post=post)
            log.info("post %s: %s (%s)", post.post_id, exc.reason, exc)
            return
        except Exception as exc:  # noqa: BLE001 - an API answer of an unexpected shape must not stop the crawl
            log.exception("post %s: expanding its links crashed", post.post_id)
            self._decide(stats, "failed", "expand_crash", post=post, error=f"expand_crash_{type(exc).__name__}")
            return
        for ref in refs:
            reason = self.rules_for(ref.key).check_ref(ref)
            if not reason and self.store.url_taken(ref.url, ref.key):
                reason = "duplicate_url"  # crossposts and reposts of the same file
            self._decide(stats, "rejected" if reason else "pending", reason or "", ref=ref, post_id=post.post_id)
        self._decide(stats, "expanded", post=post)

    def read_listings(self, stats: CycleStats) -> None:
        """Poll every enabled listing source in turn, each with its own cursors; one line per source."""
        handled: set[str] = set()
        for source in self.sources:
            seen = new = 0
            error = ""
            try:
                for post in source.poll(self.store.cursors_of(source.name), self.store.seen_post):
                    seen += 1
                    stats.posts_seen += 1
                    if self.store.seen_post(post.post_id):
                        continue
                    new += 1
                    stats.new_posts += 1
                    handled.add(post.post_id)
                    self.handle_post(post, stats)
                    if self.stop.is_set():
                        return
            except SourceError as exc:
                if exc.reason == "stopped":
                    return
                error = f"{exc.reason}: {exc}"
                self._listing_failed(stats, source.name, "listing_" + exc.reason, str(exc))
                log.warning("source %s: %s", source.name, exc)
            except Exception as exc:  # noqa: BLE001 - a source bug must not stop the other sources
                log.exception("source %s crashed while polling", source.name)
                error = f"crash: {type(exc).__name__}"
                self._listing_failed(stats, source.name, "listing_crash", error)
            log.info("source %s: %d posts read, %d new%s", source.name, seen, new, f", failed ({error})" if error else "",
                     extra={"source": source.name, "posts_seen": seen, "new_posts": new, "error": error})
        for post in self.store.retry_posts(self.cfg.max_retries):
            if self.stop.is_set():
                return
            if post.post_id not in handled:  # one try per cycle
                self.handle_post(post, stats)

    def _listing_failed(self, stats: CycleStats, source: str, reason: str, message: str) -> None:
        stats.listings_failed += 1
        stats.listing_error = f"{source}: {message}"
        self._decide(stats, "failed", reason)

    # --- stage 2: download and decode (worker threads) ---------------------------------
    def fetch(self, ref: ImageRef) -> tuple[str, str, Downloaded | None]:
        """Download and decode one image: ('ok', '', item) | ('rejected'|'failed', reason, None)."""
        check = reject_removed_placeholder if ref.site == "imgur" else None
        try:
            dl = self.http.download_image(ref.url, headers=headers_for(ref.url, self._media_headers), redirect_check=check)
            if check is not None:
                check(dl.url)
            dec = images.decode(dl.data, max_pixels=self.cfg.max_pixels)
        except FetchError as exc:
            outcome, reason = classify_fetch(exc)
            return outcome, reason, None
        except images.ImageError as exc:
            return "rejected", exc.reason, None
        reason = self.rules_for(ref.key).check_size(dec.width, dec.height)
        if reason:
            return "rejected", reason, None
        spool = self.store.spool_path(ref.key, "." + dec.format)
        spool.write_bytes(dl.data)
        # The duplicate skip's hashes, here in the worker: hashing a due batch would leave anti_sus waiting.
        hashes = hashes_of(dl.data, dec.wire) if self.dupskip is not None else None
        return "ok", "", Downloaded(ref, dec.wire, spool, dec.width, dec.height, dec.format, hashes)

    def _fetched(self, ref: ImageRef, fut: Future[tuple[str, str, Downloaded | None]], stats: CycleStats) -> None:
        try:
            outcome, reason, item = fut.result()
        except Exception as exc:  # a bug in a worker must not kill the crawl: record it
            log.exception("download of %s crashed", ref.key)
            outcome, reason, item = "failed", f"crash_{type(exc).__name__}", None
        if outcome == "ok" and item is not None:
            stats.downloaded += 1
            self.batcher.add(item)
            return
        self._decide(stats, outcome, reason, key=ref.key)

    def download(self, stats: CycleStats) -> None:
        """Download every pending image; batches go to anti_sus as they fill or time out.

        Filtering overlaps with downloading: while anti_sus scores one batch
        (in the filter thread), the pool downloads and decodes the next, so on a
        busy crawl anti_sus never waits for nomad. Memory stays bounded: one
        batch in flight and the next one collecting, its downloads included
        (at most ``2 x workers`` at a time): about two batches of wire images.
        Returns with no batch in flight.
        """
        work = iter(self.store.work(self.cfg.max_retries))
        inflight: dict[Future[Any], ImageRef] = {}
        exhausted = False
        while True:
            while (not exhausted and not self.stop.is_set() and len(inflight) < 2 * self.cfg.workers
                   and len(self.batcher.items) + len(inflight) < self.cfg.batch_size):
                ref = next(work, None)
                if ref is None:
                    exhausted = True
                    break
                inflight[self._pool.submit(self.fetch, ref)] = ref
            if self._sent is None and self.batcher.due():
                self._send(stats)
                continue
            if not inflight and self._sent is None:
                break
            waiting = list(inflight) + ([self._sent[1]] if self._sent is not None else [])
            due = self.batcher.due_in() if self._sent is None else None
            done, _ = wait(waiting, timeout=0.5 if due is None else max(0.01, min(0.5, due)), return_when=FIRST_COMPLETED)
            for fut in done:
                if fut in inflight:
                    self._fetched(inflight.pop(fut), fut, stats)
            if self._sent is not None and self._sent[1].done():
                self._collect(stats)

    # --- stage 3: anti_sus and the outbox ------------------------------------------------
    def flush(self, stats: CycleStats | None = None, *, force: bool = False) -> None:
        """Send due batches (all of them with ``force``) and wait for their answers; waits while anti_sus is down."""
        stats = stats or self._stats
        while True:
            if not self._collect(stats):
                return
            if not (self.batcher.items and (force or self.batcher.due())):
                return
            self._send(stats)

    def _send(self, stats: CycleStats) -> None:
        """Take one batch, drop what the gallery already holds, and hand the rest to the filter thread."""
        items = self.batcher.take()
        if self.dupskip is not None:  # reposts the gallery holds: decided here, no CLIP spent on them
            items = self.dupskip.drop_known(items, lambda it, why: self._decide(stats, "rejected", why, key=it.ref.key))
        if items:
            wires = np.stack([i.wire for i in items])
            self._sent = (items, self._filter_pool.submit(self.filter_stage.filter, wires))

    def _collect(self, stats: CycleStats) -> bool:
        """Record anti_sus's answer to the batch in flight, waiting for it; False when a stop ended the wait.

        The answer is recorded here, in the crawler's thread, so the store and
        the stats keep one writer; only the request itself runs in the filter thread.
        """
        if self._sent is None:
            return True
        (items, fut), self._sent = self._sent, None
        try:
            result = fut.result()
        except Stopped:
            # Stopped while anti_sus was down: the keys stay pending, fetched again next run.
            for it in items + self.batcher.take():
                it.spool.unlink(missing_ok=True)
            return False
        except AntiSusError as exc:
            for it in items:
                self._decide(stats, "failed", f"anti_sus_{exc.code}", key=it.ref.key, error=str(exc))
                it.spool.unlink(missing_ok=True)
            log.error("anti_sus refused a batch of %d: %s", len(items), exc)
            return True
        self._record_verdicts(items, result, stats)
        return True

    def _record_verdicts(self, items: list[Downloaded], result: Any, stats: CycleStats) -> None:
        if self.review is not None:
            self.review.offer(items, result, stats)  # takes over the picked spool files; never raises
        answered: set[int] = set()
        for r in result.results:
            if not 0 <= r.index < len(items):
                continue
            answered.add(r.index)
            it = items[r.index]
            scores = {"gmm": r.gmm, "watermark": r.watermark}
            if r.verdict == "good":
                features = result.feature_of(r.index)
                meta = ingest_meta(it.ref, it.width, it.height, it.format, scores)
                self._decide(stats, "accepted", key=it.ref.key, scores=scores, accepted=(it.spool, meta, features))
            else:
                self._decide(stats, "rejected", r.verdict, key=it.ref.key, scores={**scores, "verdict": r.verdict})
                it.spool.unlink(missing_ok=True)
        for i, it in enumerate(items):
            if i not in answered:
                self._decide(stats, "failed", "anti_sus_no_result", key=it.ref.key)
                it.spool.unlink(missing_ok=True)

    def deliver(self, stats: CycleStats, *, wait: bool, halt: Callable[[], bool] | None = None) -> None:
        def counted(status: str) -> None:
            self._decide(stats, "delivered", status)

        _, stats.outbox = drain_outbox(
            self.store, self.deliverer, sleep=self.sleep, wait=wait, backoff_max=self.cfg.backoff_max, on_delivered=counted,
            max_attempts=self.cfg.max_delivery_attempts, rng=self.rng, halt=halt,
        )

    @contextmanager
    def _delivering(self, stats: CycleStats) -> Iterator[None]:
        """Drain the outbox in a background thread for the duration of the block (or here first, when off).

        The worker is the deliverer's only user while it runs; leaving the block
        ends it between two items and joins it, so the crawler's own drain after
        the block never overlaps with it.
        """
        if not self.cfg.background_delivery:
            self.deliver(stats, wait=False)  # redeliver what a previous run left
            yield
            return
        self._worker = DeliveryWorker(lambda halt: self.deliver(stats, wait=False, halt=halt), self.stop).start()
        try:
            yield
        finally:
            worker, self._worker = self._worker, None
            worker.finish()

    # --- cycles --------------------------------------------------------------------------
    def cycle(self, *, final: bool = False) -> CycleStats:
        """One poll cycle. ``final``: flush every batch and wait until the outbox is delivered."""
        t0 = self.clock()
        stats = self._stats = CycleStats()
        try:
            with self._delivering(stats):  # its first pass redelivers what a previous run left
                self.read_listings(stats)
                self.download(stats)
                self.flush(stats, force=final or self.stop.is_set())
            self.deliver(stats, wait=final)
        except Stopped:
            pass
        stats.ratelimit = "; ".join(f"{s.name}: {s.ratelimit()}" for s in self.sources if s.ratelimit()) or "unknown"
        stats.outbox = self.store.outbox_size()
        stats.seconds = self.clock() - t0
        log.info(stats.line(), extra={"cycle": stats.fields()})
        self.metrics.cycle(stats.seconds)
        return stats

    def run(self, interval: float) -> None:
        """Poll every ``interval`` seconds until stopped; partial batches go out on their timeout."""
        while not self.stop.is_set():
            started = self.clock()
            try:
                self.cycle()
            except Exception:  # noqa: BLE001 - months unattended: log, count, try again next interval
                log.exception("cycle failed; trying again in %.0fs", interval)
                self.metrics.error("cycle_crash")
            while not self.stop.is_set():
                left = started + interval - self.clock()
                if left <= 0:
                    break
                due = self.batcher.due_in()
                self.sleep(left if due is None else max(0.0, min(left, due)))
                if self.batcher.due():
                    try:
                        self.flush()
                        self.deliver(self._stats, wait=False)
                    except Stopped:
                        break
        self.shutdown()

    def shutdown(self) -> None:
        """Graceful stop: flush what was downloaded (if anti_sus answers soon), deliver once, close.

        The stop flag is already set, so the flush gets its own bounded patience
        (``backoff_max`` on the injected clock); if anti_sus stays down the keys
        simply stay pending for the next run.
        """
        stats = self._stats
        deadline = self.clock() + self.cfg.backoff_max

        def patient(seconds: float) -> bool:
            if self.clock() + seconds > deadline:
                return True
            self._blocking_sleep(seconds)
            return False

        if self.batcher.items or self._sent is not None:
            self.filter_stage.sleep = patient
            try:
                self.flush(stats, force=True)
            finally:
                self.filter_stage.sleep = self.sleep
        try:
            _, stats.outbox = drain_outbox(self.store, self.deliverer, sleep=patient, wait=False,
                                           max_attempts=self.cfg.max_delivery_attempts, rng=self.rng)
        except Stopped:
            pass
        self.close()
        # Downloads that finished after the stop never reached a batch: their keys stay pending (fetched again next
        # run), so their originals go now, as a start would remove them, instead of lying in the spool until then.
        left = self.store.clear_spool()
        if left:
            log.info("removed %d downloaded originals that were not filtered before the stop", left)

    def pending(self) -> int:
        """Image keys not yet decided (pending, or failed with retries left) plus the outbox."""
        return len(self.store.work(self.cfg.max_retries)) + self.store.outbox_size()
