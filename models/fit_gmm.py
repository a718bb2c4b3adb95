"""Fit the "looks like my good photos" Gaussian mixture on CLIP features.

    python -m models.fit_gmm --models var/models --images ~/good-photos
    python -m models.fit_gmm --models var/models --images ~/good-photos --select bic --components 4,8,16,24,32
    python -m models.fit_gmm --models var/models --features feats.npy

Features come from the model directory's ``clip`` ONNX encoder through the
preprocessing contract (``load_image`` -> ``to_wire`` -> ``clip_input``), the
same path the server takes. Writes ``gmm.npz`` + ``gmm.json`` (+ a histogram
PNG of training scores) into the model directory and updates its manifest.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from anti_sus.modeldir import ARTIFACTS, MANIFEST, ModelDirError, artifact_entry, read_manifest, write_manifest
from anti_sus.preprocess import PreprocessSpec, clip_input, load_image, to_wire
from anti_sus.stages.gmm import COVARIANCE_TYPES, GmmScorer
from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import Settings

from ._cli import EnvParser, UserError, int_list, run_main, setup
from .onnx_export import ort_session, utc_now

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GMM_FILE = ARTIFACTS["gmm"][0]
GMM_META_FILE = ARTIFACTS["gmm_meta"][0]
HIST_FILE = "gmm_hist.png"
PERCENTILES = (0.5, 1, 2, 5, 10, 25, 50, 75, 90, 95, 99)


@dataclass
class Encoded:
    """Features of the images that could be read, and the ones that could not."""

    features: np.ndarray
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ClipModel:
    """The ``clip`` artifact of a model directory: path, preprocessing spec, sha256, dim."""

    path: Path
    spec: PreprocessSpec
    sha256: str
    dim: int

    @classmethod
    def from_dir(cls, models: Path) -> "ClipModel":
        try:
            entry = read_manifest(models)["artifacts"].get("clip")
        except ModelDirError as exc:
            raise UserError(str(exc)) from None
        if not entry:
            raise UserError(f"{models / MANIFEST} has no 'clip' artifact; build it first: "
                            f"python -m models.export_clip --out {models} --pretrained openai")
        path = models / entry["file"]
        if not path.is_file():
            raise UserError(f"clip encoder {path} is missing; build it: python -m models.export_clip --out {models}")
        return cls(path, PreprocessSpec.from_dict(entry["preprocess"]), str(entry["sha256"]), int(entry["output"]["dim"]))


def find_images(folder: Path) -> list[Path]:
    """Every jpg/jpeg/png/webp under ``folder`` (recursive, case-insensitive), sorted."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist or is not a directory")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return paths


def encode_wire(batches: Iterable[np.ndarray], clip: ClipModel, threads: int = 1) -> np.ndarray:
    """Wire batches ``uint8[n, 512, 512, 3]`` -> features ``float32[N, D]`` via the ONNX encoder."""
    sess = ort_session(clip.path, threads)
    name = sess.get_inputs()[0].name
    out = [np.asarray(sess.run(None, {name: clip_input(b, clip.spec)})[0], dtype=np.float32) for b in batches if len(b)]
    return np.concatenate(out) if out else np.empty((0, clip.dim), np.float32)


def _wire_batches(paths: Sequence[Path], batch_size: int, failed: list[tuple[str, str]], progress: bool) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    buf: list[np.ndarray] = []
    for p in tqdm(paths, desc="features", unit="img", disable=not progress):
        try:
            buf.append(to_wire(load_image(str(p))))
        except Exception as exc:  # any decoder error: count it, keep going (the report names them)
            failed.append((str(p), f"{type(exc).__name__}: {exc}"))
            log.warning("skipping unreadable image %s: %s", p, exc)
            continue
        if len(buf) >= batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def encode_paths(paths: Sequence[Path], clip: ClipModel, batch_size: int = 16, threads: int = 1, progress: bool = True) -> Encoded:
    """Image files -> features through the preprocessing contract; unreadable files are skipped and listed."""
    failed: list[tuple[str, str]] = []
    feats = encode_wire(_wire_batches(paths, batch_size, failed, progress), clip, threads)
    return Encoded(feats, failed)


