"""``nomad run | once | sources | stats | retry-dead``: the crawler's command line.

Every user-caused failure (bad flag, unreadable CA bundle, state dir not
writable, anti_sus/gallery unreachable in ``once`` with a wait limit) ends
with one clear message and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from nomad import config as cfg
from photocore.settings import Parser, UserError, non_negative_float, positive_float

log = logging.getLogger("nomad")

EXIT_USAGE = 2
EXIT_UNFINISHED = 3
EXIT_NO_LISTING = 4


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``nomad`` parser; defaults come from ``environ`` (``os.environ`` when None).

    A bad ``NOMAD_…`` value raises :class:`photocore.settings.UserError` naming the variable.
    """
    env = os.environ if environ is None else environ
    parser = Parser(
        prog="nomad",
        description="Crawl listing sources (reddit, commons, flickr, bluesky; see `nomad sources`) for good photos, "
        "expanding imgur and flickr links; filter them with anti_sus; deliver them to gallery_bridge or a folder. "
        "Every source has a key-less mode; optional credentials: REDDIT_CLIENT_ID, REDDIT_CLIENT_SECRET, "
        "IMGUR_CLIENT_ID, FLICKR_API_KEY (or *_FILE) from the environment.",
    )
    parser.add_argument("--version", action="version", version=f"nomad {cfg.VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="poll forever (every --interval seconds); SIGTERM stops after flushing")
    cfg.Flags(run, env).add("--interval", type=positive_float, default=60.0, help="seconds between poll cycles")
    cfg.add_crawl_flags(run, env)
    cfg.add_common_flags(run, env)

    once = sub.add_parser("once", help="one poll cycle; exits when every image is decided and delivered")
    cfg.Flags(once, env).add(
        "--wait-limit", type=non_negative_float, default=0.0,
        help="give up waiting for anti_sus/gallery after this many seconds and exit 3 (0: wait until SIGTERM)",
    )
    cfg.add_crawl_flags(once, env)
    cfg.add_common_flags(once, env)

    sources = sub.add_parser("sources", help="each listing source: on or off, credentials, last status (from the state DB)")
    sources.add_argument("--json", action="store_true", help="print JSON instead of text")
    cfg.add_crawl_flags(sources, env)
    cfg.add_common_flags(sources, env)

    stats = sub.add_parser("stats", help="counts from the state DB")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    cfg.add_common_flags(stats, env)

    retry = sub.add_parser("retry-dead", help="put dead letters (images delivery gave up on) back into the outbox")
    cfg.Flags(retry, env).add("--key", many=True, default=[], help="only this image key, repeatable (default: every dead letter)")
    cfg.add_common_flags(retry, env)
    return parser


def build_crawler(args: argparse.Namespace, stop: threading.Event, environ: Mapping[str, str] | None = None) -> Any:
    """Wire the crawler from parsed flags (mapped by the tables in :mod:`nomad.config`) and the environment (secrets)."""
    from anti_sus.client import FilterClient
    from nomad.crawler import Crawler, CrawlerConfig, Metrics
    from nomad.delivery import FilterStage, GalleryDeliverer, SaveDirDeliverer, curve_keys
    from nomad.http import HttpClient, HttpConfig
    from nomad.rules import Rules
    from nomad.sources import registry
    from nomad.store import Store

    env = os.environ if environ is None else environ
    http = HttpClient(HttpConfig(**cfg.pick(args, cfg.HTTP)))
    metrics = Metrics()
    store = Store(args.state_dir)
    ctx = registry.CrawlContext(
        http=http,
        user_agent=args.user_agent,
        environ=env,
        sleep=stop.wait,
        on_status=lambda name, st: store.set_source_status(name, st.state, st.detail, st.at or time.time()),
        on_wait=lambda name, why, s: metrics.wait(name),
    )
    try:
        sources = registry.build_sources(args, ctx)
        # Checked now, not at the first request: a wrong key file is a start-up error (exit 2).
        anti_curve = curve_keys(args.anti_sus_server_key, args.anti_sus_client_key, service="anti-sus")
        gallery_curve = None if args.save_dir else curve_keys(args.gallery_server_key, args.gallery_client_key, service="gallery")
    except (ValueError, OSError, UserError):
        store.close()
        http.close()
        raise
    for source in sources:
        log.info("source %s", source.describe())
    filter_client = FilterClient(
        args.anti_sus, timeout=args.anti_sus_timeout, retries=1,
        curve_server_key=anti_curve[0] if anti_curve else None,
        curve_client_keys=(anti_curve[1], anti_curve[2]) if anti_curve else None,
    )
    review = None
    if args.review and not args.save_dir:
        from nomad.delivery.review import ReviewConfig, ReviewSampler, gallery_sender, server_thresholds

        review = ReviewSampler(
            gallery_sender(args.gallery, timeout=args.gallery_timeout, curve=gallery_curve),
            ReviewConfig(**cfg.pick(args, cfg.REVIEW)),
            # Asked only if anti_sus predates thresholds in its replies.
            thresholds=server_thresholds(filter_client.info, {"gmm": args.gmm_threshold, "watermark": args.watermark_threshold}),
            on_count=metrics.review,
        )
    filter_stage = FilterStage(filter_client, **cfg.pick(args, cfg.FILTER), features="all" if review else True,
                               on_unavailable=lambda: metrics.error("anti_sus_unavailable"))
    dupskip = None
    if args.save_dir:
        deliverer: Any = SaveDirDeliverer(args.save_dir)
    else:
        deliverer = GalleryDeliverer(args.gallery, timeout=args.gallery_timeout, curve=gallery_curve)
        if args.dupskip:  # only a gallery can say what it holds
            from nomad.delivery.dupskip import DupSkip

            dupskip = DupSkip.for_gallery(args.gallery, timeout=args.dupskip_timeout, curve=gallery_curve)
    return Crawler(
        CrawlerConfig(**cfg.pick(args, cfg.CRAWLER)),
        store=store,
        rules=Rules(**cfg.pick(args, cfg.RULES)),
        http=http,
        sources=sources,
        expanders=registry.build_expanders(http, args, env),
        size_rules=registry.size_rules(args, [s.name for s in sources]),
        filter_stage=filter_stage,
        deliverer=deliverer,
        stop=stop,
        metrics=metrics,
        review=review,
        dupskip=dupskip,
    )


def _print_stats(args: argparse.Namespace) -> int:
    from nomad.store import Store

    if not os.path.isfile(os.path.join(args.state_dir, "nomad.sqlite3")):
        print(f"nomad: error: no state DB in {args.state_dir} (run 'nomad once' or 'nomad run' first)", file=sys.stderr)
        return EXIT_USAGE
    with Store(args.state_dir) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=1, sort_keys=True))
        return 0
    for section, counts in stats.items():
        if section == "dead_letters":
            continue
        if isinstance(counts, dict):
            body = "  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"
        else:
            body = str(counts)
        print(f"{section:16s} {body}")
    dead = stats.get("dead_letters") or []
    print(f"{'dead_letters':16s} {len(dead)}" + ("  (nomad retry-dead puts them back)" if dead else ""))
    for d in dead:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d["died"])))
        print(f"  {d['key']}  attempts={d['attempts']}  at {when}  reason: {d['reason']}")
    return 0


