"""Bluesky (``bluesky``): image posts from the public Jetstream websocket, key-less.

Jetstream (``wss://jetstream2.us-east.bsky.network/subscribe``) is Bluesky's
JSON rendering of the network's firehose. One cycle connects with
``wantedCollections=app.bsky.feed.post`` and ``app.bsky.actor.profile`` and the
stored ``cursor`` (``time_us`` of the last event handled, rewound a little as
Jetstream advises, so no event is lost between connections), reads until a
per-cycle post budget or time budget is spent (or the stream stays quiet for
``--bluesky-idle-seconds``), then closes. Nothing blocks forever.

What is handed on: ``create`` commits of ``app.bsky.feed.post`` with an
``app.bsky.embed.images`` embed (or ``app.bsky.embed.recordWithMedia`` whose
``media`` is one), as full-size CDN images
``https://cdn.bsky.app/img/feed_fullsize/plain/{did}/{cid}@jpeg``.

What is skipped:

* posts carrying an adult self-label (``porn``, ``sexual``, ``nudity``,
  ``graphic-media``);
* posts of authors who opted out of logged-out visibility: the
  ``!no-unauthenticated`` self-label sits on the author's *profile* record.
  Every profile commit seen on the stream updates a bounded set of opted-out
  DIDs kept in the store, and before an author's first image post is handed on
  the public AppView (``app.bsky.actor.getProfiles``, key-less) is asked for
  the profile's labels, so an opt-out made long before nomad started counts
  too. An author the AppView does not know (deleted, taken down) is skipped.
* text-only posts, posts whose ids or blob CIDs are malformed, and frames that
  are not JSON events (counted, never fatal).

Post ids are ``at://<did>/app.bsky.feed.post/<rkey>``; a post read twice (the
rewind, a restart) is dropped by ``is_seen``. The cursor advances only after
the crawler has handled the yielded post, so a kill -9 never skips one.

The websocket goes through nomad's SSRF guard: the host is resolved by the same
:class:`~nomad.net.guard.AddressPolicy` the HTTP client uses (``--resolve``
pins, ``--allow-private-addresses``), the TCP socket connects to the checked
address, and TLS verifies the host name with the HTTP client's trust store
(``--ca-bundle``).

Over 400 lines on purpose, like one gallery-dl extractor per site: the event
parsing, the opt-out lookups, the guarded websocket and the cursor rules are
all Jetstream's and change together when Bluesky changes.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
import socket
import ssl
import time
from collections import Counter, OrderedDict
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from nomad import DEFAULT_USER_AGENT
from nomad.http import HttpClient, parse_retry_after
from nomad.net.errors import BlockedAddress, FetchError
from nomad.sources.api import SiteApi, SourceContext, SourceStatus

from .base import Candidate, Cursors, Link, ListingSource, SourceConfigError, SourceError

log = logging.getLogger(__name__)

NAME = "bluesky"
DEFAULT_JETSTREAM = "wss://jetstream2.us-east.bsky.network/subscribe"
DEFAULT_CDN = "https://cdn.bsky.app"
DEFAULT_APPVIEW = "https://public.api.bsky.app"
POST = "app.bsky.feed.post"
PROFILE = "app.bsky.actor.profile"
IMAGES = "app.bsky.embed.images"
RECORD_WITH_MEDIA = "app.bsky.embed.recordWithMedia"
ADULT_LABELS = frozenset({"porn", "sexual", "nudity", "graphic-media"})
NO_UNAUTHENTICATED = "!no-unauthenticated"
CDN_MAX_SIDE = 2000
"""``feed_fullsize`` images are scaled to at most this long side."""
MIN_KNOWN_SIDE = 200
"""An ``aspectRatio`` whose long side is below this is a bare ratio (4:3), not pixels."""
REWIND_US = 2_000_000
"""Jetstream advises reconnecting a few seconds before the last event (gapless playback)."""
MAX_MESSAGE = 1 << 20
"""Largest websocket message accepted (a post event is a few KB)."""
OPTOUT_MAX = 20_000
"""Opted-out DIDs remembered (oldest forgotten first), so the store stays bounded."""
CHECKED_MAX = 50_000
"""Authors whose profile the AppView was asked about, remembered in memory."""
SAVE_EVERY = 200
"""Events between cursor saves when none is handed on (a restart re-reads at most these)."""
CURSOR = "time_us"
OPTOUT_KEY = "optout_dids"
UNKNOWN_KEY = "unknown_author_posts"
UNKNOWN_MAX = 1000
"""Posts skipped because the AppView did not know their author, remembered so the
rewind after a restart does not ask again (only the newest are ever re-read)."""
TITLE_MAX = 300

_DID = re.compile(r"^did:[a-z]+:[A-Za-z0-9._:%-]{1,2000}$")
_RKEY = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")
_CID = re.compile(r"^b[a-z2-7]{20,200}$")  # CIDv1, base32 (the only form blobs use)


# --- parsing (pure) --------------------------------------------------------------------


def self_labels(record: Mapping[str, Any]) -> set[str]:
    """Values of a record's ``com.atproto.label.defs#selfLabels`` (empty when absent or odd)."""
    labels = record.get("labels")
    if not isinstance(labels, Mapping):
        return set()
    values = labels.get("values")
    out: set[str] = set()
    for v in values if isinstance(values, list) else []:
        if isinstance(v, Mapping) and isinstance(v.get("val"), str):
            out.add(v["val"])
    return out


