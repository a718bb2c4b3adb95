"""State: SQLite (WAL) under ``--state-dir``: posts, image keys with outcomes, the outbox.

Nothing is downloaded twice and nothing accepted is lost across restarts:

* ``posts``: every post id seen, with its outcome (expanded, rejected+reason,
  failed+error+retry count). A post seen once is never expanded again unless
  its expansion failed and retries are left.
* ``images``: every image key (``reddit:t3_abc:0``) with its state:
  ``pending`` (to download), ``accepted`` (anti_sus said good; in the outbox),
  ``delivered`` (acknowledged by gallery_bridge or written to --save-dir),
  ``rejected`` (+reason), ``failed`` (+error, retry count; retried while
  retries < the limit).
* ``cursors`` / ``source_status``: per listing source, its durable position
  (continue tokens, stream cursor) and what it last did, for ``nomad sources``.
* ``outbox``: accepted images not yet acknowledged; the original bytes stay on
  disk under ``state-dir/outbox/`` until the ack, so a restart redelivers them.
  Each item counts its failed attempts and waits until ``next_attempt_at``.
* ``dead_letters``: outbox items delivery gave up on (image state
  ``dead_letter``), with their reason; their files stay until ``retry_dead``.

Over 400 lines on purpose: one class because every table shares one
connection, one lock and one transaction helper, and several writes span two
tables in one transaction (accept, delivered, dead_letter); split up, each part
would need the others' connection and lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from photocore.atomic import atomic_open
from photocore.closing import Closeable

from nomad.sources.base import Candidate, ImageRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    post_id    TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    state      TEXT NOT NULL,          -- expanded | rejected | failed
    reason     TEXT,
    error      TEXT,
    retries    INTEGER NOT NULL DEFAULT 0,
    data       TEXT,                   -- the candidate as JSON, to retry a failed expansion
    first_seen REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_state ON posts(state);
CREATE TABLE IF NOT EXISTS images (
    key        TEXT PRIMARY KEY,
    post_id    TEXT NOT NULL,
    url        TEXT NOT NULL,
    state      TEXT NOT NULL,          -- pending | accepted | delivered | rejected | failed
    reason     TEXT,
    error      TEXT,
    retries    INTEGER NOT NULL DEFAULT 0,
    ref        TEXT NOT NULL,          -- the ImageRef as JSON, to download after a restart
    scores     TEXT,
    gallery    TEXT,                   -- gallery_bridge's answer: added | duplicate | rejected, id
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_state ON images(state);
CREATE INDEX IF NOT EXISTS images_post ON images(post_id);
CREATE INDEX IF NOT EXISTS images_url ON images(url);
CREATE TABLE IF NOT EXISTS outbox (
    key        TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    features   TEXT,
    meta       TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created    REAL NOT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0   -- per-item backoff after a retryable refusal
);
CREATE TABLE IF NOT EXISTS dead_letters (  -- outbox items the destination kept refusing
    key        TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    features   TEXT,
    meta       TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    created    REAL NOT NULL,
    died       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    source     TEXT NOT NULL,          -- reddit | commons | flickr | bluesky
    name       TEXT NOT NULL,          -- e.g. continue token, jetstream cursor
    value      TEXT NOT NULL,
    updated    REAL NOT NULL,
    PRIMARY KEY (source, name)
);
CREATE TABLE IF NOT EXISTS source_status (
    source     TEXT PRIMARY KEY,
    state      TEXT NOT NULL,          -- ok | blocked | rate_limited | error | unknown
    detail     TEXT NOT NULL,
    at         REAL NOT NULL
);
"""

DECIDED = ("accepted", "delivered", "rejected")


def safe_name(key: str) -> str:
    """A file name for a key: readable, and unique thanks to a hash of the full key."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


@dataclass
class OutboxItem:
    """One accepted image waiting for delivery."""

    key: str
    path: Path
    meta: dict[str, Any]
    features: Path | None
    attempts: int
    next_attempt_at: float = 0.0
    last_error: str | None = None

    def read(self) -> bytes:
        return self.path.read_bytes()

    def read_features(self) -> np.ndarray | None:
        if self.features is None or not self.features.is_file():
            return None
        return np.load(self.features, allow_pickle=False)


@dataclass
class SourceCursors:
    """One source's cursors in the store (implements ``nomad.sources.base.Cursors``)."""

    store: "Store"
    source: str

    def get(self, name: str) -> str | None:
        return self.store.cursor(self.source, name)

    def set(self, name: str, value: str) -> None:
        self.store.set_cursor(self.source, name, value)


