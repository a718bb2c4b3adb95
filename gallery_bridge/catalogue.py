"""The SQLite catalogue: the durable record of every gallery entry.

An entry is first inserted as ``pending`` (committed), then the target writes
its files, then the entry is marked ``complete`` (committed). Only complete
entries exist as far as readers and dedup are concerned; a pending row left by
a crash is undone by the startup recovery pass. Keys that turned out to be
duplicates are remembered as aliases so that redelivery answers the same way
even if thresholds change later.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'complete')),
    origin TEXT NOT NULL DEFAULT 'added',
    key TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    phash TEXT NOT NULL,
    coarse INTEGER NOT NULL,
    signature BLOB NOT NULL,
    features BLOB,
    ext TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    gallery_id INTEGER,
    source_url TEXT,
    permalink TEXT,
    title TEXT,
    subreddit TEXT,
    author TEXT,
    licence TEXT,
    source TEXT,
    scores TEXT NOT NULL DEFAULT '{}',
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    key TEXT PRIMARY KEY,
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    reason TEXT NOT NULL,
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_state ON entries(state, id);
-- Review items (gallery_bridge.reviews): what anti_sus rejected, kept apart from
-- the gallery, newest N only. The row is written after its file and deleted
-- before it, so a row never points at a missing file; orphan files are swept at start.
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    file TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    source_url TEXT,
    permalink TEXT,
    title TEXT,
    subreddit TEXT,
    author TEXT,
    licence TEXT,
    source TEXT,
    scores TEXT NOT NULL DEFAULT '{}',
    rejected_by TEXT NOT NULL,
    features BLOB,
    gallery_id INTEGER,
    entry_id INTEGER,
    added_at TEXT NOT NULL
);
-- Labels (gallery_bridge.labels): one row per item ('g<entry id>' or 'r<review id>'),
-- the last label wins. ``copy`` names a kept copy of the image under .labels/.
CREATE TABLE IF NOT EXISTS labels (
    item TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('good', 'bad')),
    features BLOB,
    sha256 TEXT NOT NULL,
    ext TEXT NOT NULL,
    copy TEXT,
    at TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0  -- order of labelling (at is only to the second)
);
CREATE INDEX IF NOT EXISTS labels_seq ON labels(seq);
-- Hashes of images labelled bad: refused at ingest (exact sha256, or phash near).
CREATE TABLE IF NOT EXISTS blocked (
    sha256 TEXT PRIMARY KEY,
    phash TEXT NOT NULL,
    item TEXT NOT NULL,
    at TEXT NOT NULL
);
"""

META_COLUMNS = ("source_url", "permalink", "title", "subreddit", "author", "licence", "source")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Known:
    """An existing entry a key or hash points to."""

    entry_id: int
    gallery_id: int
    reason: str


class Catalogue:
    """One SQLite file; every write is its own committed transaction (synchronous=FULL)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no catalogue at {self.path}")
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we tell the sender its image is safe.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ---- lookups -------------------------------------------------------------
    def by_key(self, key: str) -> Known | None:
        row = self.db.execute("SELECT id, gallery_id FROM entries WHERE key=? AND state='complete'", (key,)).fetchone()
        if row:
            return Known(row["id"], row["gallery_id"], "key")
        row = self.db.execute(
            "SELECT e.id, e.gallery_id, a.reason FROM aliases a JOIN entries e ON e.id=a.entry_id "
            "WHERE a.key=? AND e.state='complete'",
            (key,),
        ).fetchone()
        return Known(row["id"], row["gallery_id"], "key") if row else None

    def by_sha256(self, sha: str) -> Known | None:
        row = self.db.execute("SELECT id, gallery_id FROM entries WHERE sha256=? AND state='complete'", (sha,)).fetchone()
        return Known(row["id"], row["gallery_id"], "sha256") if row else None

    def gallery_id(self, entry_id: int) -> int | None:
        row = self.db.execute("SELECT gallery_id FROM entries WHERE id=? AND state='complete'", (entry_id,)).fetchone()
        return row["gallery_id"] if row else None

    def signature(self, entry_id: int) -> bytes | None:
        row = self.db.execute("SELECT signature FROM entries WHERE id=?", (entry_id,)).fetchone()
        return bytes(row["signature"]) if row else None

    def get(self, entry_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM entries WHERE id=?", (entry_id,)).fetchone()

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM entries WHERE state='complete'").fetchone()[0])

    def recent(self, limit: int, offset: int = 0) -> list[sqlite3.Row]:
        """Complete entries, newest first."""
        return self.db.execute(
            "SELECT * FROM entries WHERE state='complete' ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()

    def complete_ids(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT id FROM entries WHERE state='complete'")}

    def pending(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT id, ext FROM entries WHERE state='pending'").fetchall()

    def iter_index_rows(self) -> Iterator[sqlite3.Row]:
        """What the in-memory indexes are rebuilt from at startup."""
        yield from self.db.execute("SELECT id, phash, coarse, features FROM entries WHERE state='complete' ORDER BY id")

    # ---- writes --------------------------------------------------------------
    def insert_pending(self, *, key: str, sha256: str, phash: str, coarse: int, signature: bytes,
                       features: np.ndarray | None, ext: str, width: int, height: int, nbytes: int,
                       meta: dict[str, Any]) -> int:
        """Reserve an id for an entry whose files are about to be written (committed at once)."""
        cols = {c: meta.get(c) for c in META_COLUMNS}
        cur = self.db.execute(
            "INSERT INTO entries (state, key, sha256, phash, coarse, signature, features, ext, width, height, bytes, "
            + ", ".join(META_COLUMNS) + ", scores, added_at) VALUES ('pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            + ", ".join("?" * len(META_COLUMNS)) + ", ?, ?)",
            (key, sha256, phash, coarse, signature,
             None if features is None else np.asarray(features, dtype="<f4").tobytes(),
             ext, width, height, nbytes, *cols.values(), json.dumps(meta.get("scores") or {}), now_iso()),
        )
        return int(cur.lastrowid)

    def complete(self, entry_id: int, gallery_id: int, origin: str = "added") -> bool:
        """Mark the entry complete: from this commit on it exists. False if it was not pending."""
        cur = self.db.execute(
            "UPDATE entries SET state='complete', gallery_id=?, origin=?, added_at=? WHERE id=? AND state='pending'",
            (gallery_id, origin, now_iso(), entry_id),
        )
        return cur.rowcount == 1

    def delete(self, entry_id: int) -> None:
        self.db.execute("DELETE FROM entries WHERE id=?", (entry_id,))

    def add_alias(self, key: str, entry_id: int, reason: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO aliases (key, entry_id, reason, added_at) VALUES (?, ?, ?, ?)",
            (key, entry_id, reason, now_iso()),
        )

    def update_hashes(self, entry_id: int, phash: str, coarse: int, signature: bytes) -> None:
        self.db.execute("UPDATE entries SET phash=?, coarse=?, signature=? WHERE id=?", (phash, coarse, signature, entry_id))
