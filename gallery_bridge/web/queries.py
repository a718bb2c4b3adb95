"""Read-only queries on the gallery catalogue for the web app.

The web app is a second process next to ``gallery-bridge serve``: it opens the
SQLite file with ``mode=ro`` (it can never take the writer's lock) and a busy
timeout, and reads in WAL mode, so a browse never blocks an ingest and an
ingest never fails a browse. Every query is bounded (``limit`` is capped) and
paged by id (``before``), so the catalogue's size does not matter.
"""
from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_LIMIT = 200
"""Most rows one page or API call returns."""

BUSY_TIMEOUT_MS = 5000
"""How long a read waits for a checkpoint instead of failing at once."""

SCORE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Score names a filter may name: they become a JSON path, so nothing else is allowed."""

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

ENTRY_FIELDS = ("id", "gallery_id", "key", "ext", "width", "height", "bytes", "title", "author", "licence", "source",
                "subreddit", "permalink", "source_url", "added_at", "origin")


class FilterError(ValueError):
    """A filter value the user typed that cannot be used (shown as a 400 / a note on the page)."""


def connect(path: Path) -> sqlite3.Connection | None:
    """A read-only connection to the catalogue, or None when there is none yet (nothing ingested)."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only=ON")
    return conn


@dataclass(frozen=True)
class Filters:
    """What the browse page and ``GET /api/images`` can narrow by; every field optional."""

    source: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    score: str | None = None
    score_min: float | None = None
    score_max: float | None = None

    @classmethod
    def parse(cls, args: Any) -> "Filters":
        """From query arguments (``source``, ``from``, ``to``, ``score``, ``min``, ``max``); raises FilterError."""
        def text(name: str) -> str | None:
            value = (args.get(name) or "").strip()
            return value[:300] or None

        def number(name: str) -> float | None:
            raw = text(name)
            if raw is None:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise FilterError(f"{name} must be a number, got {raw[:40]!r}") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise FilterError(f"{name} must be a finite number")
            return value

        date_from, date_to = text("from"), text("to")
        for name, value in (("from", date_from), ("to", date_to)):
            if value is not None and not DATE.match(value):
                raise FilterError(f"{name} must be a date YYYY-MM-DD, got {value[:40]!r}")
        score = text("score")
        lo, hi = number("min"), number("max")
        if score is not None and not SCORE_NAME.match(score):
            raise FilterError("score must be a stage name such as gmm or watermark")
        if (lo is not None or hi is not None) and score is None:
            raise FilterError("min/max need score=NAME (which stage's score to compare)")
        return cls(text("source"), date_from, date_to, score, lo, hi)

    def where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions (parameterised) for these filters."""
        sql: list[str] = []
        params: list[Any] = []
        if self.source:
            sql.append("source = ?")
            params.append(self.source)
        if self.date_from:
            sql.append("added_at >= ?")
            params.append(self.date_from)
        if self.date_to:
            # Inclusive: everything added on that day sorts before the next character after the date.
            sql.append("added_at < ?")
            params.append(self.date_to + "T99")
        if self.score:
            path = f'$."{self.score}"'
            sql.append("json_extract(scores, ?) IS NOT NULL")
            params.append(path)
            if self.score_min is not None:
                sql.append("json_extract(scores, ?) >= ?")
                params += [path, self.score_min]
            if self.score_max is not None:
                sql.append("json_extract(scores, ?) <= ?")
                params += [path, self.score_max]
        return sql, params

    def query(self) -> dict[str, str]:
        """The filters as query arguments again (for the next-page link)."""
        out = {"source": self.source, "from": self.date_from, "to": self.date_to, "score": self.score,
               "min": None if self.score_min is None else f"{self.score_min:g}",
               "max": None if self.score_max is None else f"{self.score_max:g}"}
        return {k: v for k, v in out.items() if v}

    @property
    def active(self) -> bool:
        return bool(self.query())


def scores_of(row: sqlite3.Row) -> dict[str, float]:
    """The stored scores JSON as a dict of finite numbers (anything else is dropped)."""
    try:
        raw = json.loads(row["scores"] or "{}")
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def entry_dict(row: sqlite3.Row) -> dict[str, Any]:
    """One entry as the API shows it (no hashes, no features)."""
    out = {k: row[k] for k in ENTRY_FIELDS}
    out["item"] = f"g{row['id']}"
    out["scores"] = scores_of(row)
    return out


def page(conn: sqlite3.Connection | None, limit: int, before: int | None, filters: Filters) -> tuple[list[dict[str, Any]], int | None]:
    """Complete entries newest first, ``limit`` of them below id ``before``; and the cursor of the next page."""
    if conn is None:
        return [], None
    limit = max(1, min(MAX_LIMIT, limit))
    where, params = filters.where()
    where.insert(0, "state = 'complete'")
    if before is not None:
        where.append("id < ?")
        params.append(before)
    # One row more than asked tells whether a next page exists without a COUNT.
    rows = conn.execute(f"SELECT * FROM entries WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                        (*params, limit + 1)).fetchall()
    items = [entry_dict(r) for r in rows[:limit]]
    return items, (items[-1]["id"] if len(rows) > limit else None)


def count(conn: sqlite3.Connection | None) -> int:
    if conn is None:
        return 0
    return int(conn.execute("SELECT COUNT(*) FROM entries WHERE state='complete'").fetchone()[0])


def sources(conn: sqlite3.Connection | None) -> list[str]:
    """The distinct sources, for the filter's choices."""
    if conn is None:
        return []
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT source FROM entries WHERE state='complete' AND source IS NOT NULL ORDER BY source LIMIT 100")]


def score_names(conn: sqlite3.Connection | None) -> list[str]:
    """Stage names seen in the newest entries' scores, for the filter's choices."""
    if conn is None:
        return []
    names: set[str] = set()
    for row in conn.execute("SELECT scores FROM entries WHERE state='complete' ORDER BY id DESC LIMIT 200"):
        names.update(scores_of(row))
    return sorted(n for n in names if SCORE_NAME.match(n))


def entry(conn: sqlite3.Connection | None, entry_id: int) -> dict[str, Any] | None:
    """One complete entry with what was found to duplicate it (aliases: keys that were the same picture)."""
    if conn is None:
        return None
    row = conn.execute("SELECT * FROM entries WHERE id=? AND state='complete'", (entry_id,)).fetchone()
    if row is None:
        return None
    out = entry_dict(row)
    out["duplicates"] = [dict(r) for r in conn.execute(
        "SELECT key, reason, added_at FROM aliases WHERE entry_id=? ORDER BY added_at DESC LIMIT 50", (entry_id,))]
    return out


def entries(conn: sqlite3.Connection | None, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Several complete entries by id (search results), keyed by id."""
    if conn is None or not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT * FROM entries WHERE state='complete' AND id IN ({marks})", ids).fetchall()
    return {int(r["id"]): entry_dict(r) for r in rows}


def file_of(conn: sqlite3.Connection | None, entry_id: int) -> str | None:
    """The original's extension of a complete entry (files are named ``<id>.<ext>``), or None."""
    if conn is None:
        return None
    row = conn.execute("SELECT ext FROM entries WHERE id=? AND state='complete'", (entry_id,)).fetchone()
    return None if row is None else str(row["ext"])
