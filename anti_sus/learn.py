"""``anti-sus learn``: fit the probe stage from labelled images (docs/anti_sus.md, "Learn").

Labels come as ``good/`` + ``bad/`` image folders (embedded here with the model
directory's CLIP through anti_sus's own preprocessing and ONNX stage, no torch)
or as a ``labels.npz`` (``features`` float[n, D], ``labels`` 1 = good / 0 = bad,
optional ``keys``; the format ``gallery-bridge labels export`` writes). A
logistic regression (scikit-learn, balanced class weights) is fitted on the
L2-normalised features; stratified k-fold cross-validation gives out-of-fold
probabilities for the precision/recall report, the threshold table and the
default threshold, then the probe is refitted on every label and written as
plain arrays (:mod:`anti_sus.stages.probe`) with the manifest updated
atomically. ``refit_gmm`` refits the GMM on the good images through
``models.fit_gmm`` (the same fit and file layout as the model build).
"""
from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from photocore.atomic import atomic_write
from photocore.errors import UserError

from .modeldir import ARTIFACTS, ModelDirError, artifact_entry, int8_unusable, open_model_dir, read_manifest, write_manifest
from .stages.probe import ProbeStage, normalize

log = logging.getLogger(__name__)

PROBE_FILE = ARTIFACTS["probe"][0]
REPORT_FILE = "probe_report.json"
PLOT_FILE = "probe_pr.png"
LABELS_FILE = "labels.npz"
MAX_LABELS = 1_000_000
"""Most rows a labels.npz may hold (checked from its header before anything is read)."""
MAX_DIM = 4096
MAX_ELEMENTS = 1 << 28
"""Most feature values (rows x D) a labels.npz may hold: 1 GiB of float32, so a crafted file cannot exhaust memory."""
TABLE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
SEARCH_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


@dataclass
class Labelled:
    """Features and labels (1 good, 0 bad) of the labelled images, and where they came from."""

    features: np.ndarray
    labels: np.ndarray
    source: str
    feature_model_sha256: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_good(self) -> int:
        return int((self.labels == 1).sum())

    @property
    def n_bad(self) -> int:
        return int((self.labels == 0).sum())


@dataclass
class Report:
    """Everything ``learn`` found: cross-validated metrics, the threshold table and the chosen threshold."""

    n_good: int
    n_bad: int
    folds: int
    threshold: float
    threshold_rule: str
    folds_metrics: list[dict[str, float]]
    pooled: dict[str, float]
    table: list[dict[str, float]]
    source: str
    c: float
    gmm: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- labels -----------------------------------------------------------------------------

