"""reddit: listings (OAuth app-only JSON, or the Atom feeds without an account), rate limits, post parsing.

Parsing is pure (``parse_post``/``parse_listing``, and ``reddit_feed`` for the
Atom feeds) so every shape of post is tested against fixtures;
:class:`RedditClient` does the polite JSON fetching: a proper User-Agent,
``X-Ratelimit-*`` obeyed, 429/5xx backed off with jitter, OAuth tokens
refreshed before they expire and on 401, all through
:class:`~nomad.sources.api.SiteApi` (its ``window`` and ``auth`` hooks).

:class:`RedditSource` is the ``reddit`` listing source: OAuth JSON when
``REDDIT_CLIENT_ID``/``REDDIT_CLIENT_SECRET`` are set; otherwise anonymous JSON
until reddit answers its block page (it has since 2026-05-29), then the Atom
feeds, paced through a ``SiteApi`` (``--reddit-feed-interval``, 429 backoff).
The block is remembered in the store, so the JSON is not asked again for
``--reddit-json-recheck`` seconds, across restarts too.

Over 400 lines on purpose, one module per site: the OAuth client, the block
page rules and the post parsing are all reddit's; the Atom feed's parsing is
already apart (:mod:`nomad.sources.reddit_feed`).
"""
from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from nomad import DEFAULT_USER_AGENT
from nomad.http import FetchError, HttpClient, HttpStatusError

from .api import RateWindow, SiteApi, SourceContext, SourceStatus, request_json
from .base import (
    Candidate,
    Cursors,
    Link,
    ListingSource,
    SourceConfigError,
    SourceError,
    each_listing,
    extension_of,
    host_matches,
    host_of,
    site_of,
)
from .reddit_feed import is_block_page, parse_feed

log = logging.getLogger(__name__)

LISTING_CAP = 1000
"""reddit stops a listing near 1000 items, whatever ``after`` says."""