def embedded_images(embed: Any) -> list[Mapping[str, Any]]:
    """The image entries of a post's embed: ``images`` directly or inside ``recordWithMedia``."""
    if not isinstance(embed, Mapping):
        return []
    kind = embed.get("$type")
    if kind == RECORD_WITH_MEDIA:
        return embedded_images(embed.get("media"))
    if kind != IMAGES:
        return []
    images = embed.get("images")
    return [i for i in images if isinstance(i, Mapping)] if isinstance(images, list) else []


def blob_cid(image: Mapping[str, Any]) -> str | None:
    """The CID of an image entry's blob (``image.ref.$link``; old records: ``image.cid``)."""
    blob = image.get("image")
    if not isinstance(blob, Mapping):
        return None
    ref = blob.get("ref")
    cid = ref.get("$link") if isinstance(ref, Mapping) else blob.get("cid")
    return cid if isinstance(cid, str) and _CID.match(cid) else None


def expected_size(aspect: Any) -> tuple[int | None, int | None]:
    """Size of the full-size CDN image from ``aspectRatio``, or (None, None) when unknown.

    Clients write the uploaded image's pixel size there; the CDN scales the long
    side down to 2000. A tiny pair (``4``/``3``) is only a ratio: the decoded
    size decides then.
    """
    if not isinstance(aspect, Mapping):
        return None, None
    w, h = aspect.get("width"), aspect.get("height")
    if not isinstance(w, int) or not isinstance(h, int) or isinstance(w, bool) or isinstance(h, bool) or w <= 0 or h <= 0:
        return None, None
    if max(w, h) < MIN_KNOWN_SIDE:
        return None, None
    if max(w, h) > CDN_MAX_SIDE:
        f = CDN_MAX_SIDE / max(w, h)
        w, h = max(1, round(w * f)), max(1, round(h * f))
    return w, h


def _created(record: Mapping[str, Any], time_us: int) -> float:
    """``createdAt`` as a Unix time; the event time when it is missing or unreadable."""
    text = record.get("createdAt")
    if isinstance(text, str):
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if when.tzinfo is not None:
                return when.timestamp()
        except ValueError:
            pass
    return time_us / 1e6


