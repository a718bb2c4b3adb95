"""nomad's settings: every flag also readable from a ``NOMAD_…`` environment variable.

Built on :mod:`photocore.settings`, the layer all three services share: an
empty variable counts as unset, a bad value exits 2 naming the variable,
booleans are strict, and a list flag given on the command line replaces the
variable's list. ``--help`` names each variable and the built-in default.

Secrets never travel as flags (they would show in ``ps``): reddit, imgur and
flickr credentials come from ``REDDIT_CLIENT_ID``/``REDDIT_CLIENT_SECRET``,
``IMGUR_CLIENT_ID`` and ``FLICKR_API_KEY``, or from files named by the same
variables with ``_FILE`` appended (docker secrets).

Which flag feeds which field of the crawler's parts is written down once, in
the tables at the end (:data:`HTTP`, :data:`RULES`, :data:`CRAWLER`,
:data:`FILTER`); :func:`pick` reads them off the parsed flags.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

from nomad import DEFAULT_USER_AGENT, VERSION
from photocore.settings import (
    Settings,
    UserError,
    endpoint,
    finite_float,
    non_negative_float,
    non_negative_int,
    port_or_off,
    positive_float,
    positive_int,
    probability,
    read_secret,
)

__all__ = ["DEFAULT_USER_AGENT", "VERSION", "PREFIX", "Flags", "add_crawl_flags", "add_common_flags", "many", "secret",
           "positive", "non_negative", "pick", "HTTP", "RULES", "CRAWLER", "FILTER", "REVIEW", "UserError"]

PREFIX = "NOMAD_"


class Flags(Settings):
    """The ``NOMAD_`` settings layer on one parser or argument group.

    Its ``add(flag, type=, default=, help=, many=, sep=)`` and ``switch(flag, default=, help=)``
    are the interface the listing sources' ``add_flags(flags)`` hooks call.
    """

    def __init__(self, parser: argparse.ArgumentParser | Any, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(parser, PREFIX, environ)


_Flags = Flags  # the name the sources' tests (and older code) use


def many(args: argparse.Namespace, name: str) -> list[Any]:
    """A list flag's values (the flags given, else its variable's list, else its default); kept for the sources."""
    return list(getattr(args, name, None) or [])


def secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE``; an unreadable file is a :class:`UserError`."""
    return read_secret(name, environ)


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """The shared validator refusing zero and negatives for ``int`` or ``float`` (kept for the sources' flags)."""
    return positive_int if kind is int else positive_float


def non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """The shared validator refusing negatives (0: 'no wait') for ``int`` or ``float``."""
    return non_negative_int if kind is int else non_negative_float


