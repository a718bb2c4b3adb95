"""The review sample: a few of the images anti_sus rejected go to gallery_bridge's review queue.

People can only correct the filter if they see what it threw away. After each
anti_sus answer, :class:`ReviewSampler` picks a bounded sample of the batch's
rejected images, favouring those nearest a threshold (a GMM score just below
the GMM threshold, a watermark probability just above the watermark threshold):
those are the verdicts most worth a human look. Each picked image becomes a
≤ 512 px JPEG copy of the spooled original, sent with its scores, the stage that
rejected it, its source metadata and its CLIP features through
``IngestClient.review`` (idempotent by key).

Bounds. A per-cycle cap (``--review-per-cycle``) and a rate (``--review-rate``:
a fraction of the rejected images, carried across batches as a credit that
starts at one image, so even a short run samples something). Within a batch,
each rejecting stage's images are ranked by their margin to that stage's
threshold and the stages take turns, nearest first.

It is only a sample: sending never blocks or fails the crawl. Picked images
wait in a small bounded queue for one background thread (its own gallery
connection: ZeroMQ sockets stay in the thread that made them); when the queue
is full, or the gallery is down or refuses an item, the item is dropped, its
file deleted, and the drop logged and counted (``reviews`` in the cycle line,
``nomad_reviews`` in the metrics). Nothing is retried or kept across restarts.
"""
from __future__ import annotations

import io
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from anti_sus.client import FilterResult, ImageResult
from nomad.images import SWAPPED_ORIENTATIONS, ImageError, opened, upright
from photocore.wireimage import to_rgb

from .batch import Downloaded
from .destinations import ingest_meta

log = logging.getLogger("nomad.review")

REVIEW_SIDE = 512
"""Longest side of the copy a review item carries."""
JPEG_QUALITY = 85
FORMATS = ("JPEG", "PNG", "WEBP")
STAGE_OF = {"outlier": "gmm", "probe": "probe", "watermark": "watermark"}
"""anti_sus verdict -> the stage that rejected it (other verdicts are named as they come)."""
STAGE_ORDER = ("gmm", "probe", "watermark")


class ReviewSender(Protocol):
    """What the sampler sends through: ``gallery_bridge.client.IngestClient.review``'s signature."""

    def review(self, key: str, meta: dict[str, Any], image: bytes, scores: dict[str, Any], rejected_by: str,
               features: np.ndarray | None = None) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReviewConfig:
    """The sample's bounds (``--review-per-cycle``, ``--review-rate``, ``--review-queue``)."""

    per_cycle: int = 20
    rate: float = 0.1
    queue: int = 16
    max_pixels: int = 40_000_000
    side: int = REVIEW_SIDE


@dataclass(frozen=True)
class Pick:
    """One rejected image chosen for review: its batch index, the stage that rejected it, its margin."""

    index: int
    stage: str
    margin: float
    """Distance to the rejecting stage's threshold (≥ 0; ``inf`` when unknown)."""


def stage_of(verdict: str) -> str:
    return STAGE_OF.get(verdict, verdict)


def margin(r: ImageResult, thresholds: dict[str, float] | None) -> float:
    """How far a rejected image's score is from the threshold that rejected it (``inf`` when unknown).

    Without thresholds (a server that predates them, ``info`` unreachable) the
    ordering still holds: every GMM outlier lies below the same threshold, so a
    higher score is nearer; a watermark reject with a lower probability is nearer.
    """
    stage = stage_of(r.verdict)
    t = thresholds or {}
    probe = getattr(r, "probe", None)  # P(good) of the learnt probe, from anti_sus versions that have one
    if stage == "gmm":
        return abs(t["gmm"] - r.gmm) if "gmm" in t else -r.gmm
    if stage == "probe" and probe is not None:
        return abs(t["probe"] - probe) if "probe" in t else -probe
    if stage == "watermark" and r.watermark is not None:
        return abs(r.watermark - t["watermark"]) if "watermark" in t else r.watermark
    prompts = getattr(r, "prompts", None)  # P(reject) per prompt check; verdict "prompt:<check>"
    if stage.startswith("prompt:") and prompts and stage[7:] in prompts:
        score, limit = prompts[stage[7:]], (t.get("prompts") or {}).get(stage[7:])  # type: ignore[union-attr]
        return abs(score - limit) if isinstance(limit, (int, float)) else score
    return math.inf


def pick(results: Sequence[ImageResult], thresholds: dict[str, float] | None, budget: int) -> list[Pick]:
    """Up to ``budget`` rejected images, nearest their threshold first, the rejecting stages taking turns."""
    by_stage: dict[str, list[Pick]] = {}
    for r in results:
        if r.verdict == "good":
            continue
        st = stage_of(r.verdict)
        by_stage.setdefault(st, []).append(Pick(r.index, st, margin(r, thresholds)))
    for picks in by_stage.values():
        picks.sort(key=lambda p: (p.margin, p.index))
    order = [s for s in STAGE_ORDER if s in by_stage] + sorted(s for s in by_stage if s not in STAGE_ORDER)
    out: list[Pick] = []
    turn = 0
    while len(out) < budget and any(by_stage[s] for s in order):
        stage = order[turn % len(order)]
        if by_stage[stage]:
            out.append(by_stage[stage].pop(0))
        turn += 1
    return out


