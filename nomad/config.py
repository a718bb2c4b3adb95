"""nomad's flags: every one also readable from a ``NOMAD_…`` environment variable.

Secrets never travel as flags (they would show in ``ps``): reddit, imgur and
flickr credentials come from ``REDDIT_CLIENT_ID``/``REDDIT_CLIENT_SECRET``,
``IMGUR_CLIENT_ID`` and ``FLICKR_API_KEY``, or from files named by the same
variables with ``_FILE`` appended (docker secrets).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn


VERSION = "0.1.0"
DEFAULT_USER_AGENT = f"python:nomad-photo-miner:{VERSION} (by /u/nomad_operator)"


def fail(message: str) -> NoReturn:
    """A configuration mistake: one line on stderr and exit status 2, like argparse."""
    print(f"nomad: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def env_name(flag: str) -> str:
    """``--batch-size`` -> ``NOMAD_BATCH_SIZE``."""
    return "NOMAD_" + flag.lstrip("-").replace("-", "_").upper()


class _Flags:
    """Adds flags whose default comes from the environment, and says so in --help."""

    def __init__(self, parser: argparse.ArgumentParser | Any, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.env = environ

    def add(self, flag: str, *, type: Callable[[str], Any] = str, default: Any = None, help: str, many: bool = False, sep: str | None = ",", **kw: Any) -> None:
        name = env_name(flag)
        raw = self.env.get(name)
        if raw is not None and raw != "":
            try:
                if many:
                    default = [type(v.strip()) for v in raw.split(sep) if v.strip()]
                else:
                    default = type(raw)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                fail(f"environment variable {name}={raw!r}: {exc}")
        shown = ",".join(map(str, default)) if many and default else default
        listed = (", comma-separated" if sep == "," else ", space-separated") if many else ""
        text = f"{help} (default: {shown}) [env {name}{listed}]"
        if many:
            self.parser.add_argument(flag, type=type, action="append", default=None, help=text, **kw)
            self.parser.set_defaults(**{flag.lstrip("-").replace("-", "_") + "_default": list(default or [])})
        else:
            self.parser.add_argument(flag, type=type, default=default, help=text, **kw)

    def switch(self, flag: str, *, default: bool, help: str) -> None:
        """``--flag/--no-flag``; env accepts 1/0, true/false, yes/no."""
        name = env_name(flag)
        raw = self.env.get(name)
        if raw:
            if raw.lower() in ("1", "true", "yes", "on"):
                default = True
            elif raw.lower() in ("0", "false", "no", "off"):
                default = False
            else:
                fail(f"environment variable {name}={raw!r}: expected 1/0, true/false")
        self.parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=f"{help} (default: {default}) [env {name}]"
        )


def many(args: argparse.Namespace, name: str) -> list[Any]:
    """A repeatable flag's values: the flags given, else its env/default list."""
    given = getattr(args, name, None)
    return list(given) if given else list(getattr(args, name + "_default", []) or [])


def secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE``."""
    env = os.environ if environ is None else environ
    if env.get(name):
        return env[name].strip()
    path = env.get(name + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            fail(f"cannot read {name}_FILE={path}: {exc}")
    return None


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that refuses zero and negative numbers with a clear message."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that refuses negative numbers (0 is allowed: 'no wait')."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_crawl_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Flags shared by ``nomad run`` and ``nomad once``, in documented groups."""
    g = _Flags(parser.add_argument_group("sources"), environ)
    g.add("--listing", many=True, default=["r/all/new"], help="reddit listing to poll, repeatable (r/<sub>/<new|hot|top|rising>)")
    g.switch("--backfill", default=False, help="follow 'after' through older pages up to reddit's ~1000-item cap")
    g.add("--reddit-url", default="https://www.reddit.com", help="reddit base URL (Atom feeds, anonymous JSON and the OAuth token endpoint)")
    g.add("--reddit-oauth-url", default="https://oauth.reddit.com", help="reddit OAuth API URL (used when REDDIT_CLIENT_ID/SECRET are set)")
    g.add("--imgur-api-url", default="https://api.imgur.com", help="imgur API base URL (needs IMGUR_CLIENT_ID)")
    g.add("--flickr-api-url", default="https://api.flickr.com/services/rest", help="flickr REST endpoint (needs FLICKR_API_KEY)")
    g.add("--user-agent", default=DEFAULT_USER_AGENT, help="User-Agent, reddit's form '<platform>:<app id>:<version> (by /u/<user>)'")
    g.add("--reddit-retries", type=int, default=4, help="retries of a reddit request on 429/5xx/timeouts (backoff with jitter)")
    g.add("--ratelimit-reserve", type=float, default=1.0, help="sleep until reddit's window resets when this many requests remain")
    # --source and each listing source's own --<name>-... flags (nomad/sources/registry.py).
    from nomad.sources import registry

    registry.add_flags(g)

    r = _Flags(parser.add_argument_group("rules"), environ)
    r.add("--min-long-side", type=int, default=1280, help="minimum long side in pixels (orientation-aware 1280x1024)")
    r.add("--min-short-side", type=int, default=1024, help="minimum short side in pixels")
    r.add("--max-wide", type=positive(float), default=3.0, help="maximum width/height")
    r.add("--max-tall", type=positive(float), default=2.0, help="maximum height/width")
    r.switch("--skip-nsfw", default=True, help="skip posts marked over_18")
    r.switch("--skip-spoilers", default=True, help="skip posts marked as spoilers")
    r.add("--allow-domain", many=True, default=[], help="only download images from these domains (and subdomains), repeatable; empty: all")
    r.add("--deny-domain", many=True, default=[], help="never download from these domains (and subdomains), repeatable")
    r.add("--deny-subreddit", many=True, default=[], help="skip posts from these subreddits, repeatable")

    h = _Flags(parser.add_argument_group("fetching"), environ)
    h.add("--resolve", many=True, sep=None, default=[], help="pin HOST:PORT:ADDR like curl (a pinned address is trusted), repeatable")
    h.add("--ca-bundle", default=None, help="PEM file of extra trusted CA certificates")
    h.switch("--allow-private-addresses", default=False, help="turn the SSRF guard off (private/loopback addresses allowed)")
    h.add("--connect-timeout", type=positive(float), default=5.0, help="seconds to connect")
    h.add("--read-timeout", type=positive(float), default=20.0, help="seconds between bytes")
    h.add("--deadline", type=positive(float), default=60.0, help="seconds for one whole download, body included")
    h.add("--max-bytes", type=positive(int), default=50 * 1024 * 1024, help="byte cap per download (streamed, Content-Length not trusted)")
    h.add("--max-pixels", type=positive(int), default=40_000_000, help="largest image decoded (decompression-bomb limit)")
    h.add("--workers", type=positive(int), default=4, help="download threads")
    h.add("--per-host", type=positive(int), default=2, help="concurrent requests per host")
    h.add("--http-retries", type=int, default=3, help="retries of a download on 5xx/429/timeouts")

    d = _Flags(parser.add_argument_group("filter and delivery"), environ)
    d.add("--anti-sus", default="tcp://127.0.0.1:7777", help="anti_sus endpoint")
    d.add("--anti-sus-timeout", type=positive(float), default=60.0, help="seconds to wait for one anti_sus reply")
    d.add("--anti-sus-server-key", default=None, help="anti_sus CURVE public key file (enables CURVE)")
    d.add("--anti-sus-client-key", default=None, help="nomad's CURVE secret key file (with --anti-sus-server-key)")
    # anti_sus's own validators: a value anti_sus would refuse is refused here, at start (exit 2).
    from anti_sus.cli import finite, probability

    d.add("--gmm-threshold", type=finite, default=None, help="per-request GMM threshold override, a finite number (default: the server's)")
    d.add("--watermark-threshold", type=probability, default=None, help="per-request watermark threshold override, within [0, 1] (default: the server's)")
    d.add("--batch-size", type=positive(int), default=64, help="images per anti_sus request")
    d.add("--batch-timeout", type=positive(float), default=30.0, help="seconds a partial batch waits before it is sent")
    d.add("--gallery", default="tcp://127.0.0.1:7778", help="gallery_bridge endpoint (ignored with --save-dir)")
    d.add("--gallery-timeout", type=positive(float), default=30.0, help="seconds to wait for one gallery_bridge acknowledgement")
    d.add("--gallery-server-key", default=None, help="gallery_bridge's CURVE public key file (enables CURVE)")
    d.add("--gallery-client-key", default=None, help="nomad's CURVE secret key file (with --gallery-server-key)")
    d.add("--max-delivery-attempts", type=positive(int), default=10,
          help="failed deliveries of one image before it moves to the dead letters (see 'nomad retry-dead')")
    d.add("--save-dir", default=None, help="standalone mode: write accepted images + JSON sidecars here instead of gallery_bridge")
    d.add("--max-retries", type=int, default=3, help="times a failed download or expansion is retried (across cycles and restarts)")
    d.add("--backoff-max", type=positive(float), default=30.0, help="longest wait between retries to anti_sus/gallery_bridge")


def add_common_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """State and logging flags every command has."""
    s = _Flags(parser.add_argument_group("state and logs"), environ)
    s.add("--state-dir", default="state", help="folder of the SQLite state DB, spooled and outbox images")
    s.add("--log-format", default="text", choices=["text", "json"], help="log line format")
    s.add("--log-level", default="INFO", help="log level")
    s.add("--metrics-port", type=int, default=0, help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)")