def add_crawl_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Flags shared by ``nomad run``, ``nomad once`` and ``nomad sources``, in documented groups."""
    g = Flags(parser.add_argument_group("sources"), environ)
    g.add("--listing", many=True, default=["r/all/new"], help="reddit listing to poll, repeatable (r/<sub>/<new|hot|top|rising>)")
    g.switch("--backfill", default=False, help="follow 'after' through older pages up to reddit's ~1000-item cap")
    g.add("--reddit-url", default="https://www.reddit.com", help="reddit base URL (Atom feeds, anonymous JSON and the OAuth token endpoint)")
    g.add("--reddit-oauth-url", default="https://oauth.reddit.com", help="reddit OAuth API URL (used when REDDIT_CLIENT_ID/SECRET are set)")
    g.add("--imgur-api-url", default="https://api.imgur.com", help="imgur API base URL (needs IMGUR_CLIENT_ID)")
    g.add("--flickr-api-url", default="https://api.flickr.com/services/rest", help="flickr REST endpoint (needs FLICKR_API_KEY)")
    g.add("--user-agent", default=DEFAULT_USER_AGENT, help="User-Agent, reddit's form '<platform>:<app id>:<version> (by /u/<user>)'")
    g.add("--reddit-retries", type=non_negative_int, default=4, help="retries of a reddit request on 429/5xx/timeouts (backoff with jitter)")
    g.add("--ratelimit-reserve", type=non_negative_float, default=1.0, help="sleep until reddit's window resets when this many requests remain")
    # --source and each listing source's own --<name>-... flags (nomad/sources/registry.py).
    from nomad.sources import registry

    registry.add_flags(g)

    r = Flags(parser.add_argument_group("rules"), environ)
    r.add("--min-long-side", type=non_negative_int, default=1280, help="minimum long side in pixels (orientation-aware 1280x1024)")
    r.add("--min-short-side", type=non_negative_int, default=1024, help="minimum short side in pixels")
    r.add("--max-wide", type=positive_float, default=3.0, help="maximum width/height")
    r.add("--max-tall", type=positive_float, default=2.0, help="maximum height/width")
    r.switch("--skip-nsfw", default=True, help="skip posts marked over_18")
    r.switch("--skip-spoilers", default=True, help="skip posts marked as spoilers")
    r.add("--allow-domain", many=True, default=[], help="only download images from these domains (and subdomains), repeatable; empty: all")
    r.add("--deny-domain", many=True, default=[], help="never download from these domains (and subdomains), repeatable")
    r.add("--deny-subreddit", many=True, default=[], help="skip posts from these subreddits, repeatable")

    h = Flags(parser.add_argument_group("fetching"), environ)
    h.add("--resolve", many=True, sep=None, default=[], help="pin HOST:PORT:ADDR like curl (a pinned address is trusted), repeatable")
    h.add("--ca-bundle", default=None, help="PEM file of extra trusted CA certificates")
    h.switch("--allow-private-addresses", default=False, help="turn the SSRF guard off (private/loopback addresses allowed)")
    h.add("--connect-timeout", type=positive_float, default=5.0, help="seconds to connect")
    h.add("--read-timeout", type=positive_float, default=20.0, help="seconds between bytes")
    h.add("--deadline", type=positive_float, default=60.0, help="seconds for one whole download, body included")
    h.add("--max-bytes", type=positive_int, default=50 * 1024 * 1024, help="byte cap per download (streamed, Content-Length not trusted)")
    h.add("--max-pixels", type=positive_int, default=40_000_000, help="largest image decoded (decompression-bomb limit)")
    h.add("--workers", type=positive_int, default=4, help="download threads")
    h.add("--per-host", type=positive_int, default=2, help="concurrent requests per host")
    h.add("--http-retries", type=non_negative_int, default=3, help="retries of a download on 5xx/429/timeouts")

    d = Flags(parser.add_argument_group("filter and delivery"), environ)
    d.add("--anti-sus", type=endpoint, default="tcp://127.0.0.1:7777", help="anti_sus endpoint")
    d.add("--anti-sus-timeout", type=positive_float, default=60.0, help="seconds to wait for one anti_sus reply")
    d.add("--anti-sus-server-key", default=None, help="anti_sus CURVE public key file (enables CURVE)")
    d.add("--anti-sus-client-key", default=None, help="nomad's CURVE secret key file (with --anti-sus-server-key)")
    # The thresholds belong to anti_sus: nomad sends an override only when one is set here on purpose.
    d.add("--gmm-threshold", type=finite_float, default=None, shown="none: the server decides",
          help="per-request GMM threshold override, a finite number")
    d.add("--watermark-threshold", type=probability, default=None, shown="none: the server decides",
          help="per-request watermark threshold override, within [0, 1]")
    d.add("--batch-size", type=positive_int, default=64, help="images per anti_sus request")
    d.add("--batch-timeout", type=positive_float, default=30.0, help="seconds a partial batch waits before it is sent")
    d.add("--gallery", type=endpoint, default="tcp://127.0.0.1:7778", help="gallery_bridge endpoint (ignored with --save-dir)")
    d.add("--gallery-timeout", type=positive_float, default=30.0, help="seconds to wait for one gallery_bridge acknowledgement")
    d.add("--gallery-server-key", default=None, help="gallery_bridge's CURVE public key file (enables CURVE)")
    d.add("--gallery-client-key", default=None, help="nomad's CURVE secret key file (with --gallery-server-key)")
    d.switch("--dupskip", default=True, help="before anti_sus, ask the gallery (have op) and drop images it already holds, "
             "exact or near copies (never with --save-dir; a gallery that does not answer skips the check)")
    d.add("--dupskip-timeout", type=positive_float, default=2.0,
          help="seconds to wait for the gallery's have answer before sending the batch to anti_sus unchecked")
    d.add("--max-delivery-attempts", type=positive_int, default=10,
          help="failed deliveries of one image before it moves to the dead letters (see 'nomad retry-dead')")
    d.switch("--background-delivery", default=True, help="deliver accepted images in a background thread while the next "
             "batches are downloaded and filtered (--no-background-delivery: all at the end of each cycle)")
    d.add("--save-dir", default=None, help="standalone mode: write accepted images + JSON sidecars here instead of gallery_bridge")
    d.add("--max-retries", type=non_negative_int, default=3, help="times a failed download or expansion is retried (across cycles and restarts)")
    d.add("--backoff-max", type=positive_float, default=30.0, help="longest wait between retries to anti_sus/gallery_bridge")

    v = Flags(parser.add_argument_group("review sample (rejected images sent to the gallery's review queue)"), environ)
    v.switch("--review", default=True, help="send a sample of what anti_sus rejected, nearest the thresholds first, "
             "to gallery_bridge's review queue (never with --save-dir; only a sample: failures drop it)")
    v.add("--review-per-cycle", type=positive_int, default=20, help="most review items sent per poll cycle")
    v.add("--review-rate", type=probability, default=0.1, help="fraction of the rejected images sampled, within [0, 1]")
    v.add("--review-queue", type=positive_int, default=16, help="review items waiting to be sent; more are dropped")


def add_common_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """State and logging flags every command has."""
    s = Flags(parser.add_argument_group("state and logs"), environ)
    s.add("--state-dir", default="state", help="folder of the SQLite state DB, spooled and outbox images")
    s.add("--log-format", default="text", choices=["text", "json"], help="log line format")
    s.add("--log-level", default="INFO", help="log level")
    s.add("--metrics-port", type=port_or_off, default=0, help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")


# -- which flag feeds which field: field name -> flag dest, in one place ---------------------------------

def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


HTTP: dict[str, str] = {
    **_same("user_agent", "connect_timeout", "read_timeout", "deadline", "max_bytes", "resolve", "ca_bundle", "per_host"),
    "allow_private": "allow_private_addresses",
    "retries": "http_retries",
}
"""``nomad.http.HttpConfig`` fields from flags (its ``backoff_max`` is not ``--backoff-max``, which is delivery's)."""

RULES: dict[str, str] = {
    **_same("max_wide", "max_tall", "skip_nsfw", "skip_spoilers"),
    "min_long": "min_long_side",
    "min_short": "min_short_side",
    "allow_domains": "allow_domain",
    "deny_domains": "deny_domain",
    "deny_subreddits": "deny_subreddit",
}
"""``nomad.rules.Rules`` fields from flags."""

CRAWLER: dict[str, str] = _same("workers", "batch_size", "batch_timeout", "max_retries", "max_pixels", "backoff_max",
                                "max_delivery_attempts", "background_delivery")
"""``nomad.crawler.CrawlerConfig`` fields from flags."""

FILTER: dict[str, str] = _same("gmm_threshold", "watermark_threshold", "backoff_max")
"""``nomad.delivery.FilterStage`` keyword arguments from flags."""

REVIEW: dict[str, str] = {"per_cycle": "review_per_cycle", "rate": "review_rate", "queue": "review_queue",
                          "max_pixels": "max_pixels"}
"""``nomad.delivery.review.ReviewConfig`` fields from flags."""


def pick(args: argparse.Namespace, table: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for one of the crawler's parts: ``{field: args.<flag dest>}`` for each entry of ``table``.

    List flags come as fresh lists, so the part may keep (and change) them.
    """
    out: dict[str, Any] = {}
    for name, dest in table.items():
        value = getattr(args, dest)
        out[name] = list(value) if isinstance(value, list) else value
    return out

