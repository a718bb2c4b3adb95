"""Search the gallery by text, by a gallery entry or by an uploaded image, over the stored CLIP features.

    s = Searcher(Path("gallery/catalogue.sqlite"), Path("var/models"))
    s.by_text("a mountain lake at sunset", 20)   # [(entry id, cosine), …] best first
    s.by_entry(42, 20)                           # entry 42 itself comes first (cosine 1)
    s.by_image(jpeg_bytes, 20)

The features are what anti_sus returned for each image and nomad delivered
(``entries.features``, little-endian float32); entries without features are
not searchable. They are held in one float32 matrix, unit rows, and ranked
exactly (a matrix-vector product and ``argpartition``: 100k x 512 takes a few
milliseconds, see bench/search.py). :meth:`Searcher.refresh` reads only
entries it has not seen (by id) and drops entries deleted since.

Text goes through CLIP's text tower (:mod:`anti_sus.text`, the model
directory's ``clip_text`` and ``clip_vocab``); an uploaded image is decoded
with ingest's guards (:func:`gallery_bridge.validate.check_image`: magic
bytes, size and pixel caps) and embedded with the model directory's CLIP
visual tower through anti_sus's preprocessing, the variant the server serves
(int8 when its gate report is current, else fp32). The catalogue is opened
read-only: searching never blocks ingest.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from photocore.errors import UserError
from photocore.protocol import ProtocolError

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
MAX_QUERY_CHARS = 1000
"""Longer text cannot matter: CLIP reads 77 tokens. Refused rather than cut, so the user knows."""
Hit = tuple[int, float]


class SearchUnavailable(UserError):
    """Search cannot answer: no model directory, no text tower, no such entry; the message says why in one line."""


class BadQuery(SearchUnavailable):
    """The query itself is unusable (empty, too long, not an image)."""


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


class Searcher:
    """Exact cosine search over a catalogue's stored CLIP features; safe to share between threads."""

    def __init__(self, catalogue_path: Path, models_dir: Path | None, *, threads: int = 1) -> None:
        self.catalogue_path = Path(catalogue_path)
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.threads = threads
        if not self.catalogue_path.is_file():
            raise SearchUnavailable(f"no gallery catalogue at {self.catalogue_path}: nothing to search yet")
        try:
            self._db = sqlite3.connect(f"{self.catalogue_path.resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SearchUnavailable(f"cannot open the catalogue {self.catalogue_path}: {exc}") from None
        self._lock = threading.RLock()
        # (features [n, D] unit rows, entry ids [n]); replaced as a whole, so a search reads one consistent pair.
        self._index: tuple[np.ndarray, np.ndarray] = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        self._buf = np.zeros((0, 0), np.float32)
        self._buf_ids = np.zeros(0, np.int64)
        self._mark = 0  # every complete entry with an id <= mark has been read (indexed, or without features)
        self._read_upto_mark = 0  # how many complete entries with an id <= mark were read
        self._above: set[int] = set()  # ids read above the mark (read while a lower entry was still pending)
        self._dim: int | None = None
        self._version: int | None = None
        self._text: Any = None
        self._visual: Any = None
        self._unavailable: dict[str, str] = {}
        self.refresh()

    # ---- index -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index[1])

    @property
    def dim(self) -> int | None:
        """Dimension of the stored features (from the first entry read), None while there are none."""
        return self._dim

    def refresh(self) -> int:
        """Read entries added since the last call, drop deleted ones; returns how many are searchable."""
        with self._lock:
            try:
                # SQLite bumps data_version whenever another connection commits: nothing new costs one pragma.
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
                if version == self._version:
                    return len(self)
                self._read_new()
                self._drop_deleted()
                self._version = version
            except sqlite3.Error as exc:
                raise SearchUnavailable(f"cannot read the catalogue {self.catalogue_path}: {exc}") from None
            return len(self)

    def _read_new(self) -> None:
        db = self._db
        pending = db.execute("SELECT MIN(id) FROM entries WHERE state='pending'").fetchone()[0]
        # The (state, id) index answers this without touching entries already read.
        rows = db.execute("SELECT id, features FROM entries WHERE state='complete' AND id > ? ORDER BY id",
                          (self._mark,)).fetchall()
        fresh = [(int(i), None if b is None else bytes(b)) for i, b in rows if int(i) not in self._above]
        with_features = [(i, b) for i, b in fresh if b]
        if with_features:
            if self._dim is None:
                self._dim = len(with_features[0][1]) // 4
            ok = [(i, b) for i, b in with_features if len(b) == 4 * self._dim]
            if len(ok) < len(with_features):
                log.warning("search: %d entries skipped, their features are not %d-d (another CLIP model?)",
                            len(with_features) - len(ok), self._dim)
            if ok:
                feats = np.frombuffer(b"".join(b for _, b in ok), dtype="<f4").reshape(len(ok), self._dim)
                self._append(np.array([i for i, _ in ok], np.int64), _unit_rows(feats.astype(np.float32)))
        self._above.update(i for i, _ in fresh)
        top = max([self._mark, *self._above])
        # An entry still pending below the newest one read may complete later: read from below it next time.
        self._mark = top if pending is None else min(top, int(pending) - 1)
        settled = {i for i in self._above if i <= self._mark}
        self._read_upto_mark += len(settled)
        self._above -= settled

    def _append(self, ids: np.ndarray, feats: np.ndarray) -> None:
        n = len(self._index[1])
        if self._buf.shape[0] < n + len(ids) or self._buf.shape[1] != feats.shape[1]:
            cap = max(1024, 2 * (n + len(ids)))
            buf, buf_ids = np.empty((cap, feats.shape[1]), np.float32), np.empty(cap, np.int64)
            if n:
                buf[:n], buf_ids[:n] = self._index
            self._buf, self._buf_ids = buf, buf_ids
        # Rows past n are written while searches may read rows [0, n): never the same memory.
        self._buf[n:n + len(ids)] = feats
        self._buf_ids[n:n + len(ids)] = ids
        self._index = (self._buf[:n + len(ids)], self._buf_ids[:n + len(ids)])

    def _drop_deleted(self) -> None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM entries WHERE state='complete' AND id <= ?",
                                    (self._mark,)).fetchone()
        if int(count) >= self._read_upto_mark:
            return
        # Fewer in the catalogue than read: entries were removed (labelled bad). Keep only those still there.
        alive = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM entries WHERE state='complete'")),
                            np.int64)
        feats, ids = self._index
        keep = np.isin(ids, alive)
        self._read_upto_mark = int((alive <= self._mark).sum())
        self._above &= set(alive[alive > self._mark].tolist())
        kept_f, kept_i = np.ascontiguousarray(feats[keep]), np.ascontiguousarray(ids[keep])
        self._buf, self._buf_ids = kept_f, kept_i  # a fresh buffer: searches holding the old one are unaffected
        self._index = (kept_f, kept_i)
        log.info("search: %d removed entries dropped from the index", int((~keep).sum()))

    def rank(self, query: np.ndarray, limit: int) -> list[Hit]:
        """The ``limit`` entries most similar to the unit vector ``query``, best first."""
        feats, ids = self._index
        limit = max(1, min(int(limit), MAX_LIMIT))
        if not len(ids):
            return []
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != feats.shape[1]:
            raise SearchUnavailable(f"the query has {q.shape[0]}-d features but the gallery's stored features are "
                                    f"{feats.shape[1]}-d: they come from another CLIP model")
        scores = feats @ (q / max(float(np.linalg.norm(q)), 1e-12))
        if limit < len(scores):
            top = np.argpartition(-scores, limit - 1)[:limit]
            top = top[np.argsort(-scores[top], kind="stable")]
        else:
            top = np.argsort(-scores, kind="stable")
        return [(int(ids[i]), float(scores[i])) for i in top]

    # ---- queries ---------------------------------------------------------------
    def by_entry(self, entry_id: int, limit: int) -> list[Hit]:
        """Entries like gallery entry ``entry_id`` (itself first), by its stored features."""
        with self._lock:  # one connection, shared by the threads of the web app's server
            row = self._db.execute("SELECT features FROM entries WHERE id=? AND state='complete'",
                                   (int(entry_id),)).fetchone()
        if row is None:
            raise SearchUnavailable(f"gallery entry {entry_id} does not exist")
        if row[0] is None:
            raise SearchUnavailable(f"gallery entry {entry_id} has no stored CLIP features (delivered without them)")
        return self.rank(np.frombuffer(bytes(row[0]), dtype="<f4"), limit)

    def text_available(self) -> bool:
        """Whether :meth:`by_text` can answer (a model directory with a working text tower)."""
        try:
            self._text_encoder()
        except SearchUnavailable:
            return False
        return True

    def by_text(self, q: str, limit: int) -> list[Hit]:
        """Entries whose images CLIP finds closest to the text ``q``."""
        if not isinstance(q, str) or not q.strip():
            raise BadQuery("the text query is empty")
        if len(q) > MAX_QUERY_CHARS:
            raise BadQuery(f"the text query is {len(q)} characters, limit {MAX_QUERY_CHARS}")
        return self.rank(self._text_encoder().encode([q])[0], limit)

    def by_image(self, data: bytes, limit: int) -> list[Hit]:
        """Entries like the image file ``data`` (JPEG, PNG or WebP), embedded with the CLIP visual tower."""
        from photocore.wireimage import stack_wire
        from PIL import ImageOps

        from .validate import Limits, check_image

        try:
            checked = check_image(bytes(data), Limits())
            # Upright, as nomad sends images to anti_sus (its decode applies EXIF orientation).
            image = ImageOps.exif_transpose(checked.image) or checked.image
            wire = stack_wire([image])
        except ProtocolError as exc:
            raise BadQuery(f"not a usable image: {exc}") from None
        except (OSError, ValueError) as exc:
            raise BadQuery(f"not a usable image: {exc}") from None
        stage = self._visual_stage()
        return self.rank(stage.run(stage.preprocess(wire))[0], limit)

    # ---- models ----------------------------------------------------------------
    def _models(self, what: str) -> Path:
        if self.models_dir is None:
            raise SearchUnavailable(f"{what} needs a model directory (none configured)")
        return self.models_dir

    def _load(self, key: str, loader: Any) -> Any:
        """Load a model once; a failure is remembered (one line) so every query does not retry it."""
        with self._lock:
            if key in self._unavailable:
                raise SearchUnavailable(self._unavailable[key])
            cached = getattr(self, key)
            if cached is None:
                try:
                    cached = loader()
                except Exception as exc:  # manifest problems, unreadable files, ONNX Runtime's own error types
                    reason = " ".join(str(exc).split())  # one line, even for multi-line manifest problems
                    self._unavailable[key] = f"search is unavailable: {reason}"
                    raise SearchUnavailable(self._unavailable[key]) from None
                setattr(self, key, cached)
            return cached

    def _text_encoder(self) -> Any:
        def load() -> Any:
            from anti_sus.text.encoder import TextEncoder

            return TextEncoder.from_dir(self._models("text search"), threads=self.threads)

        return self._load("_text", load)

    def _visual_stage(self) -> Any:
        def load() -> Any:
            from anti_sus.modeldir import int8_unusable, open_model_dir
            from anti_sus.stages.clip import ClipStage

            arts = open_model_dir(self._models("search by image"), required=("clip",))
            name = "clip_int8" if "clip_int8" in arts and not int8_unusable(arts) else "clip"
            # A budget-free stage: one image at a time.
            return ClipStage.from_entry(arts[name].path, arts[name].entry, threads=self.threads, memory_budget=None)

        return self._load("_visual", load)

    def close(self) -> None:
        self._db.close()