MIME_EXT = {"image/jpg": "jpg", "image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}


def _url(value: Any) -> str:
    """A URL from reddit JSON: unescaped even when the request forgot ``raw_json=1``."""
    return html.unescape(value) if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _preview_size(post: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """Size of the full image as reddit's preview reports it (``preview.images[0].source``)."""
    try:
        src = post["preview"]["images"][0]["source"]
        return _int(src.get("width")), _int(src.get("height"))
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, None


def _i_redd_it(media_id: str, ext: str, like: str) -> str:
    """The full-size gallery file ``https://i.redd.it/<media_id>.<ext>``.

    The port of the preview URL is kept when it has one, so mirrors and the
    test emulator (which serve every host on one port) work like reddit.
    """
    try:
        port = urlsplit(like).port if like else None
    except ValueError:
        port = None
    return f"https://i.redd.it{':' + str(port) if port else ''}/{media_id}.{ext}"


def _gallery_links(post: Mapping[str, Any]) -> list[Link]:
    """One link per gallery item, in ``gallery_data.items`` order (media_metadata is unordered).

    Items that are not valid still images stay in the list, marked, so the
    rules record a reason for them instead of silently dropping them.
    """
    items = (post.get("gallery_data") or {}).get("items") or []
    metadata = post.get("media_metadata")
    if not isinstance(metadata, Mapping) or not metadata:
        return []  # deleted gallery: nothing left to fetch (the rules say "no_media")
    links: list[Link] = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        media_id = str(item.get("media_id") or "")
        entry = metadata.get(media_id)
        if not media_id or not isinstance(entry, Mapping):
            links.append(Link(url="", media="unavailable", meta={"media_id": media_id}))
            continue
        kind = entry.get("e")
        source = entry.get("s") if isinstance(entry.get("s"), Mapping) else {}
        ext = MIME_EXT.get(str(entry.get("m") or "").lower(), "jpg")
        meta = {"media_id": media_id}
        if item.get("caption"):
            meta["caption"] = str(item["caption"])
        if entry.get("status") != "valid":
            links.append(Link(url="", media="unavailable", meta=meta))
        elif kind == "AnimatedImage":
            gif = _url(source.get("gif")) or _i_redd_it(media_id, "gif", "")
            links.append(Link(url=gif, width=_int(source.get("x")), height=_int(source.get("y")), animated=True, meta=meta))
        elif kind != "Image":
            links.append(Link(url="", media="video" if kind == "RedditVideo" else "unknown", meta=meta))
        else:
            links.append(
                Link(
                    url=_i_redd_it(media_id, ext, _url(source.get("u"))),
                    width=_int(source.get("x")),
                    height=_int(source.get("y")),
                    animated=ext == "gif",
                    meta=meta,
                )
            )
    return links


def _is_gallery(post: Mapping[str, Any]) -> bool:
    url = _url(post.get("url"))
    on_reddit = host_matches(host_of(url), "reddit.com")
    return bool(post.get("is_gallery") or post.get("gallery_data") is not None or (on_reddit and "/gallery/" in url))


def _media_links(post: Mapping[str, Any]) -> list[Link]:
    """What one post (or a crosspost's parent) points at."""
    if post.get("is_video") or post.get("post_hint") == "hosted:video":
        return [Link(url=_url(post.get("url")), media="video")]
    if _is_gallery(post):
        return _gallery_links(post)
    url = _url(post.get("url_overridden_by_dest") or post.get("url"))
    site = site_of(url)
    if site == "video":
        return [Link(url=url, media="video")]
    if site == "unsupported":
        return []
    width, height = _preview_size(post)
    return [Link(url=url, width=width, height=height, animated=extension_of(url) in (".gif", ".gifv"))]


def parse_post(data: Mapping[str, Any]) -> Candidate:
    """A reddit ``t3`` post as a :class:`Candidate`; crossposts take their parent's media."""
    parents = data.get("crosspost_parent_list") or []
    media_post: Mapping[str, Any] = data
    if isinstance(parents, list) and parents and isinstance(parents[-1], Mapping):
        media_post = parents[-1]
    removed = data.get("removed_by_category") is not None or media_post.get("removed_by_category") is not None
    name = str(data.get("name") or f"t3_{data.get('id', '')}")
    permalink = str(data.get("permalink") or "")
    if permalink.startswith("/"):
        permalink = "https://www.reddit.com" + permalink
    return Candidate(
        source="reddit",
        post_id=name,
        url=_url(data.get("url_overridden_by_dest") or data.get("url")),
        title=str(data.get("title") or ""),
        author=str(data.get("author") or ""),
        subreddit=str(data.get("subreddit") or ""),
        permalink=permalink,
        domain=str(media_post.get("domain") or data.get("domain") or ""),
        score=_int(data.get("score")),
        created_utc=float(data["created_utc"]) if isinstance(data.get("created_utc"), (int, float)) else None,
        over_18=bool(data.get("over_18") or media_post.get("over_18")),
        spoiler=bool(data.get("spoiler") or media_post.get("spoiler")),
        is_video=bool(media_post.get("is_video")),
        is_gallery=_is_gallery(media_post),
        removed=removed,
        links=[] if removed else _media_links(media_post),
    )


def parse_listing(obj: Any) -> tuple[list[Candidate], str | None]:
    """Posts of one listing page and its ``after`` cursor; anything that is not a t3 is skipped."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("data"), Mapping):
        raise SourceError("bad_listing", "reddit listing without data", transient=True)
    data = obj["data"]
    posts = []
    for child in data.get("children") or []:
        if isinstance(child, Mapping) and child.get("kind") == "t3" and isinstance(child.get("data"), Mapping):
            posts.append(parse_post(child["data"]))
    after = data.get("after")
    return posts, str(after) if after else None


def user_agent(platform: str, app_id: str, version: str, user: str) -> str:
    """reddit's required form: ``<platform>:<app id>:<version> (by /u/<user>)``."""
    return f"{platform}:{app_id}:{version} (by /u/{user})"


@dataclass
class RedditConfig:
    """Where and how to talk to reddit (every endpoint overridable for tests and mirrors)."""

    base_url: str = "https://www.reddit.com"
    oauth_url: str = "https://oauth.reddit.com"
    client_id: str | None = None
    client_secret: str | None = None
    user_agent: str = DEFAULT_USER_AGENT
    limit: int = 100
    ratelimit_reserve: float = 1.0  # sleep until reset when this many requests (or fewer) remain
    max_retries: int = 4
    backoff: float = 2.0
    backoff_max: float = 120.0
    token_margin: float = 60.0  # refresh a token this many seconds before it expires

    @property
    def oauth(self) -> bool:
        return bool(self.client_id and self.client_secret)


RateState = RateWindow
"""What reddit's ``X-Ratelimit-*`` headers said last (the name this module used before SiteApi read them)."""


class RedditClient:
    """Polite reddit JSON reader over a :class:`SiteApi`: one request at a time, rate limits obeyed.

    The SiteApi reads ``X-Ratelimit-*`` from every answer (a 429's too) into
    :attr:`rate`, waits for the window's reset when the budget is spent, adds
    the OAuth bearer to each try and refreshes it once on a 401. ``sleep`` is
    injectable so a stop event can interrupt waits (graceful SIGTERM) and tests
    can run without real sleeping; it returns True when the wait was interrupted.
    """

    def __init__(
        self,
        http: HttpClient,
        config: RedditConfig | None = None,
        *,
        sleep: Callable[[float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.http = http
        self.config = cfg = config or RedditConfig()
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self.rate = RateWindow(reserve=cfg.ratelimit_reserve)
        self.api = SiteApi(
            http, "reddit", max_retries=cfg.max_retries, backoff=cfg.backoff, backoff_max=cfg.backoff_max,
            headers={"User-Agent": cfg.user_agent, "Accept": "application/json"}, sleep=sleep, clock=clock,
            on_wait=on_wait, window=self.rate, auth=self._auth if cfg.oauth else None, check_error=self._check_error,
        )

    # --- OAuth ---------------------------------------------------------------------
    def _bearer(self, force: bool = False) -> str:
        now = self._clock()
        if force or not self._token or now >= self._token_expires - self.config.token_margin:
            cfg = self.config
            body = request_json(
                self.http, "POST", cfg.base_url.rstrip("/") + "/api/v1/access_token", reason="reddit_auth",
                what="reddit's token request", data={"grant_type": "client_credentials"},
                auth=(cfg.client_id, cfg.client_secret), headers={"User-Agent": cfg.user_agent}, retry=False,
            )
            try:
                token = str(body["access_token"])
                expires = float(body.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceError("reddit_auth", "token reply without access_token", transient=True) from exc
            self._token, self._token_expires = token, now + expires
            log.info("reddit: new OAuth token, valid %.0fs", expires)
        return self._token  # type: ignore[return-value]

    def _auth(self, refresh: bool) -> dict[str, str]:
        return {"Authorization": "bearer " + self._bearer(force=refresh)}

    def _check_error(self, exc: HttpStatusError) -> None:
        """reddit's own reasons: the anonymous block page, and 4xx that SiteApi would call 'blocked'."""
        status = exc.status
        if status == 429 or status == 408 or status >= 500:
            return  # SiteApi backs these off and retries
        if not self.config.oauth and is_block_page(status, exc.headers or {}, exc.body or b""):
            raise SourceError("reddit_blocked", "reddit answered its 403 block page to anonymous JSON", transient=True)
        raise SourceError("reddit_http", f"reddit answered HTTP {status} for {urlsplit(exc.url or '').path}",
                          transient=status in (401, 403))

    # --- requests ------------------------------------------------------------------
    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET one reddit JSON document (OAuth host with a token, else ``<path>.json``)."""
        cfg = self.config
        path = path.strip("/").removesuffix(".json")
        if cfg.oauth:
            url = cfg.oauth_url.rstrip("/") + "/" + path
        else:
            url = cfg.base_url.rstrip("/") + "/" + path + ".json"
        resp = self.api.get(url, params={**(params or {}), "raw_json": 1})
        try:
            return resp.json()
        except (ValueError, FetchError) as exc:
            raise SourceError("bad_listing", "reddit answered something that is not JSON", transient=True) from exc

    def listing(self, path: str, *, after: str | None = None, limit: int | None = None, extra: Mapping[str, Any] | None = None) -> tuple[list[Candidate], str | None]:
        """One page of a listing such as ``r/all/new``."""
        params: dict[str, Any] = {"limit": min(100, limit or self.config.limit)}
        if after:
            params["after"] = after
        params.update(extra or {})
        return parse_listing(self.get_json(path, params))

    def poll(self, path: str, *, backfill: bool = False, is_seen: Callable[[str], bool] | None = None, max_items: int = LISTING_CAP) -> Iterator[Candidate]:
        """Posts of a listing, each post id once; follows ``after`` when ``backfill`` is set.

        Without backfill one page is read (a new-listing poll); with it, pages are
        followed until the cap, the end, or a page whose posts were all seen.
        """
        seen_here: set[str] = set()
        after: str | None = None
        count = 0
        while count < max_items:
            posts, after = self.listing(path, after=after, limit=min(self.config.limit, max_items - count))
            fresh = 0
            for post in posts:
                count += 1
                if post.post_id in seen_here:
                    continue
                seen_here.add(post.post_id)
                if is_seen is None or not is_seen(post.post_id):
                    fresh += 1
                yield post
            if not backfill or not after or not posts or fresh == 0:
                return

    def top(self, subreddit: str, t: str = "all", limit: int = 100) -> list[Candidate]:
        """Top posts of a subreddit (``t`` = hour|day|week|month|year|all), following pages up to ``limit``."""
        out: list[Candidate] = []
        seen: set[str] = set()
        after: str | None = None
        while len(out) < min(limit, LISTING_CAP):
            posts, after = self.listing(f"r/{subreddit}/top", after=after, limit=limit - len(out), extra={"t": t})
            for post in posts:
                if post.post_id not in seen:
                    seen.add(post.post_id)
                    out.append(post)
            if not after or not posts:
                break
        return out[:limit]


# --- the ``reddit`` listing source ------------------------------------------------------

NAME = "reddit"
FEED_MAX_BYTES = 5 * 1024 * 1024
"""A feed of 100 entries is ~200 KB; anything far larger is not a feed."""

BLOCK_ADVICE = (
    "reddit answered anonymous JSON with its 403 block page (anonymous *.json is closed since 2026-05-29); "
    "reading the Atom feeds instead (no sizes, no NSFW flag, no gallery items, about 1 request/min). "
    "For the JSON API set REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET (an existing reddit OAuth app)."
)


class RedditSource(ListingSource):
    """reddit listings: OAuth JSON, or anonymous JSON falling back to the Atom feeds once blocked.

    ``clock`` is wall-clock time (the block is stored in the cursors as a
    time of day, so it survives restarts); injectable for tests.
    """

    name = NAME
    needs = "nothing (Atom feeds); REDDIT_CLIENT_ID + REDDIT_CLIENT_SECRET for the JSON API"

    def __init__(
        self,
        client: RedditClient,
        feeds: SiteApi,
        *,
        listings: list[str],
        backfill: bool = False,
        feed_limit: int = 100,
        json_recheck: float = 86400.0,
        on_status: Callable[[str, SourceStatus], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.feeds = feeds
        self.listings = list(listings)
        self.backfill = backfill
        self.feed_limit = max(1, min(100, feed_limit))
        self.json_recheck = max(0.0, json_recheck)
        self._on_status = on_status
        self._clock = clock
        self._json_blocked = False
        self._warned = False
        self.json_requests = 0
        """Anonymous JSON listing requests this process made (the block page costs one)."""

    @property
    def oauth(self) -> bool:
        return self.client.config.oauth

    def _status(self, state: str, detail: str) -> None:
        if self._on_status is not None:
            self._on_status(NAME, SourceStatus(state, detail, time.time()))

    def describe(self) -> str:
        paths = ", ".join(self.listings)
        if self.oauth:
            return f"reddit: {paths} through the OAuth JSON API (REDDIT_CLIENT_ID)"
        pace = f"one feed request per {self.feeds.min_interval:g}s"
        if self._json_blocked:
            return f"reddit: {paths} through the Atom feeds ({pace}; anonymous JSON is blocked)"
        return f"reddit: {paths} anonymously (JSON until reddit blocks it, then the Atom feeds, {pace})"

    def ratelimit(self) -> str:
        if self.oauth or not self._json_blocked:
            return self.client.rate.describe(self.client._clock())
        return f"feed requests={self.feeds.requests} status={self.feeds.status.state}"

    # --- polling -------------------------------------------------------------------------
    def poll(self, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        """Every listing in turn; one failing listing is logged and the others still read."""
        yield from each_listing(NAME, self.listings, lambda path: self._poll_listing(path, cursors, is_seen),
                                fail_when_all=True)

    def _json_allowed(self, cursors: Cursors) -> bool:
        if self._json_blocked:
            return False
        try:
            until = float(cursors.get("json_blocked_until") or 0)
        except ValueError:
            until = 0.0
        if until > self._clock():
            self._json_blocked = True
            log.info("reddit: anonymous JSON was blocked; reading the Atom feeds until %s (--reddit-json-recheck)",
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)))
            return False
        return True

    def _blocked(self, cursors: Cursors) -> None:
        self._json_blocked = True
        cursors.set("json_blocked_until", repr(self._clock() + self.json_recheck))
        self._status("blocked", "anonymous JSON answers reddit's 403 block page; using the Atom feeds")
        if not self._warned:
            self._warned = True
            log.warning("%s Not asking the JSON again for %.0fs.", BLOCK_ADVICE, self.json_recheck)

    def _poll_listing(self, path: str, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        if self.oauth:
            yield from self.client.poll(path, backfill=self.backfill, is_seen=is_seen)
            self._status("ok", "OAuth JSON API")
            return
        if self._json_allowed(cursors):
            try:
                self.json_requests += 1
                yield from self.client.poll(path, backfill=self.backfill, is_seen=is_seen)
                self._status("ok", "anonymous JSON")
                return
            except SourceError as exc:
                if exc.reason != "reddit_blocked":
                    raise
                self._blocked(cursors)
        yield from self._feed(path, cursors)

    def feed_url(self, path: str) -> str:
        """``r/all/new`` -> ``https://www.reddit.com/r/all/new/.rss``."""
        return self.client.config.base_url.rstrip("/") + "/" + path.strip("/").removesuffix(".json") + "/.rss"

    def _feed(self, path: str, cursors: Cursors) -> Iterator[Candidate]:
        """One Atom feed read (newest ``feed_limit`` entries), oldest first, cursor after each post."""
        # reddit throttles per IP, not per process: the last request's time is kept in the store,
        # so a restart (a crash loop, `nomad once` from cron) does not ask sooner than the interval.
        try:
            last = float(cursors.get("feed_last_at") or 0)
        except ValueError:
            last = 0.0
        left = min(self.feeds.min_interval, last + self.feeds.min_interval - self._clock())
        if left > 0:
            self.feeds.wait(left, "pacing (a request before the restart)")
        answered = self.feeds.answers
        try:
            resp = self.feeds.get(self.feed_url(path), params={"limit": self.feed_limit},
                                  headers={"Accept": "application/atom+xml"}, max_bytes=FEED_MAX_BYTES)
        finally:
            # Only a request reddit saw counts against its budget: offline, the next cycle asks at once.
            if self.feeds.answers > answered:
                cursors.set("feed_last_at", repr(self._clock()))
        posts = parse_feed(resp.body)
        log.debug("reddit feed %s: %d entries", path, len(posts))
        for post in reversed(posts):
            yield post
            cursors.set(f"feed:{path}", post.post_id)  # the newest entry handled so far


def add_flags(flags: Any) -> None:
    """reddit's own flags (the older --listing/--reddit-url/... stay in nomad.config)."""
    from nomad.config import non_negative

    flags.add("--reddit-feed-interval", type=non_negative(float), default=60.0,
              help="seconds between two requests to reddit's Atom feeds (reddit throttles them to ~1/min per IP)")
    flags.add("--reddit-feed-limit", type=int, default=100, help="entries asked of one Atom feed (?limit=, at most 100)")
    flags.add("--reddit-json-recheck", type=non_negative(float), default=86400.0,
              help="after anonymous JSON answered reddit's block page, read only the Atom feeds for this many seconds")


def credentials(environ: Mapping[str, str]) -> str:
    """Which credentials ``build`` would use (for ``nomad sources``)."""
    from nomad.config import secret

    if secret("REDDIT_CLIENT_ID", environ) and secret("REDDIT_CLIENT_SECRET", environ):
        return "REDDIT_CLIENT_ID/SECRET (OAuth JSON API)"
    return "none (anonymous: Atom feeds)"


def available(args: Any, environ: Mapping[str, str]) -> bool:
    """The Atom feeds need nothing: reddit always runs."""
    return True


def _feed_status(on_status: Callable[[str, SourceStatus], None] | None) -> Callable[[str, SourceStatus], None] | None:
    """Feed statuses say they are the feed's (an 'ok' after a block means: the fallback works)."""
    if on_status is None:
        return None
    return lambda name, st: on_status(name, SourceStatus(st.state, st.detail or "Atom feed", st.at))


def build(args: Any, ctx: SourceContext) -> RedditSource:
    """The reddit source from the parsed flags and the environment's secrets."""
    from nomad.config import many, secret

    client_id, client_secret = secret("REDDIT_CLIENT_ID", ctx.environ), secret("REDDIT_CLIENT_SECRET", ctx.environ)
    if bool(client_id) != bool(client_secret):
        raise SourceConfigError("set both REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET for OAuth, or neither")
    on_wait = getattr(ctx, "on_wait", None)
    client = RedditClient(
        ctx.http,
        RedditConfig(
            base_url=args.reddit_url,
            oauth_url=args.reddit_oauth_url,
            client_id=client_id,
            client_secret=client_secret,
            user_agent=ctx.user_agent,
            ratelimit_reserve=args.ratelimit_reserve,
            max_retries=max(0, args.reddit_retries),
        ),
        sleep=ctx.sleep,
        on_wait=(lambda why, s: on_wait(NAME, why, s)) if on_wait else None,
    )
    feeds = SiteApi(
        ctx.http, NAME, min_interval=args.reddit_feed_interval, max_retries=max(0, args.reddit_retries),
        headers={"User-Agent": ctx.user_agent}, sleep=ctx.sleep, on_status=_feed_status(ctx.on_status),
        on_wait=(lambda why, s: on_wait(NAME, why, s)) if on_wait else None,
    )
    return RedditSource(
        client, feeds, listings=many(args, "listing"), backfill=args.backfill, feed_limit=args.reddit_feed_limit,
        json_recheck=args.reddit_json_recheck, on_status=ctx.on_status,
    )