def post_candidate(event: Mapping[str, Any], cdn_url: str = DEFAULT_CDN) -> tuple[Candidate | None, str]:
    """A Candidate for a post-create event, or (None, why it is skipped).

    Reasons: ``not_post`` (another collection or operation), ``bad_post``
    (malformed ids or record), ``adult_label``, ``text_only`` (no embed),
    ``not_images`` (a video, link card or plain quote),
    ``no_image`` (image entries without a usable blob).
    """
    commit = event.get("commit")
    if event.get("kind") != "commit" or not isinstance(commit, Mapping):
        return None, "not_post"
    if commit.get("collection") != POST or commit.get("operation") != "create":
        return None, "not_post"
    did, rkey, record = event.get("did"), commit.get("rkey"), commit.get("record")
    if not isinstance(did, str) or not _DID.match(did) or not isinstance(rkey, str) or not _RKEY.match(rkey):
        return None, "bad_post"
    if not isinstance(record, Mapping):
        return None, "bad_post"
    labels = self_labels(record)
    if labels & ADULT_LABELS:
        return None, "adult_label"
    if NO_UNAUTHENTICATED in labels:
        return None, "opted_out"
    images = embedded_images(record.get("embed"))
    if not images:
        return None, "text_only" if record.get("embed") is None else "not_images"
    base = cdn_url.rstrip("/")
    links: list[Link] = []
    for n, image in enumerate(images):
        cid = blob_cid(image)
        if cid is None:
            continue
        width, height = expected_size(image.get("aspectRatio"))
        meta: dict[str, Any] = {"bluesky_cid": cid, "index": n}
        alt = image.get("alt")
        if isinstance(alt, str) and alt:
            meta["alt"] = alt[:2000]
        links.append(Link(url=f"{base}/img/feed_fullsize/plain/{did}/{cid}@jpeg", width=width, height=height, meta=meta))
    if not links:
        return None, "no_image"
    text = record.get("text") if isinstance(record.get("text"), str) else ""
    page = f"https://bsky.app/profile/{did}/post/{rkey}"
    extra: dict[str, Any] = {"description_url": page, "bluesky_did": did}
    langs = record.get("langs")
    if isinstance(langs, list) and all(isinstance(x, str) for x in langs):
        extra["langs"] = langs[:3]
    time_us = event.get("time_us")
    return Candidate(
        source=NAME,
        post_id=f"at://{did}/{POST}/{rkey}",
        url=page,
        title=text[:TITLE_MAX],
        author=did,
        permalink=page,
        domain="bsky.app",
        created_utc=_created(record, time_us if isinstance(time_us, int) else 0),
        links=links,
        extra=extra,
    ), ""


def parse_frame(data: str | bytes) -> Mapping[str, Any]:
    """A Jetstream event from one text frame; ValueError when it is not one."""
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    t = event.get("time_us")
    if not isinstance(t, int) or isinstance(t, bool) or t <= 0:
        raise ValueError("no time_us")
    if not isinstance(event.get("did"), str) or not isinstance(event.get("kind"), str):
        raise ValueError("no did or kind")
    return event


def subscribe_url(base: str, cursor: int | None) -> str:
    """The subscribe URL with our collections and (when known) the cursor."""
    parts = urlsplit(base)
    # maxMessageSizeBytes: Jetstream leaves out what we would refuse anyway, so one
    # oversized event cannot end every connection at the same place forever.
    query = [("wantedCollections", POST), ("wantedCollections", PROFILE), ("maxMessageSizeBytes", str(MAX_MESSAGE))]
    if cursor is not None:
        query.append(("cursor", str(cursor)))
    extra = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=extra + urlencode(query)))


class OptOuts:
    """DIDs whose profile carries ``!no-unauthenticated``; bounded, oldest news forgotten first."""

    def __init__(self, limit: int = OPTOUT_MAX) -> None:
        self.limit = limit
        self._dids: OrderedDict[str, None] = OrderedDict()
        self.dirty = False

    def __contains__(self, did: object) -> bool:
        return did in self._dids

    def __len__(self) -> int:
        return len(self._dids)

    def set(self, did: str, opted_out: bool) -> None:
        if opted_out:
            self._dids.pop(did, None)
            self._dids[did] = None
            while len(self._dids) > self.limit:
                self._dids.popitem(last=False)
            self.dirty = True
        elif did in self._dids:
            del self._dids[did]
            self.dirty = True

    def load(self, text: str | None) -> None:
        try:
            dids = json.loads(text) if text else []
        except ValueError:
            dids = []
        self._dids = OrderedDict((d, None) for d in dids if isinstance(d, str))
        self.dirty = False

    def dump(self) -> str:
        self.dirty = False
        return json.dumps(list(self._dids))