def _npz_header(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one npz member from its .npy header, before its data is read (caps outside input)."""
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise UserError(f"{path}: no '{key}' array (a labels.npz has features float[n, D] and labels 1/0)")
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise UserError(f"{path}: '{key}' has an unsupported .npy format version {version}")
    return tuple(int(s) for s in shape), np.dtype(dtype)


def load_npz(path: Path, dim: int, clip_sha256: str) -> Labelled:
    """A ``labels.npz``: checked (shape, dtype, values, size caps, CLIP) and read without pickle."""
    try:
        with zipfile.ZipFile(path) as zf:
            fshape, fdtype = _npz_header(zf, "features", path)
            lshape, ldtype = _npz_header(zf, "labels", path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    if len(fshape) != 2 or fdtype.kind != "f":
        raise UserError(f"{path}: features must be float[n, D], got {fdtype}{list(fshape)}")
    if not 0 < fshape[0] <= MAX_LABELS or not 0 < fshape[1] <= MAX_DIM or fshape[0] * fshape[1] > MAX_ELEMENTS:
        raise UserError(f"{path}: features {list(fshape)} outside 1..{MAX_LABELS} rows, 1..{MAX_DIM} columns and "
                        f"{MAX_ELEMENTS} values")
    if fshape[1] != dim:
        raise UserError(f"{path}: features have dimension {fshape[1]} but the model directory's CLIP gives {dim}; "
                        "export the labels from a gallery filled through this model")
    if lshape != (fshape[0],) or ldtype.kind not in "biu":
        raise UserError(f"{path}: labels must be int[{fshape[0]}] of 1 (good) and 0 (bad), got {ldtype}{list(lshape)}")
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = np.asarray(z["features"], dtype=np.float32)
            labels = np.asarray(z["labels"]).astype(np.int64)
            # Optional: which CLIP computed the features (absent: only the dimension can be checked).
            sha = ""
            for k in ("feature_model_sha256", "clip_sha256"):
                if k in z.files and z[k].dtype.kind == "U" and z[k].shape == ():
                    sha = str(z[k][()])
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: cannot be read without pickle ({exc})") from None
    if not np.isin(labels, (0, 1)).all():
        raise UserError(f"{path}: labels must be 1 (good) or 0 (bad); found {sorted(set(np.unique(labels).tolist()) - {0, 1})[:5]}")
    if not np.isfinite(feats).all():
        raise UserError(f"{path}: features contain NaN or inf")
    if sha and sha != clip_sha256:
        raise UserError(f"{path}: its features come from another CLIP model (sha256 {sha[:12]}…, this model "
                        f"directory's is {clip_sha256[:12]}…); export labels from a gallery fed by this model")
    return Labelled(feats, labels, f"{path} ({len(labels)} labelled features)", sha or clip_sha256)


def _image_files(folder: Path, flag: str) -> list[Path]:
    from .score import IMAGE_SUFFIXES, expand

    if not folder.is_dir():
        raise UserError(f"{flag} folder {folder} does not exist; --labels needs good/ and bad/ folders or a {LABELS_FILE}")
    files = expand([folder])
    if not files:
        raise UserError(f"{folder} has no image files (looked for {' '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    return files


def embed_folders(labels_dir: Path, models: Path, *, batch_size: int = 16, threads: int = 0,
                  max_pixels: int = 89_478_485, arts: dict[str, Any] | None = None,
                  counts_check: Callable[[int, int], None] | None = None) -> Labelled:
    """``good/`` and ``bad/`` under ``labels_dir`` -> CLIP features through the server's own preprocessing + ONNX stage.

    ``arts``: the model directory already opened (else it is verified here);
    ``counts_check(n_good_files, n_bad_files)`` may refuse before anything is embedded.
    """
    from .preprocess import load_image, to_wire
    from .stages.clip import ClipStage

    good = _image_files(labels_dir / "good", "good")
    bad = _image_files(labels_dir / "bad", "bad")
    if counts_check is not None:
        counts_check(len(good), len(bad))
    arts = arts if arts is not None else _model_dir(models)
    # fp32 CLIP, as models.fit_gmm uses: the probe and the GMM see the same features.
    clip = ClipStage.from_entry(arts["clip"].path, arts["clip"].entry, threads, batch_size)
    feats: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for files, label in ((good, 1), (bad, 0)):
        for i in range(0, len(files), batch_size):
            wire = []
            for f in files[i:i + batch_size]:
                try:
                    wire.append(to_wire(load_image(str(f), max_pixels)))
                except Exception as exc:  # any decoder error: skip the file, name it in the report
                    skipped.append((str(f), f"{type(exc).__name__}: {exc}"))
            if wire:
                feats.append(clip.run(clip.preprocess(np.stack(wire))))
                labels.extend([label] * len(wire))
    for path, why in skipped:
        log.warning("skipping unreadable image %s: %s", path, why)
    dim = clip.dim or 0
    x = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    return Labelled(x, np.asarray(labels, dtype=np.int64),
                    f"{len(good)} good + {len(bad)} bad images under {labels_dir}", arts["clip"].sha256, skipped)


def load_labels(labels: Path, models: Path, *, batch_size: int = 16, threads: int = 0,
                counts_check: Callable[[int, int], None] | None = None) -> Labelled:
    """Folders or a labels.npz, whichever ``labels`` is (a directory may also hold a labels.npz).

    ``counts_check``: see :func:`embed_folders` (folders only: a labels.npz is counted once read).
    """
    arts = _model_dir(models)
    clip = arts["clip"]
    dim = (clip.entry.get("output") or {}).get("dim")
    if not isinstance(dim, int):
        raise UserError(f"the clip entry of {models}/manifest.json has no output.dim; rebuild the model directory")
    if labels.is_file():
        if labels.suffix != ".npz":
            raise UserError(f"--labels {labels}: expected a folder with good/ and bad/ or a .npz file")
        return load_npz(labels, dim, clip.sha256)
    if not labels.is_dir():
        raise UserError(f"--labels {labels} does not exist")
    if not (labels / "good").exists() and not (labels / "bad").exists() and (labels / LABELS_FILE).is_file():
        return load_npz(labels / LABELS_FILE, dim, clip.sha256)
    out = embed_folders(labels, models, batch_size=batch_size, threads=threads, arts=arts, counts_check=counts_check)
    if out.features.shape[1] != dim:
        raise UserError(f"the CLIP model gives {out.features.shape[1]} features but its manifest says {dim}")
    return out


def _model_dir(models: Path) -> dict[str, Any]:
    try:
        return open_model_dir(models)
    except ModelDirError as exc:
        # One line: the first problem names the file and the command that rebuilds it.
        raise UserError(str(exc).replace("\n ", "").replace("\n", " ")) from None


def check_counts(n_good: int, n_bad: int, min_per_class: int, folds: int) -> None:
    """Refuse too few labels (one line, exit 2) before anything is fitted or written."""
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    need = max(min_per_class, folds)
    if n_good < need or n_bad < need:
        raise UserError(f"too few labels: {n_good} good and {n_bad} bad, need at least {need} of each "
                        f"(--min-per-class {min_per_class}, --folds {folds}); label more images")


# -- fitting -----------------------------------------------------------------------------

def _model(c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    # Balanced weights: labels from a review queue are rarely 50/50, and the rare class must still count.
    return LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)


def metrics_at(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    """Precision (of the kept images, how many are good), recall (of the good, how many are kept), F1, kept fraction."""
    kept = p >= t
    tp = int((kept & (y == 1)).sum())
    n_kept, n_good = int(kept.sum()), int((y == 1).sum())
    precision = tp / n_kept if n_kept else float("nan")
    recall = tp / n_good if n_good else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if n_kept and precision + recall > 0 else 0.0
    return {"threshold": float(t), "precision": precision, "recall": recall, "f1": f1, "kept": n_kept / len(y)}


def cross_validate(x: np.ndarray, y: np.ndarray, folds: int, c: float, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Out-of-fold P(good) for every label, and each fold's test indexes (stratified, shuffled, seeded)."""
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros(len(y), dtype=np.float64)
    tests = []
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        m = _model(c, seed).fit(x[train], y[train])
        oof[test] = m.predict_proba(x[test])[:, 1]
        tests.append(test)
    return oof, tests


def choose_threshold(y: np.ndarray, p: np.ndarray, target_precision: float, explicit: float | None) -> tuple[float, str]:
    """The default threshold and the rule that chose it.

    ``explicit`` wins; else, among the thresholds whose out-of-fold precision
    reaches ``target_precision``, the one with the best recall (then precision;
    the middle one of a tie); else, when none does, the threshold with the best
    F1 (said so in the rule).
    """
    if explicit is not None:
        return float(explicit), f"set by --threshold {explicit:g}"
    rows = [metrics_at(y, p, float(t)) for t in SEARCH_THRESHOLDS]
    reaching = [r for r in rows if r["kept"] > 0 and r["precision"] >= target_precision]
    if reaching:
        # Best recall, then best precision; a tie (a plateau where both are flat, common with clean labels) takes
        # its middle threshold, so images just outside the labelled ones are not decided by a hair.
        top = max((r["recall"], r["precision"]) for r in reaching)
        tied = [r for r in reaching if (r["recall"], r["precision"]) == top]
        best = tied[len(tied) // 2]
        tie = f", middle of {len(tied)} tied" if len(tied) > 1 else ""
        return best["threshold"], (f"best cross-validated recall among thresholds whose precision reaches "
                                   f"--target-precision {target_precision:g}{tie} "
                                   f"(precision {best['precision']:.3f}, recall {best['recall']:.3f})")
    best = max(rows, key=lambda r: (r["f1"], -r["threshold"]))
    return best["threshold"], (f"no threshold reaches --target-precision {target_precision:g}: best cross-validated F1 "
                               f"({best['f1']:.3f}, precision {best['precision']:.3f}); label more images")


def learn(data: Labelled, *, folds: int = 5, c: float = 10.0, seed: int = 0, target_precision: float = 0.95,
          threshold: float | None = None) -> tuple[ProbeStage, Report]:
    """Cross-validate, choose the threshold, refit on everything; nothing is written."""
    from sklearn.metrics import roc_auc_score

    x, y = normalize(data.features), data.labels
    oof, tests = cross_validate(x, y, folds, c, seed)
    t, rule = choose_threshold(y, oof, target_precision, threshold)
    per_fold = [metrics_at(y[idx], oof[idx], t) for idx in tests]
    pooled = metrics_at(y, oof, t)
    pooled["roc_auc"] = float(roc_auc_score(y, oof))
    table = [metrics_at(y, oof, th) for th in sorted(set(TABLE_THRESHOLDS) | {round(t, 2)})]
    final = _model(c, seed).fit(x, y)
    probe = ProbeStage(final.coef_[0], float(final.intercept_[0]), t, data.feature_model_sha256)
    notes = [f"skipped {len(data.skipped)} unreadable image(s)"] if data.skipped else []
    return probe, Report(data.n_good, data.n_bad, folds, t, rule, per_fold, pooled, table, data.source, c, notes=notes)


# -- output ------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "    -" if v != v else f"{v:.3f}"  # NaN: nothing kept, precision undefined


def format_report(rep: Report) -> str:
    """The report as printed on stdout."""
    def stats(key: str) -> str:
        vals = np.array([m[key] for m in rep.folds_metrics], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        return f"{vals.mean():.3f} ± {vals.std():.3f}" if len(vals) else "-"

    lines = [f"labels: {rep.n_good} good, {rep.n_bad} bad ({rep.source})",
             f"probe threshold {rep.threshold:.2f}: {rep.threshold_rule}",
             f"{rep.folds}-fold cross-validation at threshold {rep.threshold:.2f} (mean ± std over folds): "
             f"precision {stats('precision')}, recall {stats('recall')}, F1 {stats('f1')}",
             f"out-of-fold, all labels: precision {_fmt(rep.pooled['precision'])}, recall {_fmt(rep.pooled['recall'])}, "
             f"F1 {_fmt(rep.pooled['f1'])}, kept {rep.pooled['kept']:.3f}, ROC AUC {rep.pooled['roc_auc']:.3f}",
             "",
             "threshold  precision  recall  kept",
             *[f"{r['threshold']:9.2f}  {_fmt(r['precision']):>9}  {_fmt(r['recall']):>6}  {r['kept']:.3f}"
               + ("  <- chosen" if abs(r["threshold"] - rep.threshold) < 1e-9 else "") for r in rep.table]]
    if rep.gmm:
        lines += ["", f"GMM refitted on {rep.gmm['n_train']} good images: GaussianMixture({rep.gmm['n_components']}, "
                  f"{rep.gmm['covariance_type']}), suggested threshold {rep.gmm['suggested_threshold']:.2f}"]
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)


def plot(rep: Report, path: Path) -> Path:
    """Precision, recall and kept fraction against the threshold (out-of-fold), the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [r["threshold"] for r in rep.table]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ts, [r["precision"] for r in rep.table], marker="o", label="precision (good among kept)")
    ax.plot(ts, [r["recall"] for r in rep.table], marker="s", label="recall (good kept)")
    ax.plot(ts, [r["kept"] for r in rep.table], linestyle=":", label="kept fraction")
    ax.axvline(rep.threshold, color="#c44e52", linestyle="--", label=f"chosen threshold {rep.threshold:.2f}")
    ax.set_xlabel("probe threshold on P(good)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"probe, {rep.folds}-fold cross-validation: {rep.n_good} good, {rep.n_bad} bad")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def refit_gmm(models: Path, good: np.ndarray, components: int | None, reg_covar: float, seed: int) -> dict[str, Any]:
    """Refit the GMM on the good images' features with ``models.fit_gmm`` (its fit, files and manifest entries).

    The mixture keeps the current GMM's size, covariance type and threshold
    percentile unless ``components`` says otherwise.
    """
    from models import fit_gmm

    meta_path = models / ARTIFACTS["gmm_meta"][0]
    try:
        old = json.loads(meta_path.read_text("utf-8"))
    except (OSError, ValueError):
        old = {}
    k = components or int(old.get("n_components", 16))
    cov = str(old.get("covariance_type", "full"))
    pct = float(old.get("threshold_percentile", 5.0))
    clip = fit_gmm.ClipModel.from_dir(models)
    feats = normalize(good)
    gm, _ = fit_gmm.fit(feats, [k], cov, seed=seed, reg_covar=reg_covar)
    return fit_gmm.save(models, gm, feats, clip, percentile=pct, sweep=[], seed=seed,
                        source=f"anti-sus learn --refit-gmm: {len(feats)} good labelled images",
                        histogram=models / fit_gmm.HIST_FILE)


def _finite(v: Any) -> Any:
    """NaN (precision where nothing is kept) as null: the report stays strict JSON."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


def write_probe(models: Path, probe: ProbeStage, rep: Report) -> Path:
    """``probe.npz`` (atomic) then its manifest entry (atomic); returns the probe file."""
    import sklearn

    from models.onnx_export import utc_now

    atomic_write(models / PROBE_FILE, probe.to_bytes(), mode=0o644)
    prov = {"tool": "anti-sus learn", "sklearn": str(sklearn.__version__), "source": rep.source, "created": utc_now(),
            "feature_model_sha256": probe.feature_model_sha256, "n_good": rep.n_good, "n_bad": rep.n_bad,
            "folds": rep.folds, "C": rep.c, "threshold_rule": rep.threshold_rule,
            "cv": _finite({k: rep.pooled[k] for k in ("precision", "recall", "f1", "kept", "roc_auc")})}
    write_manifest(models, {"probe": artifact_entry(
        models, PROBE_FILE, kind="probe", threshold=probe.threshold, checksum=probe.checksum,
        input={"name": "features", "dim": probe.dim, "dtype": "float32", "normalized": True},
        output={"name": "p_good", "keep_if": ">= threshold"}, provenance=prov)})
    return models / PROBE_FILE


def run(labels: Path, models: Path, *, refit: bool = False, min_per_class: int = 20, folds: int = 5, c: float = 10.0,
        seed: int = 0, target_precision: float = 0.95, threshold: float | None = None, gmm_components: int | None = None,
        gmm_reg_covar: float = 1e-6, report_path: Path | None = None, plot_path: Path | None = None,
        batch_size: int = 16, threads: int = 0) -> tuple[Report, list[Path]]:
    """The whole command: load and check labels, learn, optionally refit the GMM, write; returns the report and files."""
    def counts(n_good: int, n_bad: int) -> None:
        check_counts(n_good, n_bad, min_per_class, folds)

    counts(min_per_class, min_per_class)  # --folds < 2 is refused before any image is read
    data = load_labels(labels, models, batch_size=batch_size, threads=threads, counts_check=counts)
    counts(data.n_good, data.n_bad)  # again: unreadable images do not count
    probe, rep = learn(data, folds=folds, c=c, seed=seed, target_precision=target_precision, threshold=threshold)
    written: list[Path] = []
    if refit:
        rep.gmm = {k: v for k, v in refit_gmm(models, data.features[data.labels == 1], gmm_components, gmm_reg_covar,
                                              seed).items() if k in ("n_train", "n_components", "covariance_type",
                                                                     "suggested_threshold", "threshold_percentile")}
        written += [models / ARTIFACTS["gmm"][0], models / ARTIFACTS["gmm_meta"][0]]
        why = int8_unusable(read_manifest(models)["artifacts"])
        if "clip_int8" in read_manifest(models)["artifacts"] and why:
            rep.notes.append(f"the int8 CLIP is not served by default any more ({why}); rerun: "
                             f"python -m models.quantize --models {models} --images GOOD_IMAGES")
    written.append(write_probe(models, probe, rep))
    report_path = report_path or models / REPORT_FILE
    plot_path = plot_path or report_path.with_name(PLOT_FILE)
    report_path.write_text(json.dumps(_finite(rep.as_dict()), indent=2) + "\n", "utf-8")
    written += [report_path, plot(rep, plot_path)]
    return rep, written


__all__: Sequence[str] = ["Labelled", "Report", "load_labels", "load_npz", "embed_folders", "check_counts", "learn",
                          "choose_threshold", "metrics_at", "format_report", "plot", "refit_gmm", "write_probe", "run"]