class Store(Closeable):
    """The state DB; safe to share between the crawler's threads (one connection, one lock)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outbox_dir = self.dir / "outbox"
        self.outbox_dir.mkdir(exist_ok=True)
        self.spool_dir = self.dir / "spool"
        self.spool_dir.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "nomad.sqlite3", check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        if "next_attempt_at" not in columns:  # a state DB from before per-item backoff
            self._db.execute("ALTER TABLE outbox ADD COLUMN next_attempt_at REAL NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()


    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- per-source cursors and status ------------------------------------------------
    def cursor(self, source: str, name: str) -> str | None:
        row = self._one("SELECT value FROM cursors WHERE source = ? AND name = ?", (source, name))
        return None if row is None else str(row[0])

    def set_cursor(self, source: str, name: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO cursors(source, name, value, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(source, name) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                (source, name, str(value), time.time()),
            )

    def cursors_of(self, source: str) -> "SourceCursors":
        """The :class:`~nomad.sources.base.Cursors` view a listing source gets."""
        return SourceCursors(self, source)

    def set_source_status(self, source: str, state: str, detail: str, at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO source_status(source, state, detail, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(source) DO UPDATE SET state = excluded.state, detail = excluded.detail, at = excluded.at",
                (source, state, detail, at),
            )

    def source_statuses(self) -> dict[str, dict[str, Any]]:
        rows = self._all("SELECT source, state, detail, at FROM source_status")
        return {r[0]: {"state": r[1], "detail": r[2], "at": r[3]} for r in rows}

    # --- posts ---------------------------------------------------------------------
    def seen_post(self, post_id: str) -> bool:
        return self._one("SELECT 1 FROM posts WHERE post_id = ?", (post_id,)) is not None

    def post_state(self, post_id: str) -> tuple[str, str | None, int] | None:
        """(state, reason or error, retries) of a post, None when never seen."""
        row = self._one("SELECT state, COALESCE(reason, error), retries FROM posts WHERE post_id = ?", (post_id,))
        return (row[0], row[1], row[2]) if row else None

    def record_post(self, post: Candidate, state: str, *, reason: str | None = None, error: str | None = None) -> None:
        """Record a post's outcome; a failure adds one to its retry count."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                """INSERT INTO posts(post_id, source, state, reason, error, retries, data, first_seen, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(post_id) DO UPDATE SET state = excluded.state, reason = excluded.reason,
                       error = excluded.error, updated = excluded.updated,
                       retries = posts.retries + (excluded.state = 'failed')""",
                (post.post_id, post.source, state, reason, error, int(state == "failed"), json.dumps(post.to_dict()), now, now),
            )

    def retry_posts(self, max_retries: int) -> list[Candidate]:
        """Posts whose expansion failed and that have retries left."""
        rows = self._all("SELECT data FROM posts WHERE state = 'failed' AND retries < ? ORDER BY updated", (max_retries,))
        return [Candidate.from_dict(json.loads(r[0])) for r in rows if r[0]]

    # --- images --------------------------------------------------------------------
    def add_image(self, ref: ImageRef, post_id: str, *, state: str = "pending", reason: str | None = None) -> bool:
        """Record a new image key; False (and nothing changed) when the key is already known."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                """INSERT OR IGNORE INTO images(key, post_id, url, state, reason, ref, created, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (ref.key, post_id, ref.url, state, reason, json.dumps(ref.to_dict()), now, now),
            )
            return cur.rowcount == 1

    def image_state(self, key: str) -> tuple[str, str | None, int] | None:
        """(state, reason or error, retries) of an image key, None when unknown."""
        row = self._one("SELECT state, COALESCE(reason, error), retries FROM images WHERE key = ?", (key,))
        return (row[0], row[1], row[2]) if row else None

    def url_taken(self, url: str, key: str) -> str | None:
        """Key of another image with the same URL that is already decided or on its way (crossposts)."""
        row = self._one(
            "SELECT key FROM images WHERE url = ? AND key != ? AND state IN ('pending', 'accepted', 'delivered', 'rejected', 'dead_letter') LIMIT 1",
            (url, key),
        )
        return row[0] if row else None

    def set_image(self, key: str, state: str, *, reason: str | None = None, error: str | None = None, scores: dict[str, Any] | None = None) -> None:
        """Move an image to a new state; a failure adds one to its retry count."""
        with self._tx() as db:
            db.execute(
                """UPDATE images SET state = ?, reason = ?, error = ?, updated = ?,
                       scores = COALESCE(?, scores), retries = retries + ?
                   WHERE key = ?""",
                (state, reason, error, time.time(), json.dumps(scores) if scores is not None else None, int(state == "failed"), key),
            )

    def work(self, max_retries: int, limit: int | None = None) -> list[ImageRef]:
        """Images to download now: pending ones, then failed ones with retries left."""
        rows = self._all(
            """SELECT ref FROM images WHERE state = 'pending' OR (state = 'failed' AND retries < ?)
               ORDER BY state = 'failed', created LIMIT ?""",
            (max_retries, -1 if limit is None else limit),
        )
        return [ImageRef.from_dict(json.loads(r[0])) for r in rows]

    def images_of(self, post_id: str) -> list[tuple[str, str, str | None]]:
        """(key, state, reason or error) of every image of a post, in key order."""
        rows = [tuple(r) for r in self._all("SELECT key, state, COALESCE(reason, error) FROM images WHERE post_id = ?", (post_id,))]
        return sorted(rows, key=lambda r: int(r[0].rsplit(":", 1)[1]) if r[0].rsplit(":", 1)[1].isdigit() else 0)

    # --- spool and outbox ----------------------------------------------------------
    def spool_path(self, key: str, ext: str) -> Path:
        """Where a downloaded original waits (on disk, not in memory) for its anti_sus verdict."""
        return self.spool_dir / (safe_name(key) + ext)

    def clear_spool(self) -> int:
        """Remove originals of batches a previous run never finished (their keys are still pending)."""
        n = 0
        for p in self.spool_dir.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n

    def accept(self, key: str, spooled: Path, meta: dict[str, Any], features: np.ndarray | None, scores: dict[str, Any]) -> None:
        """anti_sus said good: move the original into the outbox and record it, atomically enough.

        The file is moved first and the row written after: a crash in between
        leaves an orphan file (harmless; the key is still pending and is fetched again),
        never a row without its file.
        """
        target = self.outbox_dir / spooled.name
        os.replace(spooled, target)
        feat_path = None
        if features is not None:
            feat_path = self.outbox_dir / (target.stem + ".features.npy")
            with atomic_open(feat_path) as fh:
                np.save(fh, np.asarray(features, dtype=np.float32), allow_pickle=False)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO outbox(key, path, features, meta, attempts, created) VALUES (?, ?, ?, ?, 0, ?)",
                (key, target.name, feat_path.name if feat_path else None, json.dumps(meta), time.time()),
            )
            db.execute(
                "UPDATE images SET state = 'accepted', reason = NULL, error = NULL, scores = ?, updated = ? WHERE key = ?",
                (json.dumps(scores), time.time(), key),
            )

    def outbox(self, limit: int | None = None) -> list[OutboxItem]:
        """Accepted images not yet acknowledged, oldest first."""
        rows = self._all(
            "SELECT key, path, meta, features, attempts, next_attempt_at, last_error FROM outbox ORDER BY created LIMIT ?",
            (-1 if limit is None else limit,),
        )
        return [
            OutboxItem(r[0], self.outbox_dir / r[1], json.loads(r[2]), self.outbox_dir / r[3] if r[3] else None, r[4], r[5], r[6])
            for r in rows
        ]

    def outbox_size(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM outbox")[0])

    def delivered(self, key: str, status: str, gallery_id: Any = None) -> None:
        """The gallery acknowledged (or --save-dir wrote) the image: drop it from the outbox.

        Crash-safe order: the row goes first (in the same transaction that reads
        its file names), the files after. A crash in between leaves files without
        a row, which :meth:`sweep_outbox` removes at the next start; never a row
        whose file is gone (that one could not be redelivered).
        """
        with self._tx() as db:
            item = db.execute("SELECT path, features FROM outbox WHERE key = ?", (key,)).fetchone()
            db.execute("DELETE FROM outbox WHERE key = ?", (key,))
            db.execute(
                "UPDATE images SET state = 'delivered', gallery = ?, updated = ? WHERE key = ?",
                (json.dumps({"status": status, "id": gallery_id}), time.time(), key),
            )
        if item:
            for name in item:
                if name:
                    (self.outbox_dir / name).unlink(missing_ok=True)

    def delivery_failed(self, key: str, error: str, *, retry_at: float = 0.0) -> int:
        """One more failed attempt; the item waits until ``retry_at`` (epoch seconds). Returns the attempts."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE key = ?",
                (error, retry_at, key),
            )
            row = db.execute("SELECT attempts FROM outbox WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def outbox_due(self, now: float, limit: int | None = None) -> list[OutboxItem]:
        """Outbox items whose backoff is over (``next_attempt_at <= now``), oldest first."""
        rows = self._all(
            "SELECT key, path, meta, features, attempts, next_attempt_at, last_error FROM outbox "
            "WHERE next_attempt_at <= ? ORDER BY created LIMIT ?",
            (now, -1 if limit is None else limit),
        )
        return [
            OutboxItem(r[0], self.outbox_dir / r[1], json.loads(r[2]), self.outbox_dir / r[3] if r[3] else None, r[4], r[5], r[6])
            for r in rows
        ]

    def next_attempt_at(self) -> float | None:
        """When the next outbox item is due (None: the outbox is empty)."""
        row = self._one("SELECT MIN(next_attempt_at) FROM outbox")
        return None if row is None or row[0] is None else float(row[0])

    def dead_letter(self, key: str, reason: str) -> None:
        """Move an outbox item the destination keeps refusing to ``dead_letters`` (its files stay)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                """INSERT OR REPLACE INTO dead_letters(key, path, features, meta, attempts, reason, created, died)
                   SELECT key, path, features, meta, attempts, ?, created, ? FROM outbox WHERE key = ?""",
                (reason, now, key),
            )
            db.execute("DELETE FROM outbox WHERE key = ?", (key,))
            db.execute("UPDATE images SET state = 'dead_letter', error = ?, updated = ? WHERE key = ?", (reason, now, key))

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter: key, attempts, reason, when it died (epoch seconds), oldest first."""
        rows = self._all("SELECT key, attempts, reason, died FROM dead_letters ORDER BY died, key")
        return [{"key": r[0], "attempts": r[1], "reason": r[2], "died": r[3]} for r in rows]

    def retry_dead(self, keys: list[str] | None = None) -> list[str]:
        """Put dead letters (all, or these keys) back into the outbox with a fresh attempt count."""
        now = time.time()
        with self._tx() as db:
            if keys:
                found = [k for k in keys if db.execute("SELECT 1 FROM dead_letters WHERE key = ?", (k,)).fetchone()]
            else:
                found = [r[0] for r in db.execute("SELECT key FROM dead_letters ORDER BY died, key")]
            for k in found:
                db.execute(
                    """INSERT OR REPLACE INTO outbox(key, path, features, meta, attempts, last_error, created, next_attempt_at)
                       SELECT key, path, features, meta, 0, NULL, created, 0 FROM dead_letters WHERE key = ?""",
                    (k,),
                )
                db.execute("DELETE FROM dead_letters WHERE key = ?", (k,))
                db.execute("UPDATE images SET state = 'accepted', error = NULL, updated = ? WHERE key = ?", (now, k))
        return found

    def sweep_outbox(self) -> int:
        """Remove files in ``outbox/`` that no outbox row or dead letter names (left by a crash).

        Call it at start only, before anything is accepted: :meth:`accept` moves
        a file in before it writes the row.
        """
        with self._lock:
            kept: set[str] = set()
            for table in ("outbox", "dead_letters"):
                for path, features in self._db.execute(f"SELECT path, features FROM {table}"):
                    kept.update(n for n in (path, features) if n)
            removed = 0
            for p in self.outbox_dir.iterdir():
                if p.is_file() and p.name not in kept:
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    # --- stats ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts by state and by reason, for ``nomad stats`` and the logs."""
        posts = {s: n for s, n in self._all("SELECT state, COUNT(*) FROM posts GROUP BY state")}
        images = {s: n for s, n in self._all("SELECT state, COUNT(*) FROM images GROUP BY state")}
        rejected = {r or "?": n for r, n in self._all("SELECT reason, COUNT(*) FROM images WHERE state = 'rejected' GROUP BY reason")}
        post_rejected = {r or "?": n for r, n in self._all("SELECT reason, COUNT(*) FROM posts WHERE state = 'rejected' GROUP BY reason")}
        failed = {r or "?": n for r, n in self._all("SELECT reason, COUNT(*) FROM images WHERE state = 'failed' GROUP BY reason")}
        return {
            "posts": posts,
            "posts_rejected": post_rejected,
            "images": images,
            "images_rejected": rejected,
            "images_failed": failed,
            "outbox": self.outbox_size(),
            "dead_letters": self.dead_letters(),
        }
