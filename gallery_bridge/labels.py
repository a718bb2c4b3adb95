"""Labels: a person says good or bad about a gallery image (``g<id>``) or a review item (``r<id>``).

What a label does (the ``label`` op; :class:`Labeller` runs inside ``serve``, the only writer):

* **good on a review item**: the item goes through the normal ingest path
  (idempotent by its key, so exactly once; dedup applies, the block list does
  not: the person just said this image is fine) and remembers the gallery
  entry it became;
* **bad on a gallery entry**: the entry leaves the gallery (catalogue row,
  original, thumbnail, then the page) and its sha256 and pHash go on the block
  list: the same image, or a near copy of it (the gallery's phash threshold,
  mirror included), is answered ``rejected``/``blocked`` at ingest from then on;
* **bad on a review item already ingested by a good label**: the entry it
  became leaves the gallery the same way;
* **good on a removed gallery entry**: it comes back from the kept copy.

The last label wins: every label replaces the item's previous one (the
``labels`` table has one row per item). Each row keeps the key, the image's
sha256 and its CLIP features (when the sender gave any), so ``labels export``
can hand them to ``anti-sus tune``/``learn`` without touching a model.

Images whose gallery or review file may disappear (a removed entry, a review
item that the review cap will evict) are copied to ``<gallery>/.labels/`` when
labelled. Copies are capped to the newest ``keep_copies``; a label whose copy
was dropped and whose file is gone is still in the table, but ``labels
export`` can only count it as missing. Same write order as the review store:
copy file before row, row (``copy`` cleared) before unlink, orphans swept at start.
``labels export`` lives in :mod:`gallery_bridge.label_export`.
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from photocore.atomic import atomic_write, fsync_dir
from photocore.protocol import ProtocolError

from .catalogue import META_COLUMNS, now_iso
from .ingest import Ingester, Outcome, crash_hook
from .reviews import ReviewStore
from .validate import Limits, Meta, check_image

log = logging.getLogger(__name__)

DIR_NAME = ".labels"
"""Kept copies of labelled images, next to the catalogue (``GALLERY/.labels/``)."""
DEFAULT_KEEP_COPIES = 20000
"""Copies kept (newest labels first) unless ``--label-copies`` says otherwise."""
LABELS = ("good", "bad")
CRASH_POINTS = ("label_removed",)
"""Test hook point (``GALLERY_BRIDGE_TEST_CRASH_AT``): an entry labelled bad is gone from the
catalogue (committed) but its files and the page are not yet."""
_ITEM = re.compile(r"^([gr])([1-9][0-9]{0,17})$")
_NEXT_SEQ = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM labels)"
"""A label's place in the order of labelling: the last label wins, also across items of one image."""


def parse_item(value: Any) -> tuple[str, int]:
    """``g<entry id>`` or ``r<review id>`` -> ("g"|"r", id); a ProtocolError otherwise."""
    m = _ITEM.match(value) if isinstance(value, str) else None
    if m is None:
        raise ProtocolError("bad_header", "item must be g<entry id> or r<review id>, e.g. 'g12'")
    return m.group(1), int(m.group(2))


def check_label(value: Any) -> str:
    if value not in LABELS:
        raise ProtocolError("bad_header", "label must be 'good' or 'bad'")
    return str(value)


def labels_dir(catalogue_path: Path) -> Path:
    return Path(catalogue_path).parent / DIR_NAME


@dataclass(frozen=True)
class Labelled:
    """The ``label`` op's answer."""

    item: str
    label: str
    gallery_id: int | None
    ingest: str | None = None  # good on a review item: added | duplicate | rejected
    reason: str | None = None
    removed: bool = False  # bad: an entry left the gallery

    def reply_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "labelled", "item": self.item, "label": self.label,
                               "gallery_id": self.gallery_id, "removed": self.removed}
        if self.ingest:
            out["ingest"] = self.ingest
        if self.reason:
            out["reason"] = self.reason
        return out


