"""Mining rules: which posts and images are worth downloading and keeping.

Every rule is a flag with a documented default (see ``docs/nomad.md``) and
every rejection a short reason code, so the state DB and the per-cycle log
say exactly why something was skipped. The same size rules run twice: on the
size the listing/API reports (before downloading) and on the decoded image.

Minimum resolution, defined orientation-aware from upstream's 1280x1024: the
long side must be >= ``min_long`` (1280) and the short side >= ``min_short``
(1024), so a 1024x1280 portrait passes exactly like a 1280x1024 landscape.
Aspect: W/H <= ``max_wide`` (3) and H/W <= ``max_tall`` (2), as upstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nomad.sources.base import Candidate, ImageRef, host_matches, host_of

# Reason codes (stable strings: they end up in the DB, logs and metrics).
NSFW = "nsfw"
SPOILER = "spoiler"
VIDEO = "video"
REMOVED = "removed"
ANIMATED = "animated"
UNAVAILABLE = "unavailable"
NO_IMAGE = "no_image"  # the post links to something that is not an image (article, youtube)
NO_MEDIA = "no_media"  # a gallery whose media is gone (null gallery_data/media_metadata)
DOMAIN_DENIED = "domain_denied"
DOMAIN_NOT_ALLOWED = "domain_not_allowed"
SUBREDDIT_DENIED = "subreddit_denied"
TOO_SMALL = "too_small"
TOO_WIDE = "too_wide"
TOO_TALL = "too_tall"


@dataclass
class Rules:
    """The rule set; defaults are the documented flag defaults."""

    min_long: int = 1280
    min_short: int = 1024
    max_wide: float = 3.0
    max_tall: float = 2.0
    skip_nsfw: bool = True
    skip_spoilers: bool = True
    allow_domains: list[str] = field(default_factory=list)  # empty: every domain allowed
    deny_domains: list[str] = field(default_factory=list)
    deny_subreddits: list[str] = field(default_factory=list)

    def check_post(self, post: Candidate) -> str | None:
        """Post-level rules (before anything is expanded); a reason code or None."""
        if post.removed:
            return REMOVED
        if self.skip_nsfw and post.over_18:
            return NSFW
        if self.skip_spoilers and post.spoiler:
            return SPOILER
        if post.subreddit and post.subreddit.lower() in {s.lower().removeprefix("r/") for s in self.deny_subreddits}:
            return SUBREDDIT_DENIED
        if post.is_video:
            return VIDEO
        if not post.links:
            return NO_MEDIA if post.is_gallery else NO_IMAGE
        return None

    def check_domain(self, url: str) -> str | None:
        """Allow/deny lists match a domain and its subdomains."""
        host = host_of(url)
        if any(host_matches(host, d) for d in self.deny_domains):
            return DOMAIN_DENIED
        if self.allow_domains and not any(host_matches(host, d) for d in self.allow_domains):
            return DOMAIN_NOT_ALLOWED
        return None

    def check_size(self, width: int | None, height: int | None) -> str | None:
        """Resolution and aspect rules; unknown sizes pass (they are checked after decoding)."""
        if not width or not height:
            return None
        # Aspect first: a panorama is rejected for its shape, whatever its size.
        if width / height > self.max_wide:
            return TOO_WIDE
        if height / width > self.max_tall:
            return TOO_TALL
        if max(width, height) < self.min_long or min(width, height) < self.min_short:
            return TOO_SMALL
        return None

    def check_ref(self, ref: ImageRef) -> str | None:
        """Image-level rules before download: media kind, animation, domain, reported size."""
        if ref.media == "video":
            return VIDEO
        if ref.media != "image" or not ref.url:
            return UNAVAILABLE
        if ref.animated:
            return ANIMATED
        return self.check_domain(ref.url) or self.check_size(ref.width, ref.height)