def _retry_dead(args: argparse.Namespace) -> int:
    """``nomad retry-dead [--key K]``: dead letters back into the outbox, attempts reset."""
    from nomad.store import Store

    if not os.path.isfile(os.path.join(args.state_dir, "nomad.sqlite3")):
        print(f"nomad: error: no state DB in {args.state_dir}", file=sys.stderr)
        return EXIT_USAGE
    keys = list(args.key)
    with Store(args.state_dir) as store:
        moved = store.retry_dead(keys or None)
    missing = [k for k in keys if k not in moved]
    print(f"requeued {len(moved)} dead letter(s) into the outbox" + "".join(f"\n  {k}" for k in moved))
    if missing:
        print(f"nomad: error: not a dead letter: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _print_sources(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """``nomad sources``: each listing source, on/off and why, credentials, last status (ok / blocked / rate_limited)."""
    from nomad.sources import registry
    from nomad.store import Store

    env = os.environ if environ is None else environ
    statuses: dict[str, dict[str, Any]] = {}
    if os.path.isfile(os.path.join(args.state_dir, "nomad.sqlite3")):
        with Store(args.state_dir) as store:
            statuses = store.source_statuses()
    try:
        rows = registry.rows(args, env, statuses)
        registry.selected(args, env)  # an unknown --source is an error here too
    except ValueError as exc:
        print(f"nomad: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1, sort_keys=True))
        return 0
    for r in rows:
        st = r.status
        if st.get("at"):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(st["at"])))
            last = f"{st.get('state', '?')} at {when}" + (f" ({st['detail']})" if st.get("detail") else "")
        else:
            last = "never polled"
        print(f"{r.name:8s} {'on ' if r.on else 'off'} ({r.why}); credentials: {r.credentials}; last: {last}")
    return 0


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current batch is flushed", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``nomad``: a user's mistake (bad variable, unreadable secret file, …) is one line and exit 2."""
    from photocore import redact
    from photocore.blas import single_threaded_blas

    single_threaded_blas()  # before numpy loads: the crawl does no BLAS work worth OpenBLAS's spinning threads

    try:
        return _main(argv)
    except UserError as exc:
        print(f"nomad: error: {redact.redact(exc)}", file=sys.stderr)
        return exc.status


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from photocore.observe import setup_logging, start_metrics

    try:
        setup_logging(args.log_format, args.log_level)
    except ValueError as exc:
        parser.error(f"--log-level: {exc}")
    from photocore import redact

    # Every log line (urllib3's request lines at DEBUG included) is masked, with the credentials
    # of the environment registered so an error body echoing one is masked too.
    redact.install()
    redact.register_env_secrets(os.environ)
    if args.command == "stats":
        return _print_stats(args)
    if args.command == "retry-dead":
        return _retry_dead(args)
    if args.command == "sources":
        return _print_sources(args)

    stop = threading.Event()
    _install_signals(stop)
    try:
        crawler = build_crawler(args, stop)
        start_metrics(args.metrics_port)
    except (ValueError, OSError) as exc:
        print(f"nomad: error: {redact.redact(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            log.info("nomad run: polling %s every %.0fs", ", ".join(s.name for s in crawler.sources), args.interval)
            crawler.run(args.interval)
            return 0
        timer = None
        gave_up = threading.Event()  # the wait limit, not a signal, stopped the cycle

        def give_up() -> None:
            gave_up.set()
            stop.set()

        if args.wait_limit > 0:
            timer = threading.Timer(args.wait_limit, give_up)
            timer.daemon = True
            timer.start()
        stats = crawler.cycle(final=True)
        if timer is not None:
            timer.cancel()
        crawler.shutdown()
        if stats.listings_failed and stats.listings_failed == len(crawler.sources) and not stats.posts_seen:
            print(f"nomad: error: could not read any listing ({redact.redact(stats.listing_error)})", file=sys.stderr)
            return EXIT_NO_LISTING
        left = crawler.store.outbox_size()
        dead = len(crawler.store.dead_letters())
        if dead:
            print(f"nomad: {dead} image(s) in the dead letters ('nomad stats' says why, 'nomad retry-dead' requeues)", file=sys.stderr)
        if gave_up.is_set():
            # Cut by --wait-limit: whatever it was waiting for (anti_sus, gallery_bridge, a listing
            # retrying its backoff) did not finish, even when nothing was queued yet.
            print(f"nomad: gave up after --wait-limit {args.wait_limit:g}s with {crawler.pending()} image(s) "
                  f"undecided or undelivered (kept in {args.state_dir})", file=sys.stderr)
            return EXIT_UNFINISHED
        if left or (stop.is_set() and crawler.pending()):
            print(f"nomad: stopped with {crawler.pending()} image(s) undecided or undelivered (kept in {args.state_dir})", file=sys.stderr)
            return EXIT_UNFINISHED
        return 0
    except KeyboardInterrupt:
        return EXIT_UNFINISHED
    finally:
        crawler.store.close()
