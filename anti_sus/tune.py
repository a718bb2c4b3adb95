"""``anti-sus tune``: choose thresholds from labelled folders.

GMM: ``--good`` images should be kept, ``--bad`` ones dropped; an image is kept
when its log-likelihood is >= the threshold. Watermark: ``--watermarked`` images
should be flagged, ``--clean`` ones not; flagged when P(watermark) >= threshold.
Prompt check ``--prompt NAME``: ``--flagged`` images should be rejected by it,
``--unflagged`` ones not; rejected when P(reject) >= threshold.
For each, precision/recall/F1 at candidate thresholds (scikit-learn), the
suggested threshold (best F1, or the target precision/recall asked for) and a
histogram PNG of both sets with the threshold lines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class Choice:
    """A threshold and its precision, recall and F1 on the labelled sets."""

    threshold: float
    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass
class StageReport:
    name: str
    positive: str
    negative: str
    pos_scores: np.ndarray
    neg_scores: np.ndarray
    table: list[Choice]
    suggested: Choice | None
    current: float | None
    rule: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def stats(x: np.ndarray) -> dict[str, float]:
            if len(x) == 0:
                return {"n": 0}
            q = np.percentile(x, [5, 25, 50, 75, 95])
            return {"n": int(len(x)), "mean": float(x.mean()), "p5": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p95": q[4]}
        return {"stage": self.name, "rule": self.rule, "current": self.current,
                "suggested": None if self.suggested is None else self.suggested.as_dict(),
                self.positive: stats(self.pos_scores), self.negative: stats(self.neg_scores),
                "table": [c.as_dict() for c in self.table], "notes": self.notes}


def at(pos: np.ndarray, neg: np.ndarray, t: float) -> Choice:
    """Precision/recall/F1 of "score >= t means positive"."""
    tp = float((pos >= t).sum())
    fp = float((neg >= t).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / len(pos) if len(pos) else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return Choice(float(t), p, r, f1)


def suggest(pos: np.ndarray, neg: np.ndarray, *, target_precision: float | None = None,
            target_recall: float | None = None) -> tuple[Choice | None, str]:
    """The threshold to use and why: best F1, or the best recall at a target precision, or vice versa."""
    from sklearn.metrics import precision_recall_curve

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    # A target on one measure: the best of the other among the thresholds that reach it.
    target = (("precision", target_precision, precision, "recall", recall) if target_precision is not None else
              ("recall", target_recall, recall, "precision", precision) if target_recall is not None else None)
    if target is not None:
        name, goal, held, other_name, other = target
        ok = np.flatnonzero(held >= goal)
        if not len(ok):
            return None, f"no threshold reaches {name} {goal}"
        i = ok[np.argmax(other[ok])]
        why = f"highest {other_name} with {name} >= {goal}"
    else:
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        i = int(np.argmax(f1))
        why = "best F1"
    return at(pos, neg, float(thresholds[i])), why


def report(name: str, positive: str, negative: str, pos: Sequence[float], neg: Sequence[float], *, current: float | None,
           target_precision: float | None = None, target_recall: float | None = None, candidates: int = 9) -> StageReport:
    """Everything ``tune`` prints and plots for one stage."""
    p = np.asarray(pos, dtype=np.float64)
    n = np.asarray(neg, dtype=np.float64)
    if not len(p) or not len(n):
        raise ValueError(f"{name}: need images in both the {positive} and the {negative} set")
    chosen, why = suggest(p, n, target_precision=target_precision, target_recall=target_recall)
    grid = sorted(set(np.quantile(np.r_[p, n], np.linspace(0.1, 0.9, candidates)).round(6).tolist()))
    extra = [c for c in (current, None if chosen is None else chosen.threshold) if c is not None]
    table = [at(p, n, t) for t in sorted(set(grid + extra))]
    rep = StageReport(name, positive, negative, p, n, table, chosen, current, why)
    if chosen is None:
        rep.notes.append(why)
    return rep


def plot(reports: Sequence[StageReport], out: str | Path) -> Path:
    """Histograms of both sets per stage with the current and suggested thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(8, 3.6 * len(reports)), squeeze=False)
    for ax, rep in zip(axes[:, 0], reports):
        both = np.r_[rep.pos_scores, rep.neg_scores]
        bins = np.linspace(both.min(), both.max(), 40) if both.max() > both.min() else 10
        ax.hist(rep.pos_scores, bins=bins, alpha=0.6, label=f"{rep.positive} (n={len(rep.pos_scores)})")
        ax.hist(rep.neg_scores, bins=bins, alpha=0.6, label=f"{rep.negative} (n={len(rep.neg_scores)})")
        if rep.current is not None:
            ax.axvline(rep.current, color="k", linestyle="--", label=f"current {rep.current:.4g}")
        if rep.suggested is not None:
            ax.axvline(rep.suggested.threshold, color="r", label=f"suggested {rep.suggested.threshold:.4g} ({rep.rule})")
        ax.set_title(f"{rep.name} score")
        ax.set_xlabel("GMM log-likelihood" if rep.name == "gmm" else
                      "P(reject)" if rep.name.startswith("prompt:") else "P(watermark)")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_report(rep: StageReport) -> str:
    """Human-readable lines for one stage."""
    lines = [f"== {rep.name}: {rep.positive} n={len(rep.pos_scores)}, {rep.negative} n={len(rep.neg_scores)}",
             f"   {rep.positive}: median {np.median(rep.pos_scores):.4g}; {rep.negative}: median {np.median(rep.neg_scores):.4g}",
             f"   {'threshold':>12} {'precision':>9} {'recall':>7} {'F1':>6}"]
    for c in rep.table:
        mark = " <- suggested" if rep.suggested is not None and c.threshold == rep.suggested.threshold else ""
        mark += " <- current" if rep.current is not None and c.threshold == rep.current else ""
        lines.append(f"   {c.threshold:>12.5g} {c.precision:>9.3f} {c.recall:>7.3f} {c.f1:>6.3f}{mark}")
    if rep.suggested is not None:
        lines.append(f"   suggested threshold: {rep.suggested.threshold:.6g} ({rep.rule})")
    lines += [f"   note: {n}" for n in rep.notes]
    return "\n".join(lines)


def prompt_scores(pipeline: Any, files: Sequence[Path], check: str, batch_size: int = 32) -> tuple[list[float], list[str]]:
    """(P(reject) of prompt check ``check`` per readable image, errors of unreadable ones), through the pipeline's CLIP."""
    from .preprocess import load_image, to_wire

    scores: list[float] = []
    errors: list[str] = []
    for i in range(0, len(files), batch_size):
        arrays = []
        for f in files[i : i + batch_size]:
            try:
                arrays.append(to_wire(load_image(str(f))))
            except Exception as exc:  # one bad file must not stop the others
                errors.append(f"{f}: {type(exc).__name__}: {exc}")
        if arrays:
            feats = pipeline.embed(pipeline.clip_input(np.stack(arrays)))
            scores += pipeline.prompt_checks.scores(feats)[check].tolist()
    return scores, errors