def review_size(width: int, height: int, side: int = REVIEW_SIDE) -> tuple[int, int]:
    """The review copy's size for an upright ``width`` x ``height``: longest side ``side``, never enlarged."""
    if max(width, height) <= side:
        return width, height
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def review_jpeg(path: Path, *, side: int = REVIEW_SIDE, max_pixels: int = 40_000_000) -> bytes:
    """A ≤ ``side`` px JPEG of an original, through the crawler's own safe decode (``nomad.images.opened``).

    Same format allow-list, pixel cap before decoding and truncation errors as
    the wire; a JPEG is DCT-scaled as far as the copy stays >= its size (no
    upscale: people look at it), transparency goes over white as on the wire,
    and the copy is shrunk before it is turned upright (a smaller turn).
    Raises ValueError with the one-line reason for a file it cannot use.
    """
    try:
        with opened(path, max_pixels=max_pixels, formats=FORMATS, reject_animated=False) as src:
            size = review_size(src.width, src.height, side)
            im, box = src.load(size, fill=1.0)
            rgb = to_rgb(im)
            stored = size[::-1] if src.orientation in SWAPPED_ORIENTATIONS else size
            if rgb.size != stored or box is not None:
                rgb = rgb.resize(stored, Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
            rgb = upright(rgb, src.orientation)
            out = io.BytesIO()
            rgb.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)  # inside: rgb may be the file's own image
            return out.getvalue()
    except ImageError as exc:
        raise ValueError(str(exc)) from exc


@dataclass
class _Item:
    key: str
    meta: dict[str, Any]
    path: Path
    scores: dict[str, Any]
    rejected_by: str
    features: np.ndarray | None
    count: Callable[[str], None]


