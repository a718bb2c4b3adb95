"""The ``have`` op: does the gallery already hold these images? Answered from hashes alone.

A client (nomad) sends ``items``: pairs of (sha256 hex of the original bytes,
64-bit pHash hex of :func:`.fingerprint.phash64`) and gets one answer per item:

* ``"exact"``: an entry has these very bytes (sha256);
* ``"near"``: an entry's 64-bit pHash is within ``DedupConfig.have_threshold``;
* ``"new"``: neither.

Nothing is decoded and nothing is written: one SQL lookup for the digests and
one Hamming pass over the in-memory coarse index for the remaining items
together: milliseconds for a batch of 64 in a gallery of thousands, a few
tenths of a second at a million entries, against seconds of CLIP it saves.
"""
from __future__ import annotations

import re
import sqlite3
from typing import Any

import numpy as np

from photocore.protocol import ProtocolError

from .policy import Deduplicator

MAX_HAVE_ITEMS = 256
"""Items in one ``have`` request (a few batches of nomad's 64; ~25 KB of header)."""

ANSWERS = ("exact", "near", "new")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PHASH64 = re.compile(r"[0-9a-f]{16}")


def parse_items(value: Any, max_items: int = MAX_HAVE_ITEMS) -> list[tuple[str, np.ndarray]]:
    """``[[sha256 hex, phash64 hex], ...]`` -> (digest, uint64[1]) pairs; ProtocolError when malformed.

    ``bad_header`` for anything not of that shape, ``too_large`` above
    ``max_items``. Hex is accepted in either case and compared lower-case.
    """
    if not isinstance(value, list):
        raise ProtocolError("bad_header", "have needs 'items': a list of [sha256 hex, 64-bit phash hex] pairs")
    if len(value) > max_items:
        raise ProtocolError("too_large", f"{len(value)} items in one have request, limit {max_items}")
    out: list[tuple[str, np.ndarray]] = []
    for n, item in enumerate(value):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ProtocolError("bad_header", f"have item {n} is not a [sha256 hex, phash hex] pair of strings")
        sha, ph = item[0].lower(), item[1].lower()
        if not _SHA256.fullmatch(sha):
            raise ProtocolError("bad_header", f"have item {n}: sha256 must be 64 hex digits")
        if not _PHASH64.fullmatch(ph):
            raise ProtocolError("bad_header", f"have item {n}: phash must be 16 hex digits (a 64-bit pHash)")
        out.append((sha, np.frombuffer(bytes.fromhex(ph), dtype=">u8").astype(np.uint64)))
    return out


def known_digests(db: sqlite3.Connection, digests: list[str]) -> set[str]:
    """The digests among ``digests`` that a complete catalogue entry has (one query per 500)."""
    found: set[str] = set()
    unique = sorted(set(digests))
    for start in range(0, len(unique), 500):  # well under SQLite's bound-parameter limit
        chunk = unique[start:start + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"SELECT sha256 FROM entries WHERE state='complete' AND sha256 IN ({marks})", chunk)
        found.update(row[0] for row in rows)
    return found


def answer(db: sqlite3.Connection, dedup: Deduplicator, items: list[tuple[str, np.ndarray]]) -> list[str]:
    """One of :data:`ANSWERS` per item, in order."""
    exact = known_digests(db, [sha for sha, _ in items])
    rest = [i for i, (sha, _) in enumerate(items) if sha not in exact]
    near = dedup.near64(np.concatenate([items[i][1] for i in rest])) if rest else np.zeros(0, dtype=bool)
    out = ["exact"] * len(items)
    for i, hit in zip(rest, near):
        out[i] = "near" if hit else "new"
    return out
