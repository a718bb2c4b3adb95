"""``gallery-bridge labels export DIR``: the labels given in the gallery as folders and arrays for anti_sus.

``anti-sus tune --good DIR/good --bad DIR/bad`` scores the folders;
``anti-sus learn --labels DIR/labels.npz`` fits on the stored CLIP features.
Read-only on the catalogue, so it runs next to a live ``serve``. What a label
is and where its image is kept: :mod:`gallery_bridge.labels`.
"""
from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
from pathlib import Path

import numpy as np

from photocore.errors import UserError

from .labels import DIR_NAME, parse_item
from .reviews import DIR_NAME as REVIEW_DIR

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def export_name(key: str, ext: str) -> str:
    """A file name from a key: its safe characters, then a short hash so that two keys never collide."""
    stem = _UNSAFE.sub("_", key).strip("._")[:80] or "item"
    return f"{stem}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:10]}.{ext}"


def _source(gallery: Path, row: sqlite3.Row, db: sqlite3.Connection) -> Path | None:
    """Where the labelled image's bytes are now: the kept copy, the gallery original, or the review file."""
    if row["copy"]:
        p = gallery / DIR_NAME / row["copy"]
        if p.is_file():
            return p
    kind, ident = parse_item(row["item"])
    if kind == "g":
        e = db.execute("SELECT ext FROM entries WHERE id=? AND state='complete'", (ident,)).fetchone()
        if e is not None:
            p = gallery / "images" / f"{ident}.{e['ext']}"
            return p if p.is_file() else None
        return None
    r = db.execute("SELECT file FROM reviews WHERE id=?", (ident,)).fetchone()
    if r is not None:
        p = gallery / REVIEW_DIR / r["file"]
        return p if p.is_file() else None
    return None


def export(catalogue_path: Path, out: Path) -> dict[str, int]:
    """Write ``out/good/``, ``out/bad/`` (images named by key) and ``out/labels.npz``; returns counts.

    ``labels.npz`` (no pickled objects: ``np.load(..., allow_pickle=False)``
    reads it) holds ``features`` float32[n, D], ``labels`` int8[n] (1 good,
    0 bad), ``keys`` (fixed-width unicode), ``items`` and ``files`` (the
    exported image's path relative to ``out``, empty when the image is gone).
    Rows are the labels whose features have the most common dimension D;
    labels without features still get their image file but no row. Items that
    share a key (a review item and the entry its good label made) count once,
    with the label given last.
    """
    from .catalogue import Catalogue

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: export into a new one")
    try:
        cat = Catalogue(Path(catalogue_path), read_only=True)
    except FileNotFoundError:
        raise UserError(f"no gallery catalogue at {catalogue_path}") from None
    gallery = Path(catalogue_path).parent
    try:
        # One row per key: a review item labelled good and the gallery entry it became share
        # their key (and image); whichever of them was labelled last speaks for the image.
        latest: dict[str, sqlite3.Row] = {}
        for row in cat.db.execute("SELECT * FROM labels ORDER BY seq"):
            latest.pop(row["key"], None)
            latest[row["key"]] = row
        rows = list(latest.values())
        (out / "good").mkdir(parents=True)
        (out / "bad").mkdir()
        counts = {"good": 0, "bad": 0, "missing": 0, "without_features": 0}
        feats: list[np.ndarray] = []
        meta: list[tuple[str, str, int, str]] = []
        for row in rows:
            src = _source(gallery, row, cat.db)
            rel = ""
            if src is None:
                counts["missing"] += 1
                log.warning("%s (%s): its image is no longer kept", row["item"], row["key"])
            else:
                rel = f"{row['label']}/{export_name(row['key'], row['ext'])}"
                (out / rel).write_bytes(src.read_bytes())
                counts[row["label"]] += 1
            if row["features"] is None:
                counts["without_features"] += 1
                continue
            feats.append(np.frombuffer(row["features"], dtype="<f4").astype(np.float32))
            meta.append((row["key"], row["item"], 1 if row["label"] == "good" else 0, rel))
    finally:
        cat.close()
    dims = [len(f) for f in feats]
    dim = max(set(dims), key=dims.count) if dims else 0
    keep = [i for i, d in enumerate(dims) if d == dim]
    counts["other_dimension"] = len(feats) - len(keep)
    features = np.stack([feats[i] for i in keep]) if keep else np.zeros((0, dim), np.float32)

    def text(values: list[str]) -> np.ndarray:
        # Fixed-width unicode ('<U…'), never an object array: loadable without pickle.
        return np.array(values, dtype=f"<U{max([1, *map(len, values)])}")

    np.savez(out / "labels.npz", features=features.astype(np.float32),
             labels=np.array([meta[i][2] for i in keep], dtype=np.int8),
             keys=text([meta[i][0] for i in keep]), items=text([meta[i][1] for i in keep]),
             files=text([meta[i][3] for i in keep]))
    counts["rows"] = len(keep)
    return counts
