"""The common base of the per-site extractors: what a post and an image look like, URL dispatch.

A listing yields :class:`Candidate` posts. Each carries :class:`Link` objects:
what the post points at, with the size the listing already knows (reddit's
preview sizes) so the resolution rules can run before anything is downloaded.
A link is *expanded* into :class:`ImageRef` objects (one per downloadable
image) either directly (i.redd.it, direct files) or by the site module that
owns its host (imgur albums, flickr pages through their APIs).
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Protocol
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
"""Extensions of direct links worth downloading (the formats nomad decodes)."""

ANIMATED_EXTENSIONS = {".gif", ".gifv", ".mp4", ".webm", ".apng"}
"""Extensions that are never still photos."""


class SourceError(Exception):
    """Expanding a link failed; ``transient`` says whether a later retry can help.

    A permanent failure (photo not found, removed album) becomes a rejection
    with ``reason``; a transient one (timeout, 5xx) a failure with a retry count.
    """

    def __init__(self, reason: str, message: str = "", *, transient: bool = False) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.transient = transient


class SourceConfigError(ValueError):
    """A listing source cannot run with what is configured (one clear sentence for the user)."""


@dataclass
class Link:
    """Something a post points at, before any site API was asked about it."""

    url: str
    width: int | None = None
    height: int | None = None
    animated: bool = False
    media: str = "image"  # image | video | unknown
    meta: dict[str, Any] = field(default_factory=dict)


def known_fields(cls: Any, d: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The items of ``d`` that are fields of the dataclass ``cls`` (a newer or older record's extras are ignored)."""
    return {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k not in skip}


class Record:
    """A dataclass kept as JSON in the state DB (so a failed download or expansion is retried after a restart)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        return cls(**known_fields(cls, d))


@dataclass
class ImageRef(Record):
    """One downloadable image, with its stable key and what is known before download."""

    key: str  # e.g. reddit:t3_abc123:0 (source, post fullname, index within the post)
    url: str
    width: int | None = None
    height: int | None = None
    animated: bool = False
    media: str = "image"
    site: str = "direct"  # reddit | imgur | flickr | direct: whose rules apply to the download
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate(Record):
    """One post from a listing, normalised across sites."""

    source: str  # reddit
    post_id: str  # fullname, e.g. t3_abc123
    url: str = ""
    title: str = ""
    author: str = ""
    subreddit: str = ""
    permalink: str = ""
    domain: str = ""
    score: int | None = None
    created_utc: float | None = None
    over_18: bool = False
    spoiler: bool = False
    is_video: bool = False
    is_gallery: bool = False
    removed: bool = False
    links: list[Link] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific metadata carried to the gallery (licence, artist, description URL, …)."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        """Inverse of :meth:`to_dict`, links included."""
        links = [Link(**known_fields(Link, ln)) for ln in d.get("links", [])]
        return cls(**known_fields(cls, d, skip=("links",)), links=links)

    def meta(self) -> dict[str, Any]:
        """Source metadata that travels with every image of this post to the gallery."""
        return {
            "source": self.source,
            "post_id": self.post_id,
            "title": self.title,
            "author": self.author,
            "subreddit": self.subreddit,
            "permalink": self.permalink,
            "post_url": self.url,
            "post_score": self.score,
            "created_utc": self.created_utc,
            **self.extra,
        }


class Cursors(Protocol):
    """One source's durable state in the store (continue tokens, stream cursors, feed ids)."""

    def get(self, name: str) -> str | None: ...

    def set(self, name: str, value: str) -> None: ...


def each_listing(
    source: str,
    listings: Iterable[str],
    read: Callable[[str], Iterator[Candidate]],
    *,
    fail_when_all: bool = False,
) -> Iterator[Candidate]:
    """The posts of every listing in turn: one that fails is logged and the others still get their turn.

    Afterwards the last failure is raised, so the crawler counts the source as
    failed: when any listing failed, or with ``fail_when_all`` only when every
    one did. A stop request ends it at once.
    """
    names = list(listings)
    failures: list[SourceError] = []
    for listing in names:
        try:
            yield from read(listing)
        except SourceError as exc:
            if exc.reason == "stopped":
                raise
            log.warning("%s %s: %s", source, listing, exc)
            failures.append(exc)
    if failures and (not fail_when_all or len(failures) == len(names)):
        raise failures[-1]