def fit(features: np.ndarray, components: Sequence[int], covariance_type: str = "full", select: str | None = None,
        seed: int = 0, reg_covar: float = 1e-6, max_iter: int = 200) -> tuple[Any, list[dict[str, float]]]:
    """Fit ``GaussianMixture``; with several ``components`` and ``select`` (bic|aic) sweep and keep the lowest.

    Returns the chosen model and the sweep (empty when only one size was fitted).
    """
    from sklearn.mixture import GaussianMixture

    n = int(features.shape[0])
    if covariance_type not in COVARIANCE_TYPES:
        raise UserError(f"covariance type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
    if len(components) > 1 and select is None:
        raise UserError("several --components need --select bic|aic to choose between them")
    usable = [k for k in components if k <= n]
    if not usable:
        raise UserError(f"only {n} images/feature rows but the mixture needs at least {min(components)} "
                        f"(one per component); add images or lower --components")
    if len(usable) < len(components):
        log.warning("skipping component counts above the %d samples: %s", n, [k for k in components if k > n])
    sweep: list[dict[str, float]] = []
    best, best_crit = None, np.inf
    for k in usable:
        gm = GaussianMixture(n_components=k, covariance_type=covariance_type, reg_covar=reg_covar,
                             max_iter=max_iter, random_state=seed)
        try:
            gm.fit(features)
        except ValueError as exc:  # ill-defined covariance: too few or duplicate samples
            raise UserError(f"GaussianMixture({k}) could not be fitted: {exc} (try more images, fewer "
                            f"--components or a larger --reg-covar)") from None
        if not gm.converged_:
            log.warning("GaussianMixture(%d) did not converge in %d iterations", k, max_iter)
        if select is None:
            return gm, sweep
        row = {"n_components": k, "bic": float(gm.bic(features)), "aic": float(gm.aic(features))}
        sweep.append(row)
        log.info("k=%d bic=%.1f aic=%.1f", k, row["bic"], row["aic"])
        if row[select] < best_crit:
            best, best_crit = gm, row[select]
    return best, sweep


def scorer_of(gm: Any) -> GmmScorer:
    """The numpy scorer for a fitted sklearn mixture."""
    return GmmScorer(
        weights=np.asarray(gm.weights_, dtype=np.float64),
        means=np.asarray(gm.means_, dtype=np.float64),
        precisions_cholesky=np.asarray(gm.precisions_cholesky_, dtype=np.float64),
        covariance_type=str(gm.covariance_type),
    )


def write_histogram(scores: np.ndarray, threshold: float, percentile: float, path: Path) -> None:
    """Histogram of training scores with the suggested threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores, bins=min(60, max(10, len(scores) // 5)), color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"suggested threshold {threshold:.1f} (p{percentile:g})")
    ax.set_xlabel("log-likelihood (higher = more typical)")
    ax.set_ylabel("training images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(models: Path, gm: Any, features: np.ndarray, clip: ClipModel, *, percentile: float, sweep: list[dict[str, float]],
         source: str, skipped: int = 0, histogram: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Write gmm.npz, gmm.json, the histogram, and the manifest entries; returns the metadata."""
    scorer = scorer_of(gm)
    scorer.save(models / GMM_FILE)
    # Score with the saved artifact: the threshold must match what the server will compute.
    scores = GmmScorer.load(models / GMM_FILE).score(features)
    threshold = float(np.percentile(scores, percentile))
    meta = {
        "n_train": int(features.shape[0]),
        "n_skipped": int(skipped),
        "n_components": scorer.n_components,
        "covariance_type": scorer.covariance_type,
        "feature_dim": scorer.dim,
        "feature_model_sha256": clip.sha256,
        "score": "log-likelihood per image (sklearn score_samples); higher = more typical; keep if >= threshold",
        "score_percentiles": {f"p{p:g}": float(np.percentile(scores, p)) for p in PERCENTILES},
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std()),
        "threshold_percentile": percentile,
        "suggested_threshold": threshold,
        "selection": sweep,
        "source": source,
        "seed": seed,
        "created": utc_now(),
    }
    (models / GMM_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if histogram is not None:
        write_histogram(scores, threshold, percentile, histogram)
    prov = {"tool": "models.fit_gmm", "sklearn": _sklearn_version(), "source": source, "created": meta["created"],
            "feature_model_sha256": clip.sha256}
    write_manifest(models, {
        "gmm": artifact_entry(models, GMM_FILE, kind="gmm",
                              input={"name": "features", "dim": scorer.dim, "dtype": "float32", "normalized": True},
                              output={"name": "log_likelihood", "higher_is_better": True},
                              n_components=scorer.n_components, covariance_type=scorer.covariance_type, provenance=prov),
        "gmm_meta": artifact_entry(models, GMM_META_FILE, kind="json", provenance=prov),
    })
    return meta


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def load_features(path: Path, dim: int) -> np.ndarray:
    """A saved ``float[N, D]`` features file (``np.save``), checked against the encoder's dimension."""
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read features {path}: {exc}") from None
    if x.ndim != 2 or x.shape[1] != dim:
        raise UserError(f"{path}: expected features [N, {dim}] from the clip encoder, got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise UserError(f"{path}: features contain NaN or inf")
    return x.astype(np.float64)


def parser() -> EnvParser:
    p = EnvParser("fit_gmm", description=__doc__.split("\n\n")[0])
    p.add_env("--models", type=Path, default=Path(DEFAULT_MODELS_DIR), help="model directory (has the clip encoder; gets gmm.npz/gmm.json)")
    src = Settings(p.add_mutually_exclusive_group(), p.env_prefix)
    src.add("--images", type=Path, help="folder of good images (recursive: jpg, jpeg, png, webp)")
    src.add("--features", type=Path, help="saved features .npy [N, D] instead of images")
    p.add_env("--components", type=int_list, default=[16], help="mixture size, or a comma list to sweep with --select")
    p.add_env("--select", choices=["bic", "aic"], default=None, help="pick the component count with the lowest BIC/AIC")
    p.add_env("--covariance-type", choices=list(COVARIANCE_TYPES), default="full", help="GaussianMixture covariance type")
    p.add_env("--reg-covar", type=float, default=1e-6, help="GaussianMixture reg_covar (raise it if fitting fails)")
    p.add_env("--threshold-percentile", type=float, default=5.0,
              help="suggested threshold = this percentile of training scores (images below it are dropped)")
    p.add_env("--batch-size", type=int, default=16, help="images per encoder call")
    p.add_env("--save-features", type=Path, default=None, help="also save the computed features to this .npy")
    p.add_env("--histogram", type=Path, default=None, help=f"histogram PNG path (default: MODELS/{HIST_FILE})")
    p.add_env("--seed", type=int, default=0, help="GaussianMixture random_state")
    p.add_common()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    # argparse checks only the command line; a variable can still have set the other source.
    if (args.images is None) == (args.features is None):
        p.error("give one of --images or --features (flag or ANTI_SUS_FIT_GMM_IMAGES/ANTI_SUS_FIT_GMM_FEATURES), not "
                + ("neither" if args.images is None else "both"))
    setup(args, torch_threads=False)
    if not 0 <= args.threshold_percentile <= 100:
        raise UserError(f"--threshold-percentile must be within 0..100, got {args.threshold_percentile}")
    args.models = models_dir(args.models)  # the old models/ folder is still read, with a notice
    clip = ClipModel.from_dir(args.models)
    skipped = 0
    if args.features is not None:
        feats = load_features(args.features, clip.dim)
        source = f"features {args.features}"
    else:
        paths = find_images(args.images)
        enc = encode_paths(paths, clip, args.batch_size, args.threads)
        skipped = len(enc.failed)
        if skipped:
            print(f"skipped {skipped} unreadable image(s) of {len(paths)}:", flush=True)
            for path, why in enc.failed[:20]:
                print(f"  {path}: {why}")
        if len(enc.features) == 0:
            raise UserError(f"none of the {len(paths)} images under {args.images} could be read")
        feats = enc.features.astype(np.float64)
        source = f"{len(feats)} images under {args.images}"
        if args.save_features:
            np.save(args.save_features, enc.features)
    gm, sweep = fit(feats, args.components, args.covariance_type, args.select, args.seed, args.reg_covar)
    hist = args.histogram or (args.models / HIST_FILE)
    meta = save(args.models, gm, feats, clip, percentile=args.threshold_percentile, sweep=sweep, source=source,
                skipped=skipped, histogram=hist, seed=args.seed)
    print(f"fitted GaussianMixture({meta['n_components']}, {meta['covariance_type']}) on {meta['n_train']} samples "
          f"(skipped {skipped}); suggested threshold {meta['suggested_threshold']:.2f} "
          f"(p{args.threshold_percentile:g}); wrote {args.models / GMM_FILE}, {args.models / GMM_META_FILE}, {hist}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
