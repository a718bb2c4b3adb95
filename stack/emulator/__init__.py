"""The product's offline stand-in for the real sites: reddit, imgur, flickr, Commons, Bluesky and image hosts
over real HTTPS on loopback (used by ``python -m stack.demo``, bench/ and the tests).

It is part of the installed package and reads nothing from the repository (no ``tests/`` files):
every response is generated from a :class:`Scenario` in memory.

Usage::

    with Emulator() as emu:                      # default_scenario(): every parser path
        run_nomad(emu.nomad_args(), env=emu.nomad_env())
        assert emu.count(host="i.redd.it") == …

The server listens on 127.0.0.1 (random port) and serves the *real* host names
with a certificate from a CA made at test time; nomad reaches it through
``--resolve HOST:PORT:127.0.0.1`` pins and ``--ca-bundle`` with its SSRF guard
on, so the demo and the tests exercise the same URLs and TLS path as production.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from . import images
from .cert import EmulatorTLS, make_tls
from .jetstream import APPVIEW_HOST, CDN_HOST, JETSTREAM_HOST
from .scenario import (
    HOSTS,
    WILDCARDS,
    FlickrPhoto,
    ImgurImage,
    Resource,
    Scenario,
    base58,
    default_scenario,
)
from .server import EmulatorHTTPServer, RateBucket, RequestRecord

__all__ = [
    "Emulator", "Scenario", "Resource", "ImgurImage", "FlickrPhoto", "RequestRecord",
    "default_scenario", "base58", "HOSTS",
]


CONTACT = "nomad-emulator@example.org"
"""The ``NOMAD_CONTACT`` of emulated runs (Commons' User-Agent must name one)."""

RENDER_CACHE_BYTES = 256 << 20
"""Encoded images an emulator keeps once rendered (a 3000x2000 JPEG is ~0.3 MB and ~70 ms of CPU to make)."""

KEYED_SITES = ("REDDIT", "IMGUR", "FLICKR")
"""Prefixes of the credential variables ``nomad_env(keyless=True)`` leaves out."""


class Emulator:
    """The emulated internet as a context manager (also ``start()``/``stop()``).

    ``scenario``: a :class:`Scenario`, a factory ``port -> Scenario``, or None for
    :func:`default_scenario`. ``rate_limit``/``rate_window``: reddit's budget per
    client (anonymous, and per OAuth client id); ``anon_rate_limit`` overrides it
    for anonymous requests (real reddit: ~10/min anonymous, 100/min OAuth).
    """

    def __init__(
        self,
        scenario: Scenario | Callable[[int], Scenario] | None = None,
        *,
        rate_limit: int = 100,
        rate_window: float = 600.0,
        anon_rate_limit: int | None = None,
        port: int = 0,
    ) -> None:
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.anon_rate_limit = rate_limit if anon_rate_limit is None else anon_rate_limit
        self.hosts: list[str] = list(HOSTS)
        self.tls: EmulatorTLS = make_tls(self.hosts, WILDCARDS)
        self.ca_bundle: str = self.tls.ca_bundle
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last open connection closes
        self._open_connections = 0
        self._stopping = threading.Event()
        self._tokens: dict[str, tuple[str, float]] = {}
        self._buckets: dict[str, RateBucket] = {}
        self._server = EmulatorHTTPServer(self, port)  # binds now: the port is known for the scenario
        self.port: int = int(self._server.server_address[1])
        if scenario is None:
            scenario = default_scenario
        self.scenario: Scenario = scenario(self.port) if callable(scenario) else scenario
        self.scenario.port = self.port
        self._thread: threading.Thread | None = None
        self._rendered: OrderedDict[tuple[int, int, str, int, int], bytes] = OrderedDict()
        self._rendered_bytes = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Emulator":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="nomad-emulator", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self.tls.cleanup()

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rendered images -------------------------------------------------------------------

    def image_bytes(self, res: Resource) -> bytes:
        """The encoded file of an ``image`` resource, rendered once and kept (LRU, ``RENDER_CACHE_BYTES``).

        A real image host costs the crawler's machine nothing to serve; rendering
        the same photo again for every request would put that CPU on this one.
        """
        key = (res.width, res.height, res.fmt, res.seed, res.orientation)
        with self._lock:
            data = self._rendered.get(key)
            if data is not None:
                self._rendered.move_to_end(key)
                return data
        data = images.picture(res.width, res.height, res.fmt, res.seed, res.orientation)
        with self._lock:
            if key not in self._rendered and len(data) <= RENDER_CACHE_BYTES:
                self._rendered[key] = data
                self._rendered_bytes += len(data)
                while self._rendered_bytes > RENDER_CACHE_BYTES:
                    _, old = self._rendered.popitem(last=False)
                    self._rendered_bytes -= len(old)
        return data

    def prerender(self) -> int:
        """Render every image file of the scenario now (benchmarks: no rendering inside a timing); returns the count."""
        n = 0
        for res in list(self.scenario.files.values()):
            if res.kind == "image":
                self.image_bytes(res)
                n += 1
        return n

    # -- what nomad needs ------------------------------------------------------------------

    def url(self, host: str, path: str) -> str:
        """``https://host:PORT/path`` (every URL the emulator emits carries its port)."""
        return self.scenario.url(host, path)

    def resolve_entries(self) -> list[str]:
        """``HOST:PORT:127.0.0.1`` for every emulated host (curl-style ``--resolve``)."""
        return [f"{h}:{self.port}:127.0.0.1" for h in self.hosts]

    def nomad_args(self) -> list[str]:
        """Flags that point nomad at the emulator with the SSRF guard still on."""
        args: list[str] = []
        for entry in self.resolve_entries():
            args += ["--resolve", entry]
        return args + [
            "--ca-bundle", self.ca_bundle,
            "--reddit-url", f"https://www.reddit.com:{self.port}",
            "--reddit-oauth-url", f"https://oauth.reddit.com:{self.port}",
            "--imgur-api-url", f"https://api.imgur.com:{self.port}",
            "--flickr-api-url", f"https://api.flickr.com:{self.port}",
            # Key-less sources: the emulator's feeds, unpaced (reddit's real feeds allow ~1 request/min).
            "--flickr-feed-url", f"https://api.flickr.com:{self.port}",
            "--reddit-feed-interval", "0", "--flickr-feed-interval", "0",
            "--commons-api-url", f"https://commons.wikimedia.org:{self.port}/w/api.php", "--commons-interval", "0",
            # Bluesky: the emulated Jetstream, AppView and CDN; a short idle end, as its live tail never ends.
            "--bluesky-jetstream-url", f"wss://{JETSTREAM_HOST}:{self.port}/subscribe",
            "--bluesky-cdn-url", f"https://{CDN_HOST}:{self.port}",
            "--bluesky-appview-url", f"https://{APPVIEW_HOST}:{self.port}",
            "--bluesky-idle-seconds", "0.5",
        ]

    def nomad_env(self, *, keyless: bool = False) -> dict[str, str]:
        """Credentials the emulated APIs accept, as the environment variables nomad reads.

        ``keyless``: without the reddit, imgur and flickr credentials (a new user's
        setup: reddit through its Atom feeds, flickr through its public feed).
        ``NOMAD_CONTACT`` (Wikimedia's User-Agent contact, no credential) is always
        set, so default-source runs read Commons too.
        """
        if keyless:
            return {k: v for k, v in self.nomad_env().items() if k.split("_", 1)[0] not in KEYED_SITES}
        scn = self.scenario
        cid, secret = next(iter(scn.reddit_clients.items()))
        return {
            "REDDIT_CLIENT_ID": cid,
            "REDDIT_CLIENT_SECRET": secret,
            "IMGUR_CLIENT_ID": next(iter(scn.imgur_client_ids)),
            "FLICKR_API_KEY": next(iter(scn.flickr_api_keys)),
            "NOMAD_CONTACT": CONTACT,
        }

    # -- observation -----------------------------------------------------------------------

    def records(self) -> list[RequestRecord]:
        """A snapshot of ``requests``."""
        with self._lock:
            return list(self.requests)

    def count(self, *, host: str | None = None, path: str | None = None, method: str | None = None) -> int:
        """How many requests matched (path: exact, or a prefix ending in ``*``)."""
        def match(r: RequestRecord) -> bool:
            if host is not None and r.host != host:
                return False
            if method is not None and r.method != method:
                return False
            if path is not None:
                return r.path.startswith(path[:-1]) if path.endswith("*") else r.path == path
            return True
        return sum(1 for r in self.records() if match(r))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no client connection is open (at most ``timeout`` s); True when idle.

        Requests are recorded before their answer goes out, but a request a client gave up on
        (a timeout, the slow body) is recorded by a handler thread that may still be running
        when the client has moved on. Once every connection is closed, ``records()`` is complete.
        A client that keeps an idle keep-alive connection open keeps this waiting (up to the
        10 s socket timeout), so call it after the client has closed its session.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._open_connections == 0, timeout)

    def reset_rate_limits(self) -> None:
        with self._lock:
            self._buckets.clear()

    # -- used by the handler ---------------------------------------------------------------

    def _connection(self, delta: int) -> None:
        with self._idle:
            self._open_connections += delta
            if self._open_connections == 0:
                self._idle.notify_all()

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def _bucket(self, client: str) -> RateBucket:
        with self._lock:
            b = self._buckets.get(client)
            if b is None:
                limit = self.anon_rate_limit if client == "anonymous" else self.rate_limit
                b = self._buckets[client] = RateBucket(limit, self.rate_window, time.monotonic())
            return b

    def _injected(self, host: str, path: str) -> int | None:
        with self._lock:
            queue = self.scenario.inject.get((host, path))
            return queue.pop(0) if queue else None
