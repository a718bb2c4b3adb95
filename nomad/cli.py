"""``nomad run | once | stats``: the crawler's command line.

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
from typing import Any, Mapping, Sequence

from nomad import config as cfg

log = logging.getLogger("nomad")

EXIT_USAGE = 2
EXIT_UNFINISHED = 3
EXIT_NO_LISTING = 4


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="nomad",
        description="Crawl reddit (new posts), imgur and flickr for good photos; filter them with anti_sus; "
        "deliver them to gallery_bridge or a folder. Credentials: REDDIT_CLIENT_ID, REDDIT_CLIENT_SECRET, "
        "IMGUR_CLIENT_ID, FLICKR_API_KEY (or *_FILE) from the environment.",
    )
    parser.add_argument("--version", action="version", version=f"nomad {cfg.VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="poll forever (every --interval seconds); SIGTERM stops after flushing")
    cfg._Flags(run, env).add("--interval", type=cfg.positive(float), default=60.0, help="seconds between poll cycles")
    cfg.add_crawl_flags(run, env)
    cfg.add_common_flags(run, env)

    once = sub.add_parser("once", help="one poll cycle; exits when every image is decided and delivered")
    cfg._Flags(once, env).add(
        "--wait-limit", type=float, default=0.0,
        help="give up waiting for anti_sus/gallery after this many seconds and exit 3 (0: wait until SIGTERM)",
    )
    cfg.add_crawl_flags(once, env)
    cfg.add_common_flags(once, env)

    stats = sub.add_parser("stats", help="counts from the state DB")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    cfg.add_common_flags(stats, env)
    return parser


def _http_config(args: argparse.Namespace) -> Any:
    from nomad.http import HttpConfig

    return HttpConfig(
        user_agent=args.user_agent,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        deadline=args.deadline,
        max_bytes=args.max_bytes,
        allow_private=args.allow_private_addresses,
        resolve=cfg.many(args, "resolve"),
        ca_bundle=args.ca_bundle,
        per_host=args.per_host,
        retries=max(0, args.http_retries),
    )


def build_crawler(args: argparse.Namespace, stop: threading.Event, environ: Mapping[str, str] | None = None) -> Any:
    """Wire the crawler from parsed flags and the environment (secrets)."""
    from anti_sus.client import FilterClient
    from nomad.crawler import Crawler, CrawlerConfig, Metrics
    from nomad.delivery import FilterStage, GalleryDeliverer, SaveDirDeliverer
    from nomad.http import HttpClient
    from nomad.rules import Rules
    from nomad.sources.flickr import FlickrClient
    from nomad.sources.imgur import ImgurClient
    from nomad.sources.reddit import RedditClient, RedditConfig
    from nomad.store import Store

    env = os.environ if environ is None else environ
    http = HttpClient(_http_config(args))
    metrics = Metrics()
    client_id, client_secret = cfg.secret("REDDIT_CLIENT_ID", env), cfg.secret("REDDIT_CLIENT_SECRET", env)
    if bool(client_id) != bool(client_secret):
        raise ValueError("set both REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET for OAuth, or neither")
    reddit = RedditClient(
        http,
        RedditConfig(
            base_url=args.reddit_url,
            oauth_url=args.reddit_oauth_url,
            client_id=client_id,
            client_secret=client_secret,
            user_agent=args.user_agent,
            ratelimit_reserve=args.ratelimit_reserve,
            max_retries=max(0, args.reddit_retries),
        ),
        sleep=stop.wait,
        on_wait=lambda why, s: metrics.wait("reddit"),
    )
    imgur = ImgurClient(http, api_url=args.imgur_api_url, client_id=cfg.secret("IMGUR_CLIENT_ID", env))
    flickr = FlickrClient(http, api_url=args.flickr_api_url, api_key=cfg.secret("FLICKR_API_KEY", env))
    rules = Rules(
        min_long=args.min_long_side,
        min_short=args.min_short_side,
        max_wide=args.max_wide,
        max_tall=args.max_tall,
        skip_nsfw=args.skip_nsfw,
        skip_spoilers=args.skip_spoilers,
        allow_domains=cfg.many(args, "allow_domain"),
        deny_domains=cfg.many(args, "deny_domain"),
        deny_subreddits=cfg.many(args, "deny_subreddit"),
    )
    client_keys = args.anti_sus_client_key if args.anti_sus_server_key else None
    filter_client = FilterClient(
        args.anti_sus, timeout=args.anti_sus_timeout, retries=1,
        curve_server_key=args.anti_sus_server_key, curve_client_keys=client_keys,
    )
    filter_stage = FilterStage(
        filter_client,
        gmm_threshold=args.gmm_threshold,
        watermark_threshold=args.watermark_threshold,
        backoff_max=args.backoff_max,
        on_unavailable=lambda: metrics.error("anti_sus_unavailable"),
    )
    deliverer = SaveDirDeliverer(args.save_dir) if args.save_dir else GalleryDeliverer(args.gallery, timeout=args.gallery_timeout)
    store = Store(args.state_dir)
    return Crawler(
        CrawlerConfig(
            listings=cfg.many(args, "listing"),
            backfill=args.backfill,
            workers=args.workers,
            batch_size=args.batch_size,
            batch_timeout=args.batch_timeout,
            max_retries=args.max_retries,
            max_pixels=args.max_pixels,
            backoff_max=args.backoff_max,
        ),
        store=store,
        rules=rules,
        http=http,
        reddit=reddit,
        imgur=imgur,
        flickr=flickr,
        filter_stage=filter_stage,
        deliverer=deliverer,
        stop=stop,
        metrics=metrics,
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
        if isinstance(counts, dict):
            body = "  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"
        else:
            body = str(counts)
        print(f"{section:16s} {body}")
    return 0


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current batch is flushed", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from anti_sus.observe import setup_logging, start_metrics

    try:
        setup_logging(args.log_format, args.log_level)
    except ValueError as exc:
        parser.error(f"--log-level: {exc}")
    from nomad.net import redact

    # Every log line (urllib3's request lines at DEBUG included) is masked, with the credentials
    # of the environment registered so an error body echoing one is masked too.
    redact.install()
    redact.register_env_secrets(os.environ)
    if args.command == "stats":
        return _print_stats(args)

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
            log.info("nomad run: polling %s every %.0fs", ", ".join(crawler.cfg.listings), args.interval)
            crawler.run(args.interval)
            return 0
        timer = None
        if args.wait_limit > 0:
            timer = threading.Timer(args.wait_limit, stop.set)
            timer.daemon = True
            timer.start()
        stats = crawler.cycle(final=True)
        if timer is not None:
            timer.cancel()
        crawler.shutdown()
        if stats.listings_failed and stats.listings_failed == len(crawler.cfg.listings) and not stats.posts_seen:
            print(f"nomad: error: could not read any listing ({redact.redact(stats.listing_error)})", file=sys.stderr)
            return EXIT_NO_LISTING
        left = crawler.store.outbox_size()
        if left or (stop.is_set() and crawler.pending()):
            print(f"nomad: stopped with {crawler.pending()} image(s) undecided or undelivered (kept in {args.state_dir})", file=sys.stderr)
            return EXIT_UNFINISHED
        return 0
    except KeyboardInterrupt:
        return EXIT_UNFINISHED
    finally:
        crawler.store.close()