@dataclass
class ReviewSampler:
    """Picks rejected images after each anti_sus answer and sends them from one background thread.

    ``connect`` makes the sender inside that thread (a fresh ``IngestClient``
    there). ``thresholds`` is asked once, only when a reply lacks them (an older
    anti_sus), e.g. ``lambda: client.info()["thresholds"]``. ``on_count(outcome)``
    feeds the metrics: ``queued``, then ``sent``, ``duplicate``, ``failed`` or ``dropped``.
    """

    connect: Callable[[], ReviewSender]
    config: ReviewConfig = field(default_factory=ReviewConfig)
    thresholds: Callable[[], dict[str, float] | None] | None = None
    on_count: Callable[[str], None] | None = None
    credit: float = 1.0
    _queue: queue.Queue[_Item | None] = field(init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _cycle: object = field(default=None, init=False, repr=False)
    _in_cycle: int = field(default=0, init=False, repr=False)
    _info: dict[str, float] | None = field(default=None, init=False, repr=False)
    _asked: bool = field(default=False, init=False, repr=False)
    _closed: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(maxsize=max(1, self.config.queue))

    # --- the crawler's side: never waits ------------------------------------------------
    def offer(self, items: Sequence[Downloaded], result: FilterResult, stats: Any) -> int:
        """Sample this batch's rejected images; the picked ones' spool files are taken over (renamed).

        ``stats`` is the cycle's :class:`nomad.outcomes.CycleStats` (its ``reviews``
        counter; a new stats object starts a new cycle's cap). Returns how many were queued.
        Never raises: a problem here is logged and the batch goes on as if nothing was picked.
        """
        try:
            return self._offer(items, result, stats)
        except Exception:  # noqa: BLE001 - only a sample: the crawl must not notice
            log.exception("review sample of a batch failed; skipped")
            self._count(stats, "failed")
            return 0

    def _offer(self, items: Sequence[Downloaded], result: FilterResult, stats: Any) -> int:
        if self._closed.is_set():
            return 0
        if stats is not self._cycle:
            self._cycle, self._in_cycle = stats, 0
        rejected = [r for r in result.results if r.verdict != "good" and 0 <= r.index < len(items)]
        if not rejected:
            return 0
        self.credit = min(self.credit + self.config.rate * len(rejected), float(self.config.per_cycle))
        budget = min(int(self.credit), self.config.per_cycle - self._in_cycle)
        if budget <= 0:
            return 0
        thresholds = result.thresholds or self._fallback_thresholds()
        queued = 0
        for p in pick(rejected, thresholds, budget):
            it = items[p.index]
            r = next(x for x in rejected if x.index == p.index)
            self.credit -= 1
            self._in_cycle += 1
            if self._enqueue(self._item(it, r, p, thresholds, result.feature_of(p.index), stats)):
                self._count(stats, "queued")
                queued += 1
        self._start()
        return queued

    def _item(self, it: Downloaded, r: ImageResult, p: Pick, thresholds: dict[str, float] | None,
              features: np.ndarray | None, stats: Any) -> _Item:
        scores: dict[str, Any] = {"gmm": r.gmm}
        if r.watermark is not None:
            scores["watermark"] = r.watermark
        if getattr(r, "probe", None) is not None:
            scores["probe"] = getattr(r, "probe")
        for check, value in (getattr(r, "prompts", None) or {}).items():
            scores[f"prompt:{check}"] = value
        for name, value in (thresholds or {}).items():
            if isinstance(value, dict):  # "prompts": one threshold per check, None where the check was off
                scores.update({f"prompt:{k}_threshold": v for k, v in value.items() if v is not None})
                continue
            scores[f"{name}_threshold"] = value
        if math.isfinite(p.margin) and thresholds:
            scores["margin"] = p.margin
        meta = {**ingest_meta(it.ref, it.width, it.height, it.format, scores), "verdict": r.verdict}
        # Taken over from the batch: the crawler deletes the spool files it still finds after the verdicts.
        held = it.spool.with_name(it.spool.name + ".review")
        it.spool.replace(held)
        return _Item(it.ref.key, meta, held, scores, p.stage, None if features is None else np.array(features),
                     lambda outcome: self._count(stats, outcome))

    def _enqueue(self, item: _Item) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            log.info("review queue full: %s not sent (only a sample)", item.key)
            item.path.unlink(missing_ok=True)
            item.count("dropped")
            return False

    def _fallback_thresholds(self) -> dict[str, float] | None:
        if self._info is None and not self._asked and self.thresholds is not None:
            self._asked = True  # one try: an old server's info does not change while we run
            try:
                got = self.thresholds()
                self._info = {k: float(v) for k, v in (got or {}).items() if isinstance(v, (int, float))} or None
            except Exception as exc:  # noqa: BLE001 - the ordering works without them
                log.info("anti_sus thresholds unknown (%s); review ranks by score alone", exc)
        return self._info

    def _count(self, stats: Any, outcome: str) -> None:
        reviews = getattr(stats, "reviews", None)
        if reviews is not None:
            with self._lock:  # the crawler's thread and the sending thread both count
                reviews[outcome] += 1
        if self.on_count is not None:
            self.on_count(outcome)

    # --- the sending thread -----------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None and not self._queue.empty():
            self._thread = threading.Thread(target=self._run, name="nomad-review", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        sender: ReviewSender | None = None
        try:
            while (item := self._queue.get()) is not None:
                try:
                    if self._closed.is_set():
                        item.count("dropped")
                    else:
                        sender = self._send(sender, item)
                except Exception:  # noqa: BLE001 - this thread must outlive any one item
                    log.exception("review item %s: unexpected failure; dropped", item.key)
                    item.count("failed")
                finally:
                    item.path.unlink(missing_ok=True)
        finally:
            if sender is not None:
                sender.close()

    def _send(self, sender: ReviewSender | None, item: _Item) -> ReviewSender | None:
        """Send one item; returns the sender to keep (None: connect afresh for the next one)."""
        try:
            image = review_jpeg(item.path, side=self.config.side, max_pixels=self.config.max_pixels)
        except Exception as exc:  # noqa: BLE001 - a file the crawler decoded fine; still, only a sample
            log.warning("review copy of %s failed: %s", item.key, exc)
            item.count("failed")
            return sender
        try:
            if sender is None:
                sender = self.connect()
            reply = sender.review(item.key, item.meta, image, item.scores, item.rejected_by, item.features)
        except Exception as exc:  # noqa: BLE001 - the gallery down or refusing: drop the sample
            log.warning("review item %s not sent (%s); dropped, it is only a sample", item.key, exc)
            item.count("failed")
            if sender is not None:
                sender.close()  # a REQ socket that got no answer cannot send again: start afresh
            return None
        item.count("duplicate" if isinstance(reply, dict) and reply.get("status") == "duplicate" else "sent")
        return sender

    def _discard(self, item: _Item) -> None:
        item.path.unlink(missing_ok=True)
        item.count("dropped")

    def close(self, wait: float = 5.0) -> None:
        """Send what is queued for up to ``wait`` seconds in all, then drop the rest; idempotent."""
        deadline = time.monotonic() + max(0.0, wait)
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._queue.put(None, timeout=max(0.0, wait))
            except queue.Full:
                pass
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._closed.set()
        while True:  # whatever is still queued (the thread ran out of time, or never started)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._discard(item)
        if thread is not None and thread.is_alive():
            # Still inside one send (bounded by the client's timeout): it deletes its own file, then ends here.
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass


def server_thresholds(info: Callable[[], dict[str, Any]], overrides: dict[str, float | None]) -> Callable[[], dict[str, float]]:
    """``thresholds`` for an anti_sus whose replies lack them: its ``info`` thresholds, this crawler's overrides on top."""

    def ask() -> dict[str, float]:
        got = dict(info().get("thresholds") or {})
        got.update({k: v for k, v in overrides.items() if v is not None})
        return got

    return ask


def gallery_sender(endpoint: str, *, timeout: float, curve: Any = None) -> Callable[[], ReviewSender]:
    """``connect`` for gallery_bridge: one ``IngestClient`` (one try, no resend: it is only a sample)."""

    def connect() -> ReviewSender:
        from gallery_bridge.client import IngestClient

        return IngestClient(endpoint, timeout=timeout, retries=0, curve=curve)  # type: ignore[return-value]

    return connect
