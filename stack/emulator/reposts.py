"""A repost-heavy feed: most posts are copies of photos the gallery already holds (bench/dupskip.py, tests).

Reposting is the common case on image sites: the same file under a new post,
or a copy someone saved, recompressed or resized and uploaded again. This
module builds such a feed deterministically from :func:`stack.emulator.photos.photo`:

* ``originals``: photos already in the gallery (the caller ingests them first);
* ``posts``: reddit posts whose i.redd.it file is either one of those photos
  again (``exact``: the same bytes; ``recompressed``: JPEG quality 60;
  ``resized``: 70 % of the size at quality 80) or a photo never seen (``new``).

:meth:`RepostFeed.add_to` serves the posts in an emulator :class:`Scenario`
(``expected`` labels each post ``duplicate`` or ``accept_candidate``), so
``nomad once`` crawls them like any reddit listing.
"""
from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

from PIL import Image

from .photos import encode, photo
from .scenario import Resource, Scenario

KINDS = ("exact", "recompressed", "resized", "new")
"""What a post's file is: the same bytes as an original, a recompressed or resized copy, or a new photo."""

RESIZE = 0.7
"""Resized copies keep this fraction of each side (2000x1500 -> 1400x1050: still above nomad's 1280x1024)."""


@dataclass(frozen=True)
class RepostPost:
    """One post of the feed: its id, file name, bytes, what it is and which original it copies (None: new)."""

    post_id: str
    filename: str
    data: bytes
    kind: str
    original: int | None


@dataclass
class RepostFeed:
    """Originals (to put in the gallery first) and the posts that repost them among new photos."""

    originals: list[bytes]
    posts: list[RepostPost] = field(default_factory=list)

    def counts(self) -> collections.Counter[str]:
        """Posts per kind."""
        return collections.Counter(p.kind for p in self.posts)

    @property
    def reposts(self) -> int:
        """Posts that copy an original (what a duplicate check should catch)."""
        return sum(1 for p in self.posts if p.kind != "new")

    def add_to(self, scn: Scenario, subreddit: str = "pics") -> None:
        """Serve every post's file on i.redd.it and list the post in ``r/<subreddit>`` (and r/all)."""
        for p in self.posts:
            url = scn.add_file("i.redd.it", p.filename, Resource("bytes", body=p.data, content_type="image/jpeg"))
            scn.add_post(p.post_id, url, subreddit=subreddit,
                         expected="accept_candidate" if p.kind == "new" else "duplicate")


def _copy(image: Image.Image, kind: str) -> bytes:
    if kind == "recompressed":
        return encode(image, quality=60)
    w, h = image.size
    return encode(image.resize((round(w * RESIZE), round(h * RESIZE)), Image.Resampling.LANCZOS), quality=80)


def repost_feed(originals: int = 8, posts: int = 32, repost_share: float = 0.75, *, seed: int = 0,
                size: tuple[int, int] = (2000, 1500), prefix: str = "rp") -> RepostFeed:
    """A feed of ``posts`` posts, about ``repost_share`` of them copies of ``originals`` gallery photos.

    Deterministic in ``seed``; the reposts cycle through ``exact``,
    ``recompressed`` and ``resized`` so each kind is present. ``prefix`` keeps
    post ids (and file names) apart when one scenario holds two feeds.
    """
    if not 0 <= repost_share <= 1 or originals < 1 or posts < 0:
        raise ValueError("repost_feed needs originals >= 1, posts >= 0 and repost_share within [0, 1]")
    rng = random.Random(seed)
    base = 10_000 + 1000 * seed
    pictures = [photo(base + i, size) for i in range(originals)]
    feed = RepostFeed([encode(p, quality=92) for p in pictures])
    n_reposts = round(posts * repost_share)
    kinds = [KINDS[i % 3] for i in range(n_reposts)] + ["new"] * (posts - n_reposts)
    rng.shuffle(kinds)
    fresh = 0
    for n, kind in enumerate(kinds):
        post_id = f"{prefix}{seed:02d}{n:04d}"
        if kind == "new":
            data, of = encode(photo(base + 500 + fresh, size), quality=90), None
            fresh += 1
        else:
            of = rng.randrange(originals)
            data = feed.originals[of] if kind == "exact" else _copy(pictures[of], kind)
        feed.posts.append(RepostPost(post_id, f"{post_id}.jpg", data, kind, of))
    return feed
