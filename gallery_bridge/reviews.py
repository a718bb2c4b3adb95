"""Review items: images anti_sus rejected, kept apart from the gallery so a person can overrule it.

nomad sends a sample of its rejected images (a JPEG copy of at most
``MAX_SIDE`` px, every stage's scores, which stage rejected it, where it came
from) with the ``review`` op. They live in the catalogue's ``reviews`` table and
in ``<gallery>/.review/`` (next to the catalogue), never among the gallery's
entries, and only the newest ``keep`` of them are kept.

Crash safety without a pending state: a file is written (atomically) before
its row is committed, and a row is deleted (committed) before its file is
unlinked. A crash can therefore leave an orphan file, never a row without its
file; :meth:`ReviewStore.recover` sweeps orphans (and temp files) at start.

The write side (:class:`ReviewStore`) runs inside ``gallery-bridge serve``, the
only writer. The functions at the bottom are the read side the web app uses on
its own read-only connection.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from photocore.atomic import atomic_write, fsync_dir
from photocore.protocol import ProtocolError

from .catalogue import META_COLUMNS, Catalogue, now_iso
from .validate import CheckedImage, Limits, Meta, check_image, clean_text

log = logging.getLogger(__name__)

DIR_NAME = ".review"
"""Folder of review images, next to the catalogue (``GALLERY/.review/``)."""
MAX_SIDE = 512
"""Longest side of a review image: a preview copy, not the original."""
MAX_BYTES = 4 * 1024 * 1024
"""Largest review image accepted: a 512 px JPEG is well under 1 MB even at quality 100."""
DEFAULT_KEEP = 5000
"""Review items kept (newest first) unless ``--review-keep`` says otherwise."""
MAX_STAGE = 64
"""Longest ``rejected_by`` (a stage name such as ``gmm`` or ``watermark``)."""

CRASH_POINTS = ("review_file", "review_evicted")
"""Test hook points (``GALLERY_BRIDGE_TEST_CRASH_AT``): after a review file is
written but before its row; after old rows are deleted but before their files."""

_COLUMNS = ("id", "key", "file", "sha256", "width", "height", "bytes", *META_COLUMNS, "scores", "rejected_by",
            "gallery_id", "entry_id", "added_at")


def review_dir(catalogue_path: Path) -> Path:
    """Where the review images of the catalogue at ``catalogue_path`` live."""
    return Path(catalogue_path).parent / DIR_NAME


@dataclass(frozen=True)
class Added:
    """Reply of :meth:`ReviewStore.add`: ``added`` or ``duplicate`` (same key seen), and the item's id."""

    status: str
    review_id: int


def check_stage(value: Any) -> str:
    """``rejected_by``: a short stage name (required)."""
    if not isinstance(value, str):
        raise ProtocolError("bad_header", "review needs a string 'rejected_by' (the stage that rejected the image)")
    text = clean_text(value, "rejected_by", MAX_STAGE + 1)
    if not text or len(text) > MAX_STAGE:
        raise ProtocolError("bad_header", f"rejected_by must be 1-{MAX_STAGE} printable characters")
    return text


def check_review_image(data: bytes, limits: Limits) -> CheckedImage:
    """The ingest guards (magic bytes, pixel cap, full decode), then: a JPEG of at most ``MAX_SIDE`` px a side."""
    cap = min(MAX_BYTES, limits.max_image_bytes)
    if len(data) > cap:
        raise ProtocolError("too_large", f"review image is {len(data)} bytes, limit {cap}")
    image = check_image(data, limits)
    if image.ext != "jpg":
        raise ProtocolError("bad_image", "a review image must be a JPEG")
    if max(image.width, image.height) > MAX_SIDE:
        raise ProtocolError("too_large", f"review image is {image.width}x{image.height}, limit {MAX_SIDE} px a side")
    return image


