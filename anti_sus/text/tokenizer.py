"""CLIP's byte-level BPE tokenizer in numpy, ftfy and regex: the token ids open_clip gives, without torch.

The behaviour (checked id for id against ``open_clip.tokenize`` by
tests/test_text_tokenizer.py):

1. clean: ``ftfy.fix_text`` (mojibake, odd quotes), HTML entities unescaped
   twice, whitespace runs collapsed to one space, stripped, lower-cased;
2. split with CLIP's pre-tokenizer pattern (the two special tokens, English
   contractions, letter runs, single digits, runs of other non-space symbols);
3. each piece's UTF-8 bytes mapped to printable characters (the GPT-2 byte
   table), the last one marked ``</w>``, then merged pair by pair in the order
   of the vocabulary file's merge list (lowest rank first);
4. ``<start_of_text>`` + ids + ``<end_of_text>``, zero-padded to the context
   length (77); a longer sequence is cut and its last id replaced by
   ``<end_of_text>``.

The vocabulary file is open_clip's format: gzip text, one header line, then one
merge (two space-separated symbols) per line; only the first
:data:`MAX_MERGES` merges are used, as CLIP does. Ids: 256 byte symbols, the
same 256 with ``</w>``, one per merge, then the two special tokens.
"""
from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

CONTEXT_LENGTH = 77
MAX_MERGES = 49152 - 256 - 2
"""Merges CLIP's vocabulary uses (the file holds more): 48,894, for 49,408 ids in all."""
SOT, EOT = "<start_of_text>", "<end_of_text>"
END_OF_WORD = "</w>"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_VOCAB_BYTES = 8 * 1024 * 1024
"""Cap on the gzip file and on its decompressed text (the real one is 1.4 MB / 3.3 MB)."""
CACHE_SIZE = 65536
"""Words whose merges are remembered; queries repeat words, a bounded cache keeps memory flat."""


class VocabError(ValueError):
    """The vocabulary file is missing, too big or not in CLIP's merge-list format."""


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """Printable stand-in for each byte value 0..255 (printable Latin-1 bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table: dict[int, str] = {b: chr(b) for b in keep}
    # Bytes that are spaces or control characters get code points from 256 up, in byte order.
    extra = (b for b in range(256) if b not in kept)
    for i, b in enumerate(extra):
        table[b] = chr(256 + i)
    return tuple(table[b] for b in range(256))


def base_symbol_order() -> list[str]:
    """The first 256 ids' symbols: the byte table in the order printable-first, then the remapped bytes."""
    table = byte_symbols()
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    return [table[b] for b in keep] + [table[b] for b in range(256) if b not in kept]


def read_merges(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The merge list of a vocabulary file (at most :data:`MAX_MERGES`), checked line by line."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_VOCAB_BYTES:
            raise VocabError(f"{p} is {p.stat().st_size} bytes, more than a CLIP vocabulary ({MAX_VOCAB_BYTES})")
        with gzip.open(p, "rb") as f:
            raw = f.read(MAX_VOCAB_BYTES + 1)
    except (OSError, EOFError) as exc:
        raise VocabError(f"cannot read the BPE vocabulary {p}: {exc}") from None
    if len(raw) > MAX_VOCAB_BYTES:
        raise VocabError(f"{p} decompresses to more than {MAX_VOCAB_BYTES} bytes")
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise VocabError(f"{p} is not UTF-8: {exc}") from None
    body = lines[1:1 + MAX_MERGES]
    if body and body[-1] == "":  # a file ending in a newline, shorter than the limit
        body = body[:-1]
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise VocabError(f"{p} line {n}: expected two symbols, got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise VocabError(f"{p} holds no merges")
    return merges


# CLIP's pre-tokenizer: the special tokens, contractions, letter runs, one digit, other symbol runs.
_PIECES = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)


def clean(text: str) -> str:
    """ftfy, HTML entities unescaped twice, whitespace collapsed, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def pre_tokenize(text: str) -> list[str]:
    """``text`` cleaned and split into CLIP's pieces (before byte symbols and merges)."""
    return _PIECES.findall(clean(text))


class Tokenizer:
    """Text -> CLIP token ids, from a vocabulary file in open_clip's format."""

    def __init__(self, vocab_path: str | os.PathLike[str], context_length: int = CONTEXT_LENGTH) -> None:
        if context_length < 2:
            raise ValueError(f"context length {context_length} leaves no room for the two special tokens")
        merges = read_merges(vocab_path)
        base = base_symbol_order()
        symbols = base + [s + END_OF_WORD for s in base] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids: dict[str, int] = {s: i for i, s in enumerate(symbols)}
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(symbols)
        self.sot_id, self.eot_id = self.ids[SOT], self.ids[EOT]
        self.context_length = context_length
        self._bytes = byte_symbols()
        self._cache: dict[str, list[int]] = {}

    def _merge(self, piece: str) -> list[int]:
        """Ids of one pre-tokenised piece (already in byte symbols): repeatedly merge its best-ranked pair."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [*piece[:-1], piece[-1] + END_OF_WORD]
        while len(word) > 1:
            best, best_rank = None, len(self.ranks)
            for pair in zip(word, word[1:]):
                r = self.ranks.get(pair)
                if r is not None and r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                # Left to right, non-overlapping: "a a a" with merge "a a" gives "aa a".
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.ids[s] for s in word]
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without the special tokens around it and without truncation."""
        out: list[int] = []
        for piece in pre_tokenize(text):
            if piece in (SOT, EOT):  # open_clip maps the literal special tokens to their ids
                out.append(self.ids[piece])
                continue
            out.extend(self._merge("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return out

    def __call__(self, texts: str | Iterable[str]) -> np.ndarray:
        """int64[N, context_length]: SOT + ids + EOT, zero-padded; too long ones cut, ending in EOT."""
        batch: Sequence[str] = [texts] if isinstance(texts, str) else list(texts)
        result = np.zeros((len(batch), self.context_length), dtype=np.int64)
        for row, text in enumerate(batch):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot_id
            result[row, :len(ids)] = ids
        return result
