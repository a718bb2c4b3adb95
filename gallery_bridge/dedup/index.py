"""The in-memory indexes dedup searches: packed binary hashes (Hamming) and CLIP features (cosine).

:class:`HashIndex` keeps hashes as packed uint64 words and compares a query
against all of them with vectorised XOR + ``np.bitwise_count``: no Python loop
per entry. :class:`FeatureIndex` keeps L2-normalised vectors and answers with
one matrix-vector product.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


class HashIndex:
    """Packed binary hashes with ids; Hamming-distance search over all of them at once.

    Stored word-major (``words x capacity``): each 64-bit word of every hash is
    one contiguous array, so a query is ``words`` passes of XOR + popcount over
    contiguous memory, done in cache-sized blocks; a query reads only the
    first words of every hash (see ``PREFIX_WORDS``). bench/gallery.py
    measures it at 10k, 100k and 1M hashes.
    """

    BLOCK = 1 << 15

    def __init__(self, words: int, capacity: int = 1024) -> None:
        self.words = words
        self._cols = np.zeros((words, capacity), dtype=np.uint64)
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _reserve(self, need: int) -> None:
        if need <= self._ids.shape[0]:
            return
        cap = max(1024, need, 2 * self._ids.shape[0])
        cols = np.zeros((self.words, cap), dtype=np.uint64)
        cols[:, : self._n] = self._cols[:, : self._n]
        ids = np.zeros(cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._cols, self._ids = cols, ids

    def add(self, entry_id: int, words: np.ndarray) -> None:
        """Append one hash (amortised O(1): capacity doubles)."""
        self._reserve(self._n + 1)
        self._cols[:, self._n] = np.asarray(words, dtype=np.uint64).reshape(self.words)
        self._ids[self._n] = entry_id
        self._n += 1

    def add_many(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        """Bulk load (startup, benchmarks): ``hashes`` is (n, words)."""
        ids = np.asarray(ids, dtype=np.int64)
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(len(ids), self.words)
        need = self._n + len(ids)
        self._reserve(need)
        self._cols[:, self._n:need] = hashes.T
        self._ids[self._n:need] = ids
        self._n = need

    def remove(self, entry_id: int) -> None:
        """Drop every hash of an entry (rare: rollback of a failed write)."""
        keep = np.flatnonzero(self._ids[: self._n] != entry_id)
        kept = len(keep)
        self._cols[:, :kept] = self._cols[:, keep]
        self._ids[:kept] = self._ids[keep]
        self._n = kept

    PREFIX_WORDS = 3
    """Words scanned for every entry before the rest: 192 bits of unrelated hashes sit
    ~96 +- 7 apart, so a prefix already over a threshold of 64 rules an entry out
    and the remaining words are read for a handful of entries only."""

    def _scan(self, qs: list[np.ndarray], words: int) -> np.ndarray:
        """Min over queries of the distance on the first ``words`` words, for every entry."""
        n, block = self._n, self.BLOCK
        out = np.empty(n, dtype=np.uint16)
        xor = np.empty(block, dtype=np.uint64)
        cnt = np.empty(block, dtype=np.uint8)
        acc = np.empty((len(qs), block), dtype=np.uint16)
        # Block by block so that the temporaries stay in cache; no Python loop per entry.
        for start in range(0, n, block):
            stop = min(n, start + block)
            m = stop - start
            acc[:, :m] = 0
            for w in range(words):
                col = self._cols[w, start:stop]
                for k, q in enumerate(qs):
                    np.bitwise_xor(col, q[w], out=xor[:m])
                    np.bitwise_count(xor[:m], out=cnt[:m])
                    np.add(acc[k, :m], cnt[:m], out=acc[k, :m])
            np.min(acc[:, :m], axis=0, out=out[start:stop])
        return out

    def distances(self, *queries: np.ndarray) -> np.ndarray:
        """Hamming distance from the nearest of ``queries`` to every stored hash (uint16[n]).

        Several queries (an image and its mirror) share one pass over memory:
        at a million hashes the scan is bound by memory bandwidth, not popcount.
        """
        qs = [np.asarray(q, dtype=np.uint64).reshape(self.words) for q in queries]
        return self._scan(qs, self.words)

    def search(self, queries: Iterable[np.ndarray], max_distance: int, limit: int = 16) -> list[tuple[int, int]]:
        """(entry_id, distance) of hashes within ``max_distance`` of any query, nearest first."""
        qs = [np.asarray(q, dtype=np.uint64).reshape(self.words) for q in queries]
        if self._n == 0 or not qs:
            return []
        prefix = min(self.PREFIX_WORDS, self.words)
        # A prefix distance is a lower bound of the full one (for each query,
        # hence for their minimum): entries over the threshold are out for sure.
        bound = self._scan(qs, prefix)
        cand = np.flatnonzero(bound <= max_distance)
        if prefix < self.words and len(cand):
            cols = self._cols[:, cand]  # only the survivors' words
            full = np.stack([np.bitwise_count(cols ^ q[:, None]).sum(axis=0, dtype=np.uint16) for q in qs]).min(axis=0)
        else:
            full = bound[cand]
        keep = full <= max_distance
        cand, full = cand[keep], full[keep]
        if len(cand) > limit:
            part = np.argpartition(full, limit)[:limit]
            cand, full = cand[part], full[part]
        order = np.argsort(full, kind="stable")
        return [(int(self._ids[cand[i]]), int(full[i])) for i in order]

    def any_within(self, queries: np.ndarray, max_distance: int) -> np.ndarray:
        """For each of ``queries`` (k, words): is any stored hash within ``max_distance``? (bool[k]).

        Many queries, one pass over memory, block by block: the ``have`` op asks
        about a whole batch at once. Measured at a million 64-bit hashes: ~4 ms
        per query on a busy 2-core machine, half the cost of one :meth:`search` each.
        """
        qs = np.asarray(queries, dtype=np.uint64).reshape(-1, self.words)
        found = np.zeros(len(qs), dtype=bool)
        block = max(1024, self.BLOCK // max(1, len(qs)))  # keeps the (k, block) temporaries ~ cache-sized
        for start in range(0, self._n, block):
            stop = min(self._n, start + block)
            dist = np.zeros((len(qs), stop - start), dtype=np.uint16)
            for w in range(self.words):
                dist += np.bitwise_count(self._cols[w, start:stop][None, :] ^ qs[:, w:w + 1])
            found |= (dist <= max_distance).any(axis=1)
        return found

    def hash_of(self, entry_id: int) -> np.ndarray | None:
        """The stored hash of an entry (first match), for explaining a hit."""
        pos = np.flatnonzero(self._ids[: self._n] == entry_id)
        return self._cols[:, pos[0]].copy() if len(pos) else None


class FeatureIndex:
    """L2-normalised CLIP features; cosine similarity by one matrix-vector product."""

    def __init__(self) -> None:
        self.dim: int | None = None
        self._feats = np.zeros((0, 0), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, entry_id: int, features: np.ndarray) -> bool:
        """Store one vector; False (ignored) when its dimension differs from the index's."""
        vec = normalise(features)
        if self.dim is None:
            self.dim = len(vec)
            self._feats = np.zeros((1024, self.dim), dtype=np.float32)
            self._ids = np.zeros(1024, dtype=np.int64)
        if len(vec) != self.dim:
            return False
        if self._n == len(self._ids):
            self._feats = np.resize(self._feats, (2 * self._n, self.dim))
            self._ids = np.resize(self._ids, 2 * self._n)
        self._feats[self._n] = vec
        self._ids[self._n] = entry_id
        self._n += 1
        return True

    def remove(self, entry_id: int) -> None:
        keep = self._ids[: self._n] != entry_id
        kept = int(keep.sum())
        self._feats[:kept] = self._feats[: self._n][keep]
        self._ids[:kept] = self._ids[: self._n][keep]
        self._n = kept

    def best(self, features: np.ndarray) -> tuple[int, float] | None:
        """(entry_id, cosine) of the most similar stored vector, or None."""
        if self._n == 0 or self.dim != len(features):
            return None
        sims = self._feats[: self._n] @ normalise(features)
        i = int(np.argmax(sims))
        return int(self._ids[i]), float(sims[i])


def normalise(features: np.ndarray) -> np.ndarray:
    """float32 unit vector (zero vectors stay zero)."""
    vec = np.asarray(features, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec
