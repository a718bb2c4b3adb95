"""One ingest, exactly once: idempotency, dedup, then a durable write through a target.

Order of checks, cheapest first: key seen before -> sha256 seen before ->
perceptual near-duplicate (phash, crop-tolerant, CLIP). Only a new image gets a
pending catalogue row, files, and a complete row; the reply is built after that
commit. Everything runs on one thread: ingests are serialised, which is what
makes "check, then write" safe without locks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .catalogue import Catalogue
from .dedup import PHASH_WORDS, DedupConfig, Deduplicator, Fingerprint, HashIndex, fingerprint, words_from_hex
from .targets import Stored, Target
from .validate import CheckedImage, Meta

log = logging.getLogger(__name__)

CRASH_ENV = "GALLERY_BRIDGE_TEST_CRASH_AT"
"""Test hook: name of a point at which the process SIGKILLs itself (crash tests only)."""

CRASH_POINTS = ("pending", "image_tmp", "image", "thumb", "committed", "page")


def crash_hook() -> Any:
    """The function targets call at each named point; inert unless the env var is set."""
    wanted = os.environ.get(CRASH_ENV, "")

    def crash(point: str) -> None:
        if wanted and point == wanted:
            log.error("test hook: SIGKILL at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)

    return crash


@dataclass(frozen=True)
class Outcome:
    """The answer to one ingest."""

    status: str  # added | duplicate | rejected
    gallery_id: int | None
    reason: str | None = None  # why a duplicate: key, sha256, phash, phash_mirror, crop, clip, gallery; why rejected: too_small, gallery, blocked
    message: str | None = None

    def reply_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "gallery_id": self.gallery_id}
        if self.reason:
            out["reason"] = self.reason
        if self.message:
            out["message"] = self.message
        return out


def coarse_to_int(fp: Fingerprint) -> int:
    """SQLite integers are signed 64-bit: store the coarse hash's bits as int64."""
    return int(fp.coarse.view(np.int64)[0])


def coarse_from_int(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int64).view(np.uint64)