class Labeller:
    """Applies labels through the ingester (one writer); see the module docstring."""

    def __init__(self, ingester: Ingester, reviews: ReviewStore, *, limits: Limits | None = None,
                 keep_copies: int = DEFAULT_KEEP_COPIES) -> None:
        self.ingester = ingester
        self.catalogue = ingester.catalogue
        self.db = ingester.catalogue.db
        self.reviews = reviews
        self.limits = limits or Limits()
        self.keep_copies = max(1, keep_copies)
        self._crash = crash_hook()
        self.dir = labels_dir(self.catalogue.path)
        self.tmp = self.dir / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.recovered = self.recover()

    # ---- copies --------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Sweep temp and orphan copies; clear ``copy`` where the file is gone (outside interference)."""
        counts = {"temp_files": 0, "orphan_files": 0, "copies_missing": 0}
        for stray in self.tmp.iterdir():
            if stray.is_file():
                stray.unlink()
                counts["temp_files"] += 1
        for row in self.db.execute("SELECT item, copy FROM labels WHERE copy IS NOT NULL").fetchall():
            if not (self.dir / row["copy"]).is_file():
                self.db.execute("UPDATE labels SET copy=NULL WHERE item=?", (row["item"],))
                counts["copies_missing"] += 1
        named = {r[0] for r in self.db.execute("SELECT copy FROM labels WHERE copy IS NOT NULL")}
        for path in self.dir.iterdir():
            if path.is_file() and path.name not in named:
                path.unlink()
                counts["orphan_files"] += 1
        fsync_dir(self.dir)
        if any(counts.values()):
            log.warning("recovered label copies in %s: %s", self.dir, counts)
        return counts

    def _copy(self, item: str, ext: str, data: bytes) -> str:
        name = f"{item}.{ext}"  # item ids are [gr][0-9]+: safe as a file name
        atomic_write(self.dir / name, data, self.tmp)
        return name

    def _evict_copies(self) -> None:
        old = self.db.execute("SELECT item, copy FROM labels WHERE copy IS NOT NULL ORDER BY seq DESC "
                              "LIMIT -1 OFFSET ?", (self.keep_copies,)).fetchall()
        if not old:
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE labels SET copy=NULL WHERE item=?", [(r["item"],) for r in old])
        for r in old:
            (self.dir / r["copy"]).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def _store(self, item: str, key: str, label: str, features: bytes | None, sha: str, ext: str,
               copy: str | None, extra: Sequence[tuple[str, tuple[Any, ...]]] = ()) -> None:
        """The label row (last label wins) plus any other statements, in one transaction."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            old = self.db.execute("SELECT copy FROM labels WHERE item=?", (item,)).fetchone()
            keep_copy = copy or (old["copy"] if old else None)
            self.db.execute(
                "INSERT INTO labels (item, key, label, features, sha256, ext, copy, at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                + _NEXT_SEQ + ") ON CONFLICT(item) DO UPDATE SET key=excluded.key, label=excluded.label, "
                "features=COALESCE(excluded.features, labels.features), sha256=excluded.sha256, ext=excluded.ext, "
                "copy=excluded.copy, at=excluded.at, seq=excluded.seq",
                (item, key, label, features, sha, ext, keep_copy, now_iso()))
            for sql, params in extra:
                self.db.execute(sql, params)
        self._evict_copies()

    def _read_copy(self, item: str) -> bytes | None:
        row = self.db.execute("SELECT copy FROM labels WHERE item=?", (item,)).fetchone()
        if row is None or row["copy"] is None:
            return None
        try:
            return (self.dir / row["copy"]).read_bytes()
        except OSError:
            return None

    # ---- the op -------------------------------------------------------------------------------
    def label(self, item: str, label: str) -> Labelled:
        kind, ident = parse_item(item)
        label = check_label(label)
        return self._review(item, ident, label) if kind == "r" else self._entry(item, ident, label)

    def _review(self, item: str, review_id: int, label: str) -> Labelled:
        row = self.reviews.get(review_id)
        if row is None:
            raise ProtocolError("bad_header", f"no review item {item} (never sent, or past the review cap)")
        data = self.reviews.path(row["file"]).read_bytes()
        features = bytes(row["features"]) if row["features"] is not None else None
        copy = self._copy(item, "jpg", data)  # the review cap will delete the review file one day
        if label == "good":
            meta = Meta(**{c: row[c] for c in META_COLUMNS})
            try:
                meta.scores = {k: float(v) for k, v in json.loads(row["scores"] or "{}").items() if v is not None}
            except (ValueError, AttributeError):
                meta.scores = {}
            outcome = self._ingest(row["key"], meta, data, features)
            entry = self.catalogue.by_key(row["key"]) if outcome.gallery_id is not None else None
            self._store(item, row["key"], label, features, row["sha256"], "jpg", copy, [
                # The person says it is fine: whatever blocked this exact image no longer does.
                ("DELETE FROM blocked WHERE sha256=?", (row["sha256"],)),
                ("UPDATE reviews SET entry_id=?, gallery_id=? WHERE id=?",
                 (entry.entry_id if entry else None, outcome.gallery_id, review_id)),
            ])
            self.ingester.reload_blocked()
            return Labelled(item, label, outcome.gallery_id, outcome.status, outcome.reason)
        removed = False
        entry = self.catalogue.get(row["entry_id"]) if row["entry_id"] is not None else None
        if entry is not None and entry["state"] == "complete" and entry["key"] == row["key"]:
            # Flipped back to bad after a good label added it: the last label wins. An older
            # entry it merely duplicated is someone else's image and stays.
            removed = self._remove(int(row["entry_id"]), item)
        self._store(item, row["key"], label, features, row["sha256"], "jpg", copy)
        return Labelled(item, label, None, removed=removed)

    def _entry(self, item: str, entry_id: int, label: str) -> Labelled:
        entry = self.catalogue.get(entry_id)
        if entry is not None and entry["state"] != "complete":
            entry = None
        if entry is None:
            return self._removed_entry(item, label)
        features = bytes(entry["features"]) if entry["features"] is not None else None
        if label == "good":
            self._store(item, entry["key"], label, features, entry["sha256"], entry["ext"], None)
            return Labelled(item, label, entry["gallery_id"])
        self._remove(entry_id, item)
        return Labelled(item, label, None, removed=True)

    def _removed_entry(self, item: str, label: str) -> Labelled:
        """A gallery item that is gone: relabel it; good brings it back from the kept copy."""
        old = self.db.execute("SELECT * FROM labels WHERE item=?", (item,)).fetchone()
        if old is None:
            raise ProtocolError("bad_header", f"no gallery entry {item}")
        if label == "bad":
            self._store(item, old["key"], label, old["features"], old["sha256"], old["ext"], None)
            return Labelled(item, label, None)
        data = self._read_copy(item)
        if data is None:
            raise ProtocolError("bad_header", f"gallery entry {item} was removed and its copy is no longer kept")
        outcome = self._ingest(old["key"], Meta(), data, old["features"])
        self._store(item, old["key"], label, old["features"], old["sha256"], old["ext"], None,
                    [("DELETE FROM blocked WHERE item=?", (item,))])
        self.ingester.reload_blocked()
        return Labelled(item, label, outcome.gallery_id, outcome.status, outcome.reason)

    def _ingest(self, key: str, meta: Meta, data: bytes, features: bytes | None) -> Outcome:
        """The normal ingest path, minus the block list (a person just said this image is good)."""
        vec = None if features is None else np.frombuffer(features, dtype="<f4").astype(np.float32)
        outcome = self.ingester.known(key, data, blocked_ok=True)
        if outcome is None:
            outcome = self.ingester.ingest(key, meta, check_image(data, self.limits), vec,
                                           min_side=self.limits.min_side, blocked_ok=True)
        return outcome

    def _remove(self, entry_id: int, item: str) -> bool:
        """Take an entry out of the gallery and block its hashes; crash-safe order.

        One transaction deletes the entry's row (its aliases go with it) and
        writes the label and block rows; only then are its files unlinked. A
        crash in between leaves orphan files, which the folder target's
        recovery deletes at the next start (and it rewrites the page).
        """
        entry = self.catalogue.get(entry_id)
        if entry is None:
            return False
        path = getattr(self.ingester.target, "image_path", None)
        data = None
        if path is not None:
            try:
                data = path(entry_id, entry["ext"]).read_bytes()
            except OSError:
                data = None
        copy = self._copy(item, entry["ext"], data) if data is not None else None
        features = bytes(entry["features"]) if entry["features"] is not None else None
        # The label row goes on the gallery item; a review item's own row is written by its caller.
        label_rows = [] if item.startswith("r") else [(
            "INSERT INTO labels (item, key, label, features, sha256, ext, copy, at, seq) VALUES (?, ?, 'bad', ?, ?, ?, ?, ?, "
            + _NEXT_SEQ + ") ON CONFLICT(item) DO UPDATE SET label='bad', "
            "features=COALESCE(excluded.features, labels.features), copy=excluded.copy, at=excluded.at, seq=excluded.seq",
            (item, entry["key"], features, entry["sha256"], entry["ext"], copy, now_iso()))]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for sql, params in label_rows:
                self.db.execute(sql, params)
            self.db.execute("INSERT OR REPLACE INTO blocked (sha256, phash, item, at) VALUES (?, ?, ?, ?)",
                            (entry["sha256"], entry["phash"], item, now_iso()))
            self.db.execute("DELETE FROM entries WHERE id=?", (entry_id,))
            # A review item whose good label made this entry no longer points into the gallery.
            self.db.execute("UPDATE reviews SET entry_id=NULL, gallery_id=NULL WHERE entry_id=?", (entry_id,))
        self._crash("label_removed")
        self.ingester.dedup.remove(entry_id)
        self.ingester.reload_blocked()
        self.ingester.target.discard(entry_id, entry["ext"])
        try:
            self.ingester.target.published(self.catalogue)
        except OSError as exc:  # the removal is committed; a stale page is repaired at the next write or start
            log.error("could not rewrite the page: %s", exc)
        self._evict_copies()
        log.info("labelled bad: entry %d (%s) removed, hashes blocked", entry_id, item)
        return True


# ---- read side -----------------------------------------------------------------------------------

def label_of(conn: sqlite3.Connection, item: str) -> str | None:
    """The current label of ``g<id>``/``r<id>`` ("good", "bad") or None."""
    row = conn.execute("SELECT label FROM labels WHERE item=?", (item,)).fetchone()
    return None if row is None else str(tuple(row)[0])
