"""Duplicate skip: before a batch goes to anti_sus, ask the gallery which images it already holds.

Reposts are common: the same file, or a recompressed or resized copy, comes back
under new posts. The gallery would answer ``duplicate`` for them anyway, after
anti_sus spent CLIP (and the watermark model) on each. Here nomad sends the
gallery's ``have`` op, per item, the sha256 of the downloaded original and the
64-bit and 576-bit pHashes of the decoded image, and drops what it answers ``exact`` or
``near``: those are decided as ``rejected`` with reason ``duplicate_exact`` /
``duplicate_near`` (the store, the cycle line and ``nomad_images_total``, next
to ``duplicate_url``), never fetched again, and never reach anti_sus.

The check must never cost the crawl anything: a short timeout and no resend;
when the gallery is down, slow, or too old to know ``have`` (``unknown_op``),
the batch goes to anti_sus whole, as before, one log line says so, and the
check rests for a while before it is tried again. It runs only when nomad
delivers to a gallery (not with ``--save-dir``) and ``--no-dupskip`` /
``NOMAD_DUPSKIP=0`` turns it off.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import time
from typing import Any, Callable, Protocol

from PIL import Image

from .batch import Downloaded

log = logging.getLogger(__name__)

REASONS = {"exact": "duplicate_exact", "near": "duplicate_near"}
"""The rejection reason each ``have`` answer that drops an image is counted under."""

DEFAULT_TIMEOUT = 2.0
"""Seconds one ``have`` request may take (``--dupskip-timeout``): hashes only, milliseconds when up."""
RETRY_AFTER = 60.0
"""Seconds the check rests after the gallery did not answer it (down, slow, or an error)."""
OLD_SERVER_RETRY = 600.0
"""Seconds the check rests after an ``unknown_op``: a gallery that predates ``have`` (it may be upgraded)."""


class Asker(Protocol):
    """What the stage needs of a gallery client: :meth:`gallery_bridge.client.IngestClient.have`."""

    def have(self, items: list[tuple[str, ...]]) -> list[str]: ...

    def close(self) -> None: ...


Decide = Callable[[Downloaded, str], None]
"""Records one dropped item as decided, given the item and its reason (the crawler's ``_decide``)."""


def hashes_of(data: bytes, wire: Any) -> tuple[str, str, str]:
    """(sha256 hex of the original bytes, 64-bit and 576-bit pHash hex of the decoded wire image).

    The crawler's download workers call this beside the decode, so a batch
    that is due goes to the gallery's ``have`` without hashing in between.
    """
    from gallery_bridge.dedup.fingerprint import have_hashes

    return (hashlib.sha256(data).hexdigest(), *have_hashes(Image.fromarray(wire)))


def item_hashes(item: Downloaded) -> tuple[str, str, str]:
    """(sha256 hex of the original bytes on disk, 64-bit and 576-bit pHash hex of the decoded wire image).

    The pHashes are the gallery's own definitions (its ``coarse`` and
    ``phash``, both from a 96x96 grey squash of the whole image); the 512x512
    wire image is such a squash already, so nothing is decoded a second time.
    With the 576-bit one the gallery answers ``near`` by its ingest rule: what
    is dropped here is what ingest would have called a duplicate.
    """
    from gallery_bridge.dedup.fingerprint import have_hashes

    with open(item.spool, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
    return (sha, *have_hashes(Image.fromarray(item.wire)))


class DupSkip:
    """Drops the items of a batch that the gallery already holds; everything else passes untouched.

    ``asker`` is a gallery client with ``have`` (build one with
    :meth:`for_gallery`); ``clock`` is monotonic seconds (tests inject theirs).
    ``counts`` holds what the stage did since it started: ``asked``, ``exact``,
    ``near``, ``new``, and ``unchecked`` (items sent on because the gallery did
    not answer, or during a rest).
    """

    def __init__(self, asker: Asker, *, clock: Callable[[], float] = time.monotonic,
                 retry_after: float = RETRY_AFTER, old_server_retry: float = OLD_SERVER_RETRY) -> None:
        self.asker = asker
        self.clock = clock
        self.retry_after = retry_after
        self.old_server_retry = old_server_retry
        self.counts: collections.Counter[str] = collections.Counter()
        self._resting_until: float | None = None
        self._warned = False

    @classmethod
    def for_gallery(cls, endpoint: str, *, timeout: float = DEFAULT_TIMEOUT, curve: Any = None, **kw: Any) -> "DupSkip":
        """A stage asking gallery_bridge at ``endpoint`` (CURVE keys as for delivery), one try of ``timeout`` s."""
        from gallery_bridge.client import IngestClient

        # retries=0: a missing answer means "send everything to anti_sus", not "wait longer".
        return cls(IngestClient(endpoint, timeout=timeout, retries=0, curve=curve), **kw)

    def close(self) -> None:
        self.asker.close()

    def answers(self, items: list[Downloaded]) -> list[str]:
        """``exact`` | ``near`` | ``new`` per item; all ``new`` when the gallery cannot say. Never raises."""
        if not items:
            return []
        if self._resting_until is not None and self.clock() < self._resting_until:
            self.counts["unchecked"] += len(items)
            return ["new"] * len(items)
        pairs: list[tuple[str, str, str] | None] = []
        for it in items:
            try:
                pairs.append(it.hashes or item_hashes(it))
            except (OSError, ValueError) as exc:  # a spool file gone, an odd array: just not checked
                log.warning("dupskip: cannot hash %s (%s); it goes to anti_sus", it.ref.key, exc)
                pairs.append(None)
        asked = [p for p in pairs if p is not None]
        try:
            replies = self.asker.have(asked) if asked else []
            if len(replies) != len(asked):
                raise ValueError(f"{len(replies)} answers for {len(asked)} items")
            got = iter(replies)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the batch goes on unchecked
            self._rest(exc)
            self.counts["unchecked"] += len(items)
            return ["new"] * len(items)
        if self._warned:
            log.info("dupskip: the gallery answers the have check again")
            self._warned = False
        self._resting_until = None
        out = [next(got) if p is not None else "new" for p in pairs]
        self.counts["asked"] += len(asked)
        self.counts["unchecked"] += len(items) - len(asked)
        self.counts.update(out[i] for i, p in enumerate(pairs) if p is not None)
        return out

    def _rest(self, exc: Exception) -> None:
        """Stop asking for a while after a failure; one log line per outage, not one per batch."""
        old = getattr(exc, "code", None) == "unknown_op"
        wait = self.old_server_retry if old else self.retry_after
        self._resting_until = self.clock() + wait
        if not self._warned:
            why = "the gallery predates the have op" if old else f"no answer from the gallery ({exc})"
            log.warning("dupskip: %s; batches go to anti_sus unchecked, next try in %.0fs", why, wait)
            self._warned = True

    def drop_known(self, items: list[Downloaded], decide: Decide) -> list[Downloaded]:
        """The items the gallery does not hold; each dropped one is decided and its spooled original removed."""
        keep: list[Downloaded] = []
        for it, answer in zip(items, self.answers(items)):
            reason = REASONS.get(answer)
            if reason is None:
                keep.append(it)
                continue
            decide(it, reason)
            it.spool.unlink(missing_ok=True)
        if len(keep) < len(items):
            log.info("dupskip: %d of %d images already in the gallery, not sent to anti_sus", len(items) - len(keep), len(items))
        return keep
