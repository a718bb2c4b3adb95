"""Outcomes: what the crawler counts and how a download error is classed.

:class:`CycleStats` is the content of the per-cycle log line, :class:`Metrics`
the process-wide Prometheus counters; :meth:`nomad.crawler.Crawler._decide`
is the one place that writes an outcome to the store, these stats and the
metrics together.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from nomad.http import FetchError

# Fetch error codes that will not get better by retrying: a rejection, not a failure.
PERMANENT_FETCH = {
    "removed", "not_image", "unsupported_format", "too_large", "blocked_address", "bad_url",
    "bad_scheme", "too_many_redirects",
}


def classify_fetch(exc: FetchError) -> tuple[str, str]:
    """('rejected'|'failed', reason code) for a download error."""
    reason = exc.reason
    if reason in PERMANENT_FETCH:
        return "rejected", reason
    if reason.startswith("http_") and reason not in ("http_429", "http_5xx", "http_408"):
        return "rejected", reason  # 404, 410, 403: the image is gone or not ours to take
    return "failed", reason


@dataclass
class CycleStats:
    """What one poll cycle did: the content of the per-cycle log line."""

    posts_seen: int = 0
    new_posts: int = 0
    candidates: int = 0
    downloaded: int = 0
    accepted: int = 0
    delivered: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    ratelimit: str = "unknown"
    outbox: int = 0
    seconds: float = 0.0
    listings_failed: int = 0
    listing_error: str = ""
    reviews: collections.Counter[str] = field(default_factory=collections.Counter)
    """Review sample items by outcome: queued this cycle, then sent, duplicate, failed or dropped
    (nomad.delivery.review; sending runs in the background, so a cycle's line may not show its sends yet)."""

    def line(self) -> str:
        def fmt(c: collections.Counter[str]) -> str:
            return ",".join(f"{k}:{v}" for k, v in sorted(c.items())) or "-"

        return (
            f"cycle: posts_seen={self.posts_seen} new_posts={self.new_posts} candidates={self.candidates} "
            f"downloaded={self.downloaded} accepted={self.accepted} delivered={self.delivered} "
            f"rejected={sum(self.rejected.values())}[{fmt(self.rejected)}] failed={sum(self.failed.values())}[{fmt(self.failed)}] "
            f"outbox={self.outbox} reviews={self.reviews['queued']}[{fmt(self.reviews)}] "
            f"ratelimit=({self.ratelimit}) took={self.seconds:.1f}s"
        )

    def fields(self) -> dict[str, Any]:
        """The same numbers as structured fields for ``--log-format json``."""
        return {
            "posts_seen": self.posts_seen, "new_posts": self.new_posts, "candidates": self.candidates,
            "downloaded": self.downloaded, "accepted": self.accepted, "delivered": self.delivered,
            "rejected": dict(self.rejected), "failed": dict(self.failed), "outbox": self.outbox,
            "ratelimit": self.ratelimit, "seconds": round(self.seconds, 3), "reviews": dict(self.reviews),
        }


class Metrics:
    """Prometheus counters (process-wide: prometheus_client registers each name once)."""

    _made: dict[str, Any] | None = None

    def __init__(self) -> None:
        if Metrics._made is None:
            from prometheus_client import Counter, Gauge

            Metrics._made = {
                "cycles": Counter("nomad_cycles", "Poll cycles finished (a crashed cycle counts as an error, not here)"),
                "cycle_seconds": Gauge("nomad_last_cycle_seconds", "Length of the last finished cycle"),
                "cycle_end": Gauge("nomad_last_cycle_end_time_seconds",
                                   "Unix time the last cycle finished (alert when it grows old: the crawl is stuck)"),
                "posts": Counter("nomad_posts", "Posts seen in listings, by outcome", ["outcome"]),
                "images": Counter("nomad_images", "Image keys decided, by outcome and reason", ["outcome", "reason"]),
                "waits": Counter("nomad_ratelimit_waits", "Waits forced by rate limits", ["source"]),
                "errors": Counter("nomad_errors", "Errors by kind", ["kind"]),
                "reviews": Counter("nomad_reviews", "Rejected images sampled for the gallery's review queue, by outcome",
                                   ["outcome"]),
            }
        self.m = Metrics._made

    def post(self, outcome: str) -> None:
        self.m["posts"].labels(outcome).inc()

    def image(self, outcome: str, reason: str = "") -> None:
        self.m["images"].labels(outcome, reason).inc()

    def wait(self, source: str) -> None:
        self.m["waits"].labels(source).inc()

    def error(self, kind: str) -> None:
        self.m["errors"].labels(kind).inc()

    def cycle(self, seconds: float) -> None:
        """One finished cycle and its length."""
        self.m["cycles"].inc()
        self.m["cycle_seconds"].set(seconds)
        self.m["cycle_end"].set_to_current_time()

    def review(self, outcome: str) -> None:
        """One review sample item: queued, then sent, duplicate, failed or dropped."""
        self.m["reviews"].labels(outcome).inc()