class ReviewStore:
    """The write side: add (idempotent by key), cap to the newest ``keep``, recover after a crash."""

    def __init__(self, catalogue: Catalogue, *, keep: int = DEFAULT_KEEP,
                 crash: Callable[[str], None] | None = None) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.catalogue = catalogue
        self.db = catalogue.db
        self.dir = review_dir(catalogue.path)
        self.tmp = self.dir / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._crash = crash or (lambda point: None)
        self.recovered = self.recover()

    def path(self, file: str) -> Path:
        return self.dir / file

    def recover(self) -> dict[str, int]:
        """Remove temp files, files no row names (a crash between file and row) and rows whose file is gone."""
        counts = {"temp_files": 0, "orphan_files": 0, "rows_without_file": 0}
        for stray in self.tmp.iterdir():
            if stray.is_file():
                stray.unlink()
                counts["temp_files"] += 1
        # A row whose file vanished can only come from outside interference (the
        # write order never produces one); drop it so readers never 404.
        for row in self.db.execute("SELECT id, file FROM reviews").fetchall():
            if not self.path(row["file"]).is_file():
                self.db.execute("DELETE FROM reviews WHERE id=?", (row["id"],))
                counts["rows_without_file"] += 1
        named = {r[0] for r in self.db.execute("SELECT file FROM reviews")}
        for path in self.dir.iterdir():
            if path.is_file() and path.name not in named:
                path.unlink()
                counts["orphan_files"] += 1
        fsync_dir(self.dir)
        evicted = self._evict()
        if any(counts.values()) or evicted:
            log.warning("recovered review items in %s: %s, %d over the cap removed", self.dir, counts, evicted)
        return counts

    def by_key(self, key: str) -> int | None:
        row = self.db.execute("SELECT id FROM reviews WHERE key=?", (key,)).fetchone()
        return int(row["id"]) if row else None

    def add(self, key: str, meta: Meta, data: bytes, width: int, height: int, scores: dict[str, float],
            rejected_by: str, features: np.ndarray | None) -> Added:
        """Store one review item unless its key is known; then cap the store."""
        known = self.by_key(key)
        if known is not None:
            return Added("duplicate", known)
        # Named by a hash of the key: known before the row exists (file first),
        # never built from text off the web, and unique because keys are.
        file = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40] + ".jpg"
        atomic_write(self.path(file), data, self.tmp)
        self._crash("review_file")
        cols = {c: getattr(meta, c) for c in META_COLUMNS}
        cur = self.db.execute(
            "INSERT INTO reviews (key, file, sha256, width, height, bytes, " + ", ".join(META_COLUMNS)
            + ", scores, rejected_by, features, added_at) VALUES (?, ?, ?, ?, ?, ?, "
            + ", ".join("?" * len(META_COLUMNS)) + ", ?, ?, ?, ?)",
            (key, file, hashlib.sha256(data).hexdigest(), width, height, len(data), *cols.values(),
             json.dumps(scores), rejected_by,
             None if features is None else np.asarray(features, dtype="<f4").tobytes(), now_iso()),
        )
        review_id = int(cur.lastrowid)
        self._evict()
        return Added("added", review_id)

    def _evict(self) -> int:
        """Delete every item older than the newest ``keep``: rows first (one commit), then their files."""
        old = self.db.execute("SELECT id, file FROM reviews ORDER BY id DESC LIMIT -1 OFFSET ?", (self.keep,)).fetchall()
        if not old:
            return 0
        with self.db:  # one transaction: all of them or none
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM reviews WHERE id=?", [(r["id"],) for r in old])
        self._crash("review_evicted")
        for r in old:
            self.path(r["file"]).unlink(missing_ok=True)
        fsync_dir(self.dir)
        return len(old)

    def get(self, review_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM reviews WHERE id=?", (int(review_id),)).fetchone()

    def mark_ingested(self, review_id: int, entry_id: int | None, gallery_id: int | None) -> None:
        self.db.execute("UPDATE reviews SET entry_id=?, gallery_id=? WHERE id=?", (entry_id, gallery_id, review_id))

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0])


# ---- read side (the web app: its own read-only connection) ---------------------------------------

def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    """Rows as dicts whatever the connection's row_factory is."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, tuple(row))) for row in cur.fetchall()]


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    try:
        row["scores"] = json.loads(row.get("scores") or "{}")
    except ValueError:
        row["scores"] = {}
    row["item"] = f"r{row['id']}"
    return row


_SELECT = ("SELECT " + ", ".join(f"r.{c}" for c in _COLUMNS)
           + ", l.label AS label FROM reviews r LEFT JOIN labels l ON l.item = 'r' || r.id")


def list_items(conn: sqlite3.Connection, limit: int, before: int | None = None) -> list[dict[str, Any]]:
    """Review items newest first (``before``: only ids below it, for paging), with their label if any.

    Each dict has the item id (``r<id>``), key, metadata, ``scores`` (a dict),
    ``rejected_by``, size, ``added_at``, ``label`` (good/bad/None) and, once
    labelled good, the ``gallery_id``/``entry_id`` it became. No features.
    """
    limit = max(0, int(limit))
    if before is None:
        cur = conn.execute(_SELECT + " ORDER BY r.id DESC LIMIT ?", (limit,))
    else:
        cur = conn.execute(_SELECT + " WHERE r.id < ? ORDER BY r.id DESC LIMIT ?", (int(before), limit))
    return [_shape(r) for r in _dicts(cur)]


def get_item(conn: sqlite3.Connection, review_id: int) -> dict[str, Any] | None:
    """One review item as in :func:`list_items`, or None."""
    rows = _dicts(conn.execute(_SELECT + " WHERE r.id = ?", (int(review_id),)))
    return _shape(rows[0]) if rows else None


def count(conn: sqlite3.Connection) -> int:
    """Review items held now."""
    return int(conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0])


def image_path(gallery_dir: Path, item: dict[str, Any]) -> Path:
    """The JPEG of a review item (a dict from :func:`list_items`/:func:`get_item`) in a folder gallery."""
    file = str(item["file"])
    if "/" in file or "\\" in file or file.startswith("."):
        raise ValueError(f"not a review file name: {file!r}")  # the catalogue only ever holds hex names
    return Path(gallery_dir) / DIR_NAME / file