class ListingSource:
    """A source of posts (reddit, commons, flickr, bluesky): the registry's listing kind.

    ``poll`` yields new :class:`Candidate` posts. The crawler handles (records)
    each post before it asks the generator for the next one, so a source that
    advances its cursor *after* a ``yield`` never skips a post across a kill -9;
    one read twice is dropped by ``is_seen``. Post ids must not collide across
    sources: reddit ``t3_…``, commons ``M<pageid>``, flickr ``flickr_<id>``,
    bluesky ``at://<did>/app.bsky.feed.post/<rkey>``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "nothing"
    """What it needs to run, for ``nomad sources`` and the docs."""

    def poll(self, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line on what this source reads and with which credentials (for logs and ``nomad sources``)."""
        return self.name

    def ratelimit(self) -> str:
        """What the site's rate limits last said, for the per-cycle log line ('' when nothing is known)."""
        return ""

    def media_headers(self) -> Mapping[str, Mapping[str, str]]:
        """Headers for downloading this source's images, by media host (subdomains included).

        Wikimedia wants its User-Agent rule (a contact) on upload.wikimedia.org
        too, not only on the API; the crawler sends these on every image
        download from that host instead of the global ``--user-agent``.
        """
        return {}


def media_headers(sources: Iterable[ListingSource]) -> dict[str, dict[str, str]]:
    """Every source's :meth:`ListingSource.media_headers`, by lower-case host (first source wins)."""
    table: dict[str, dict[str, str]] = {}
    for source in sources:
        for host, headers in source.media_headers().items():
            table.setdefault(host.lower().strip("."), dict(headers))
    return table


def headers_for(url: str, table: Mapping[str, Mapping[str, str]]) -> dict[str, str] | None:
    """The download headers ``table`` names for ``url``'s host or a parent domain (None: the defaults)."""
    host = host_of(url)
    if not host or not table:
        return None
    for domain, headers in table.items():
        if host_matches(host, domain):
            return dict(headers)
    return None


@dataclass(frozen=True)
class UrlTarget:
    """What a link expander's URL names: ``kind`` (image | album | gallery | page | static) and the site's id.

    ``ext``: the file extension the URL gave (imgur), ``user``: the owner the
    URL named (flickr photo pages).
    """

    kind: str
    id: str
    ext: str = ""
    user: str = ""


def url_parts(url: str) -> tuple[str, list[str], str] | None:
    """(lower-case host, non-empty path segments, path) of ``url``; None when it does not parse."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return None
    return host, [s for s in parts.path.split("/") if s], parts.path


def host_of(url: str) -> str:
    """Lower-case host name of ``url`` without a port ('' when there is none)."""
    try:
        return (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return ""


def host_matches(host: str, domain: str) -> bool:
    """True when ``host`` is ``domain`` or one of its subdomains."""
    host, domain = host.lower().rstrip("."), domain.lower().strip(".")
    return host == domain or host.endswith("." + domain)


def extension_of(url: str) -> str:
    """Lower-case extension of the URL's path ('.jpg'), '' when it has none."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return ""
    return posixpath.splitext(path)[1].lower()


def is_http_url(url: str) -> bool:
    """Only http(s) URLs are ever followed."""
    try:
        return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).hostname)
    except ValueError:
        return False


Expander = Callable[[Link], list[ImageRef]]


def site_of(url: str) -> str:
    """Which extractor owns ``url``: reddit | imgur | flickr | direct | video | unsupported."""
    if not is_http_url(url):
        return "unsupported"
    host = host_of(url)
    ext = extension_of(url)
    if host_matches(host, "v.redd.it") or ext in {".mp4", ".webm"}:
        return "video"
    if host_matches(host, "i.redd.it"):
        return "reddit"
    if host_matches(host, "imgur.com"):
        return "imgur"
    if host_matches(host, "flickr.com") or host_matches(host, "flic.kr") or host_matches(host, "staticflickr.com"):
        return "flickr"
    if ext in IMAGE_EXTENSIONS or ext in ANIMATED_EXTENSIONS:
        return "direct"
    if host_matches(host, "cdn.bsky.app"):
        return "direct"  # Bluesky's CDN names the format after an '@' (…/CID@jpeg), not as an extension
    return "unsupported"


def direct_ref(key: str, link: Link, site: str = "direct") -> ImageRef:
    """An :class:`ImageRef` for a link that is already the image file."""
    ext = extension_of(link.url)
    return ImageRef(
        key=key,
        url=link.url,
        width=link.width,
        height=link.height,
        animated=link.animated or ext in ANIMATED_EXTENSIONS,
        media=link.media,
        site=site,
        meta=dict(link.meta),
    )
