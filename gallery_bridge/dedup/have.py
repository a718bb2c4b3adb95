"""The ``have`` op: does the gallery already hold these images? Answered from hashes alone.

A client (nomad) sends ``items``: (sha256 hex of the original bytes, 64-bit
pHash hex of :func:`.fingerprint.phash64`[, 576-bit phash hex]) and gets one
answer per item:

* ``"exact"``: an entry has these very bytes (sha256);
* ``"near"``: with the 576-bit phash (:func:`.fingerprint.have_hashes`), an
  entry's phash is within ``DedupConfig.phash_threshold``: ingest's own rule,
  so nothing is dropped that ingest would not call a duplicate; without it, an
  entry's 64-bit pHash is within ``DedupConfig.have_threshold``;
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

MAX_HAVE_ITEMS = 128
"""Items in one ``have`` request (two of nomad's default batches; ~30 KB of header with 576-bit hashes)."""

ANSWERS = ("exact", "near", "new")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PHASH64 = re.compile(r"[0-9a-f]{16}")
_PHASH576 = re.compile(r"[0-9a-f]{144}")

Item = tuple[str, np.ndarray, "np.ndarray | None"]
"""(sha256 hex, 64-bit pHash as uint64[1], 576-bit phash as uint64[9] or None)."""


def _words(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


def parse_items(value: Any, max_items: int = MAX_HAVE_ITEMS) -> list[Item]:
    """``[[sha256 hex, phash64 hex(, phash576 hex)], ...]`` -> :data:`Item` s; ProtocolError when malformed.

    ``bad_header`` for anything not of that shape, ``too_large`` above
    ``max_items``. Hex is accepted in either case and compared lower-case.
    """
    if not isinstance(value, list):
        raise ProtocolError("bad_header", "have needs 'items': a list of [sha256 hex, 64-bit phash hex] pairs")
    if len(value) > max_items:
        raise ProtocolError("too_large", f"{len(value)} items in one have request, limit {max_items}")
    out: list[Item] = []
    for n, item in enumerate(value):
        if not (isinstance(item, list) and len(item) in (2, 3) and all(isinstance(x, str) for x in item)):
            raise ProtocolError("bad_header", f"have item {n} is not a [sha256 hex, phash hex(, phash576 hex)] list of strings")
        sha, ph = item[0].lower(), item[1].lower()
        if not _SHA256.fullmatch(sha):
            raise ProtocolError("bad_header", f"have item {n}: sha256 must be 64 hex digits")
        if not _PHASH64.fullmatch(ph):
            raise ProtocolError("bad_header", f"have item {n}: phash must be 16 hex digits (a 64-bit pHash)")
        full = None
        if len(item) == 3:
            if not _PHASH576.fullmatch(item[2].lower()):
                raise ProtocolError("bad_header", f"have item {n}: the third hash must be 144 hex digits (the 576-bit phash)")
            full = _words(item[2].lower())
        out.append((sha, _words(ph), full))
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


def answer(db: sqlite3.Connection, dedup: Deduplicator, items: list[Item]) -> list[str]:
    """One of :data:`ANSWERS` per item, in order."""
    exact = known_digests(db, [item[0] for item in items])
    out = ["exact"] * len(items)
    coarse_only: list[int] = []
    for i, (sha, _, full) in enumerate(items):
        if sha in exact:
            continue
        if full is None:
            coarse_only.append(i)
        else:
            out[i] = "near" if dedup.near_phash(full) else "new"
    if coarse_only:  # the 64-bit ones together: one pass over the coarse index
        hits = dedup.near64(np.concatenate([items[i][1] for i in coarse_only]))
        for i, hit in zip(coarse_only, hits):
            out[i] = "near" if hit else "new"
    return out