class Ingester:
    """Catalogue + in-memory indexes + one target."""

    def __init__(self, catalogue: Catalogue, target: Target, dedup: DedupConfig | None = None) -> None:
        from .lock import WriterLock

        # Recovery deletes pending rows: only safe when no other writer is mid-ingest.
        self._lock = WriterLock(catalogue.path.with_name(catalogue.path.name + ".lock"))
        self.catalogue = catalogue
        self.target = target
        self.dedup = Deduplicator(dedup or DedupConfig(), catalogue.signature)
        self._crash = crash_hook()
        self.recovered = target.recover(catalogue)
        t0 = time.perf_counter()
        ids: list[int] = []
        hexes: list[str] = []
        coarse: list[int] = []
        for row in catalogue.iter_index_rows():
            ids.append(row["id"])
            hexes.append(row["phash"])
            coarse.append(row["coarse"])
            if row["features"] is not None and self.dedup.config.clip_threshold is not None:
                self.dedup.features.add(row["id"], np.frombuffer(row["features"], dtype="<f4"))
        if ids:
            # One conversion for all rows: a million-entry gallery loads in seconds.
            words = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64)
            self.dedup.phash.add_many(np.array(ids), words.reshape(len(ids), -1))
            self.dedup.coarse.add_many(np.array(ids), np.array(coarse, dtype=np.int64).view(np.uint64).reshape(-1, 1))
        log.info("loaded %d hashes in %.0f ms", len(ids), 1000 * (time.perf_counter() - t0))
        self.blocked = HashIndex(PHASH_WORDS)
        self.reload_blocked()

    def reload_blocked(self) -> None:
        """Rebuild the in-memory index of blocked phashes from the catalogue (labels change it; a few rows)."""
        self.blocked = HashIndex(PHASH_WORDS)
        for n, row in enumerate(self.catalogue.db.execute("SELECT phash FROM blocked ORDER BY rowid")):
            self.blocked.add(n, words_from_hex(row["phash"]))

    def _blocked_sha(self, sha: str) -> bool:
        return self.catalogue.db.execute("SELECT 1 FROM blocked WHERE sha256=?", (sha,)).fetchone() is not None

    def _blocked_near(self, fp: Fingerprint) -> bool:
        """A near copy (or mirror) of an image labelled bad, at the gallery's own phash threshold."""
        return bool(self.blocked.search([fp.phash, fp.phash_mirror], self.dedup.config.phash_threshold, limit=1))

    def known(self, key: str, data: bytes, sha: str | None = None, *, blocked_ok: bool = False) -> Outcome | None:
        """Answer for a key or exact bytes seen before, or bytes labelled bad, without decoding anything.

        Redeliveries are the common case after a sender's retry; they are
        answered from the catalogue in well under a millisecond. ``sha``: the
        hex sha256 of ``data`` when the caller has it already. ``blocked_ok``:
        skip the block list (a user labelling this very image good).
        """
        known = self.catalogue.by_key(key)
        if known:
            return Outcome("duplicate", known.gallery_id, "key")
        sha = sha or hashlib.sha256(data).hexdigest()
        known = self.catalogue.by_sha256(sha)
        if known:
            self.catalogue.add_alias(key, known.entry_id, "sha256")
            return Outcome("duplicate", known.gallery_id, "sha256")
        if not blocked_ok and self._blocked_sha(sha):
            return Outcome("rejected", None, "blocked", "this image was labelled bad in the gallery")
        return None

    def ingest(self, key: str, meta: Meta, image: CheckedImage, features: np.ndarray | None = None,
               *, min_side: int = 0, blocked_ok: bool = False, known_sha: str | None = None) -> Outcome:
        """Add ``image`` under ``key`` unless it is known, too small, blocked or a near-duplicate.

        ``known_sha``: the caller has just called :meth:`known` for this key and
        these bytes (same ``blocked_ok``) and got None; this is the sha256 it
        used. On this one thread nothing can have changed since, so that
        lookup and the hashing of the bytes are not done twice.
        """
        if known_sha is None:
            # One sha256 of the bytes (tens of MB for a large PNG) serves the check and the row.
            sha = hashlib.sha256(image.data).hexdigest()
            seen = self.known(key, image.data, sha, blocked_ok=blocked_ok)
            if seen:
                return seen
        else:
            sha = known_sha
        if min(image.width, image.height) < min_side:
            return Outcome("rejected", None, "too_small", f"{image.width}x{image.height} is below the {min_side} px minimum side")
        fp = fingerprint(image.upright)  # the upright copy (if any) is shared with the thumbnail
        if not blocked_ok and len(self.blocked) and self._blocked_near(fp):
            return Outcome("rejected", None, "blocked", "a near copy of an image labelled bad in the gallery")
        match = self.dedup.find(fp, features)
        if match:
            gid = self.catalogue.gallery_id(match.entry_id)
            self.catalogue.add_alias(key, match.entry_id, match.reason)
            log.info("near-duplicate key=%s of entry %d (%s %.3f)", key, match.entry_id, match.reason, match.score)
            return Outcome("duplicate", gid, match.reason)
        return self._write(key, sha, fp, meta, image, features)

    def _write(self, key: str, sha: str, fp: Fingerprint, meta: Meta, image: CheckedImage,
               features: np.ndarray | None) -> Outcome:
        entry_id = self.catalogue.insert_pending(
            key=key, sha256=sha, phash=fp.phash_hex, coarse=coarse_to_int(fp), signature=fp.signature,
            features=features, ext=image.ext, width=image.width, height=image.height, nbytes=len(image.data),
            meta=meta.as_dict(),
        )
        self._crash("pending")
        try:
            stored: Stored = self.target.store(entry_id, image, meta)
        except BaseException:
            # Undo now rather than at the next start: the sender will retry.
            self.target.discard(entry_id, image.ext)
            self.catalogue.delete(entry_id)
            raise
        if stored.status == "rejected" or stored.gallery_id is None:
            self.target.discard(entry_id, image.ext)
            self.catalogue.delete(entry_id)
            return Outcome("rejected", None, "gallery", stored.message)
        origin = "added" if stored.status == "added" else "known"
        if not self.catalogue.complete(entry_id, stored.gallery_id, origin):
            raise RuntimeError(f"entry {entry_id} vanished before its commit")  # never confirm what is not there
        self._crash("committed")
        self.dedup.add(entry_id, fp, features)
        try:
            self.target.published(self.catalogue, entry_id)
        except OSError as exc:  # the entry is safe; a stale page is not worth failing the ingest
            log.error("could not rewrite the page: %s", exc)
        self._crash("page")
        log.info("%s key=%s gallery_id=%s", stored.status, key, stored.gallery_id)
        if stored.status == "added":
            return Outcome("added", stored.gallery_id)
        return Outcome("duplicate", stored.gallery_id, "gallery", stored.message)

    def info(self) -> dict[str, Any]:
        cfg = self.dedup.config
        return {
            "target": self.target.describe(),
            "entries": self.catalogue.count(),
            "dedup": {
                "phash_threshold": cfg.phash_threshold, "coarse_threshold": cfg.coarse_threshold,
                "crop_correlation": cfg.crop_correlation, "max_crop": cfg.max_crop,
                "clip_threshold": cfg.clip_threshold,
            },
        }

    def close(self) -> None:
        self.target.close()
        self.catalogue.close()
        self._lock.close()