def profile_update(event: Mapping[str, Any]) -> tuple[str, bool] | None:
    """(did, opted out?) for a profile commit; None for any other event."""
    commit = event.get("commit")
    if event.get("kind") != "commit" or not isinstance(commit, Mapping) or commit.get("collection") != PROFILE:
        return None
    did = event.get("did")
    if not isinstance(did, str) or not _DID.match(did):
        return None
    if commit.get("operation") == "delete":
        return did, False  # no profile record: no self-label either
    record = commit.get("record")
    return did, isinstance(record, Mapping) and NO_UNAUTHENTICATED in self_labels(record)


# --- the source ------------------------------------------------------------------------


class _Retry(Exception):
    """A connection attempt failed in a way a later attempt may not."""

    def __init__(self, reason: str, message: str, state: str = "error", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason, self.state, self.retry_after = reason, state, retry_after


class JetstreamSource(ListingSource):
    """Bluesky image posts from Jetstream, one bounded read per :meth:`poll`."""

    name = NAME
    needs = "nothing (key-less)"

    def __init__(
        self,
        http: HttpClient,
        *,
        url: str = DEFAULT_JETSTREAM,
        cdn_url: str = DEFAULT_CDN,
        max_posts: int = 200,
        cycle_seconds: float = 30.0,
        idle_seconds: float = 10.0,
        user_agent: str = DEFAULT_USER_AGENT,
        retries: int = 3,
        backoff: float = 2.0,
        backoff_max: float = 300.0,
        sleep: Callable[[float], Any] | None = None,
        on_status: Callable[[str, SourceStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        appview_url: str | None = DEFAULT_APPVIEW,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        check_ws_url(url)
        self.http = http
        self.url = url
        self.cdn_url = cdn_url
        self.max_posts = max(1, max_posts)
        self.cycle_seconds = cycle_seconds
        self.idle_seconds = idle_seconds
        self.user_agent = user_agent
        self.retries = max(0, retries)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._sleep = sleep or (lambda s: time.sleep(s))
        self._on_status = on_status
        self._on_wait = on_wait
        self._clock = clock
        self.status = SourceStatus()
        self.optouts = OptOuts()
        self._optouts_loaded = False
        self.appview_url = (appview_url or "").rstrip("/")
        self.appview = (
            SiteApi(http, NAME, max_retries=retries, backoff=backoff, backoff_max=60.0,
                    headers={"User-Agent": user_agent}, sleep=self._sleep, on_status=on_status, on_wait=on_wait)
            if self.appview_url else None
        )
        self._checked: OrderedDict[str, bool] = OrderedDict()
        self._unknown_posts: OrderedDict[str, None] = OrderedDict()
        self._failures = 0
        self._not_before = 0.0
        self.counts: Counter[str] = Counter()
        """What the last cycle read: events, handed, malformed, adult_label, opted_out, text_only, seen, …"""

    def describe(self) -> str:
        return f"bluesky: image posts from Jetstream {self.url} (key-less)"

    # --- status and waiting -------------------------------------------------------------
    def mark(self, state: str, detail: str = "") -> None:
        """Record the source's status (and hand it to ``on_status``), as SiteApi does."""
        self.status = SourceStatus(state, detail, time.time())
        if self._on_status is not None:
            self._on_status(self.name, self.status)

    def _wait(self, seconds: float, why: str) -> bool:
        """Interruptible backoff (counted by ``on_wait``); True when a stop was requested."""
        if self._on_wait is not None:
            self._on_wait(why, seconds)
        return bool(self._sleep(seconds))

    def backoff_for(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with full jitter, never below the server's Retry-After."""
        cap = min(self.backoff_max, self.backoff * (2**attempt))
        return max(random.uniform(cap / 2, cap), float(retry_after or 0.0))

    # --- connecting -----------------------------------------------------------------------
    def connect(self, cursor: int | None) -> ClientConnection:
        """Open the websocket to the SSRF-checked address; raises _Retry or SourceError."""
        uri = subscribe_url(self.url, cursor)
        parts = urlsplit(uri)
        secure = parts.scheme == "wss"
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port or (443 if secure else 80)
        cfg = self.http.config
        try:
            target = self.http.policy.target(host, port, url=uri)
        except BlockedAddress as exc:
            self.mark("error", exc.reason)
            raise SourceError("bluesky_fetch", f"bluesky unreachable: {exc}", transient=True) from exc
        except FetchError as exc:
            raise _Retry(exc.reason, f"cannot resolve {host}: {exc}") from exc
        try:
            sock = socket.create_connection((target.address, port), timeout=cfg.connect_timeout)
        except OSError as exc:
            raise _Retry("connection", f"cannot connect to {host} ({target.address}:{port}): {exc}") from exc
        try:
            # The HTTP client's trust store: the system's, certifi's and --ca-bundle.
            context: ssl.SSLContext | None = self.http._ssl if secure else None  # noqa: SLF001
            conn = ws_connect(
                uri,
                sock=sock,
                ssl=context,
                server_hostname=host if secure else None,
                open_timeout=cfg.connect_timeout + cfg.read_timeout,
                close_timeout=2,
                max_size=MAX_MESSAGE,
                user_agent_header=self.user_agent,
            )
            return conn
        except InvalidStatus as exc:
            sock.close()
            status = exc.response.status_code
            retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
            if status == 429:
                raise _Retry("rate_limited", "Jetstream answered HTTP 429", "rate_limited", retry_after) from exc
            if status in (401, 403):
                self.mark("blocked", f"HTTP {status}")
                raise SourceError("blocked", f"Jetstream answered HTTP {status}", transient=True) from exc
            raise _Retry("bluesky_http", f"Jetstream answered HTTP {status}", retry_after=retry_after) from exc
        except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
            sock.close()
            reason = "tls" if isinstance(exc, ssl.SSLError) else "timeout" if isinstance(exc, TimeoutError) else "connection"
            raise _Retry(reason, f"Jetstream handshake failed: {exc}") from exc

    # --- reading ----------------------------------------------------------------------------
    def poll(self, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        """One bounded read of the stream; yields new image posts, oldest first.

        The cursor is saved after each yielded post has been handled (the
        generator resumes only then), every SAVE_EVERY events and at the end.
        """
        if not self._optouts_loaded:
            self.optouts.load(cursors.get(OPTOUT_KEY))
            self._unknown_posts = OrderedDict((p, None) for p in _json_list(cursors.get(UNKNOWN_KEY)))
            self._optouts_loaded = True
        self.counts = Counter()
        now = self._clock()
        if now < self._not_before:
            log.info("bluesky: backing off %.0fs more after errors", self._not_before - now)
            return
        stored = _int(cursors.get(CURSOR))
        state = {"high": stored or 0, "saved": stored or 0, "unsaved": 0}
        deadline = now + self.cycle_seconds
        attempt = 0
        try:
            while self.counts["handed"] < self.max_posts and self._clock() < deadline:
                high = state["high"]
                try:
                    conn = self.connect(max(0, high - REWIND_US) if high else None)
                except _Retry as exc:
                    self.mark(exc.state, f"{exc.reason}: {exc}")
                    delay = self.backoff_for(self._failures, exc.retry_after)
                    self._failures += 1
                    attempt += 1
                    if attempt > self.retries or self._clock() + delay > deadline:
                        self._not_before = self._clock() + delay
                        raise SourceError(
                            "rate_limited" if exc.reason == "rate_limited" else "bluesky_fetch",
                            f"bluesky: {exc}", transient=True,
                        ) from exc
                    log.info("bluesky: %s; retrying in %.1fs", exc, delay)
                    if self._wait(delay, exc.reason):
                        return
                    continue
                self._failures = 0
                self.mark("ok")
                with conn:
                    ended = yield from self._read(conn, state, cursors, is_seen, deadline)
                if ended:
                    break
                # The server closed the stream: reconnect from the cursor, after a pause
                # (a server that accepts and hangs up at once must not be hammered).
                self.counts["reconnects"] += 1
                delay = self.backoff_for(attempt)
                attempt += 1
                if attempt > self.retries or self._clock() + delay > deadline:
                    break
                if self._wait(delay, "stream closed"):
                    return
        finally:
            self._save(cursors, state)
            if self.counts:
                log.info("bluesky: %s", " ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))

    def _read(
        self,
        conn: ClientConnection,
        state: dict[str, int],
        cursors: Cursors,
        is_seen: Callable[[str], bool],
        deadline: float,
    ) -> Iterator[Candidate]:
        """Read one connection; returns True when the cycle is over, False when the server closed."""
        while self.counts["handed"] < self.max_posts:
            left = deadline - self._clock()
            if left <= 0:
                return True
            try:
                frame = conn.recv(timeout=min(left, self.idle_seconds))
            except TimeoutError:
                return True  # quiet stream or budget spent: the next cycle goes on from the cursor
            except ConnectionClosed as exc:
                log.info("bluesky: stream closed (%s)", exc)
                return False
            self.counts["events"] += 1
            try:
                event = parse_frame(frame)
            except ValueError as exc:
                self.counts["malformed"] += 1
                log.debug("bluesky: skipped a frame: %s", exc)
                continue
            candidate = self._handle(event, cursors, is_seen)
            if candidate is not None:
                yield candidate
                self.counts["handed"] += 1
            time_us = int(event["time_us"])
            if time_us > state["high"]:
                state["high"] = time_us
            state["unsaved"] += 1
            if candidate is not None or state["unsaved"] >= SAVE_EVERY:
                self._save(cursors, state)
        return True

    def _handle(self, event: Mapping[str, Any], cursors: Cursors, is_seen: Callable[[str], bool]) -> Candidate | None:
        """Update opt-outs from profile commits; a new, allowed image post, or None."""
        update = profile_update(event)
        if update is not None:
            self.optouts.set(*update)
            self._remember(update[0], not update[1])
            if self.optouts.dirty:
                cursors.set(OPTOUT_KEY, self.optouts.dump())
            self.counts["profiles"] += 1
            return None
        candidate, why = post_candidate(event, self.cdn_url)
        if candidate is None:
            self.counts[why] += 1
            return None
        if candidate.author in self.optouts:
            self.counts["opted_out"] += 1
            return None
        if is_seen(candidate.post_id):
            self.counts["seen"] += 1  # re-read after the rewind or a restart
            return None
        if candidate.post_id in self._unknown_posts:
            self.counts["author_unknown"] += 1  # re-read by the rewind: decided already
            return None
        visible = self._author_visible(candidate.author, cursors)
        if visible is None:
            self._unknown_posts[candidate.post_id] = None
            while len(self._unknown_posts) > UNKNOWN_MAX:
                self._unknown_posts.popitem(last=False)
            cursors.set(UNKNOWN_KEY, json.dumps(list(self._unknown_posts)))
        if visible is not True:
            self.counts["opted_out" if visible is False else "author_unknown"] += 1
            return None
        return candidate

    def _author_visible(self, did: str, cursors: Cursors) -> bool | None:
        """Whether the AppView shows ``did``'s posts to logged-out readers (None: no such author).

        Asked once per author (bounded memory); the answer for an opt-out is kept
        in the store's set. A failed lookup raises SourceError: the cycle ends
        before this post, which is read again next cycle (never handed on unchecked).
        """
        if self.appview is None:
            return True
        if did in self._checked:
            self._checked.move_to_end(did)
            return self._checked[did]
        body = self.appview.get_json(f"{self.appview_url}/xrpc/app.bsky.actor.getProfiles", params={"actors": did})
        self.counts["appview_lookups"] += 1
        profiles = body.get("profiles") if isinstance(body, Mapping) else None
        if not isinstance(profiles, list):
            raise SourceError("bad_answer", "bluesky AppView: getProfiles answer without profiles", transient=True)
        profile = next((p for p in profiles if isinstance(p, Mapping) and p.get("did") == did), None)
        if profile is None:
            return None  # deleted, deactivated or taken down: nothing to credit, nothing to show
        labels = profile.get("labels")
        opted_out = any(isinstance(lab, Mapping) and lab.get("val") == NO_UNAUTHENTICATED
                        for lab in (labels if isinstance(labels, list) else []))
        self._remember(did, not opted_out)
        if opted_out:
            self.optouts.set(did, True)
            cursors.set(OPTOUT_KEY, self.optouts.dump())
        return not opted_out

    def _remember(self, did: str, visible: bool) -> None:
        self._checked[did] = visible
        self._checked.move_to_end(did)
        while len(self._checked) > CHECKED_MAX:
            self._checked.popitem(last=False)

    def _save(self, cursors: Cursors, state: dict[str, int]) -> None:
        if state["high"] > state["saved"]:
            cursors.set(CURSOR, str(state["high"]))
            state["saved"] = state["high"]
        state["unsaved"] = 0


def _json_list(text: str | None) -> list[str]:
    """A stored JSON list of strings (empty when missing or damaged)."""
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def check_ws_url(url: str) -> None:
    """A ws(s) URL with a host; SourceConfigError otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise SourceConfigError(f"--bluesky-jetstream-url {url!r}: {exc}") from exc
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise SourceConfigError(f"--bluesky-jetstream-url {url!r}: expected wss://HOST/subscribe")


def check_http_url(url: str, flag: str = "--bluesky-cdn-url") -> None:
    """An http(s) URL with a host; SourceConfigError otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018
    except ValueError as exc:
        raise SourceConfigError(f"{flag} {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceConfigError(f"{flag} {url!r}: expected https://HOST")


# --- the registry contract -----------------------------------------------------------------


def add_flags(flags: Any) -> None:
    """``--bluesky-…`` flags (env ``NOMAD_BLUESKY_…``)."""
    from nomad.config import positive

    flags.add("--bluesky-jetstream-url", default=DEFAULT_JETSTREAM, help="Bluesky Jetstream subscribe URL (wss://…/subscribe)")
    flags.add("--bluesky-appview-url", default=DEFAULT_APPVIEW, help="public Bluesky AppView asked once per author whether they opted out of logged-out visibility ('' : only opt-outs seen on the stream)")
    flags.add("--bluesky-cdn-url", default=DEFAULT_CDN, help="Bluesky image CDN base (full-size images at /img/feed_fullsize/plain/DID/CID@jpeg)")
    flags.add("--bluesky-max-posts", type=positive(int), default=200, help="Bluesky image posts handed on per cycle at most")
    flags.add("--bluesky-cycle-seconds", type=positive(float), default=30.0, help="longest one cycle reads the Bluesky stream")
    flags.add("--bluesky-idle-seconds", type=positive(float), default=10.0, help="end a Bluesky read early after this long without an event")


def build(args: argparse.Namespace, ctx: SourceContext) -> JetstreamSource:
    """The Jetstream source for ``args``; SourceConfigError on a bad URL."""
    url = getattr(args, "bluesky_jetstream_url", DEFAULT_JETSTREAM)
    cdn = getattr(args, "bluesky_cdn_url", DEFAULT_CDN)
    appview = getattr(args, "bluesky_appview_url", DEFAULT_APPVIEW)
    on_wait = getattr(ctx, "on_wait", None)  # the registry's CrawlContext counts waits per source
    check_ws_url(url)
    check_http_url(cdn)
    if appview:
        check_http_url(appview, "--bluesky-appview-url")
    return JetstreamSource(
        ctx.http,
        url=url,
        cdn_url=cdn,
        max_posts=getattr(args, "bluesky_max_posts", 200),
        cycle_seconds=getattr(args, "bluesky_cycle_seconds", 30.0),
        idle_seconds=getattr(args, "bluesky_idle_seconds", 10.0),
        user_agent=ctx.user_agent,
        sleep=ctx.sleep,
        on_status=ctx.on_status,
        appview_url=appview or None,
        on_wait=(lambda why, s: on_wait(NAME, why, s)) if on_wait else None,
    )


def credentials(environ: Mapping[str, str]) -> str:
    """What it runs with, for ``nomad sources``."""
    return "none (key-less: public Jetstream, AppView and CDN)"


def available(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """Key-less: it can always run (given a Jetstream URL)."""
    return bool(getattr(args, "bluesky_jetstream_url", DEFAULT_JETSTREAM))


__all__ = [
    "NAME", "add_flags", "build", "available", "credentials", "JetstreamSource", "post_candidate", "parse_frame",
    "profile_update", "subscribe_url", "expected_size", "embedded_images", "self_labels", "OptOuts",
]
