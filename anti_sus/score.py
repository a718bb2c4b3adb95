"""``anti-sus score``: one row per image file (path, GMM score, P(watermark), verdict).

Images are decoded and squashed to the wire format with the shared
preprocessing contract, then scored either in-process (a ``Pipeline``) or
through a running server (a ``FilterClient``): the same numbers either way.
An unreadable file gets a row with its error instead of stopping the run.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .pipeline import Stages, Task, evaluate
from .preprocess import load_image, to_wire

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Row:
    path: str
    gmm: float | None
    watermark: float | None
    verdict: str
    error: str = ""


def expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, directories walked recursively for image files, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def _chunks(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


Scorer = Callable[[np.ndarray], list[tuple[float, float | None, str]]]


def local_scorer(stages: Stages, *, gmm_threshold: float | None = None, watermark_threshold: float | None = None,
                 watermark_all: bool = False) -> Scorer:
    """Score in this process through the same ``evaluate`` the server runs."""
    def run(batch: np.ndarray) -> list[tuple[float, float | None, str]]:
        task = Task(batch, stages.gmm_threshold if gmm_threshold is None else gmm_threshold,
                    stages.watermark_threshold if watermark_threshold is None else watermark_threshold)
        oc = evaluate(stages, [task], watermark_all=watermark_all)[0]
        return [(float(g), None if math.isnan(w) else float(w), v) for g, w, v in zip(oc.gmm, oc.watermark, oc.verdicts)]
    return run


def remote_scorer(client: Any, *, gmm_threshold: float | None = None, watermark_threshold: float | None = None,
                  probe_threshold: float | None = None) -> Scorer:
    """Score through a running server."""
    def run(batch: np.ndarray) -> list[tuple[float, float | None, str]]:
        # The probe option only when given: a server older than the probe stage refuses it.
        extra = {} if probe_threshold is None else {"probe_threshold": probe_threshold}
        res = client.filter(batch, gmm_threshold=gmm_threshold, watermark_threshold=watermark_threshold, **extra)
        return [(r.gmm, r.watermark, r.verdict) for r in res.results]
    return run


def score_files(files: Sequence[Path], scorer: Scorer, batch_size: int = 32, progress: bool = False) -> list[Row]:
    """Rows in the order of ``files``."""
    from tqdm import tqdm

    rows: list[Row] = []
    bar = tqdm(total=len(files), unit="img", disable=not progress)
    for chunk in _chunks(files, batch_size):
        arrays, ok_paths = [], []
        for f in chunk:
            try:
                arrays.append(to_wire(load_image(str(f))))
                ok_paths.append(f)
            except Exception as exc:  # one bad file must not stop the others
                rows.append(Row(str(f), None, None, "error", f"{type(exc).__name__}: {exc}"))
        if arrays:
            for f, (g, w, v) in zip(ok_paths, scorer(np.stack(arrays))):
                rows.append(Row(str(f), g, w, v))
        bar.update(len(chunk))
    bar.close()
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order.get(r.path, 0))
    return rows


def write_rows(rows: Sequence[Row], out: IO[str], fmt: str = "csv") -> None:
    """CSV (header row first) or a JSON array."""
    if fmt == "json":
        json.dump([asdict(r) for r in rows], out, indent=1)
        out.write("\n")
        return
    w = csv.writer(out)
    w.writerow(["path", "gmm", "watermark", "verdict", "error"])
    for r in rows:
        w.writerow([r.path, "" if r.gmm is None else f"{r.gmm:.6f}", "" if r.watermark is None else f"{r.watermark:.6f}", r.verdict, r.error])
