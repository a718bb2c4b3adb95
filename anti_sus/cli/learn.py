"""``anti-sus learn``: fit the probe stage from labelled images (good/ + bad/ folders or a labels.npz)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import non_negative_int, positive_float, positive_int, probability

from .options import add_logging, settings


def add_learn(sub: Any) -> None:
    p = sub.add_parser("learn", help="fit the probe stage from labelled images; report cross-validated precision/recall, "
                       "write probe.npz into the model directory")
    s = settings(p)
    s.add("--labels", env="LEARN_LABELS", type=Path, required=True,
          help="folder with good/ and bad/ image folders, or a labels.npz (features, labels 1/0; "
          "gallery-bridge labels export writes one)")
    s.add("--models", default=DEFAULT_MODELS_DIR, type=Path, help="model directory (its CLIP embeds the images; gets probe.npz)")
    s.switch("--refit-gmm", env="LEARN_REFIT_GMM", help="also refit the GMM on the good images (same size and covariance "
             "type as the current one unless --gmm-components)")
    s.add("--min-per-class", env="LEARN_MIN_PER_CLASS", default=20, type=positive_int,
          help="refuse with fewer labels than this in either class")
    s.add("--folds", env="LEARN_FOLDS", default=5, type=positive_int, help="stratified cross-validation folds (>= 2)")
    s.add("--target-precision", env="LEARN_TARGET_PRECISION", default=0.95, type=probability,
          help="default threshold: the lowest whose cross-validated precision reaches this (best F1 when none does)")
    s.add("--threshold", env="LEARN_THRESHOLD", type=probability, default=None,
          help="set the probe threshold instead of choosing it from --target-precision")
    s.add("--c", env="LEARN_C", default=10.0, type=positive_float,
          help="logistic regression's C (inverse regularisation strength; features are unit-length)")
    s.add("--seed", env="LEARN_SEED", default=0, type=non_negative_int, help="fold shuffling and solver seed")
    s.add("--gmm-components", env="LEARN_GMM_COMPONENTS", default=None, type=positive_int,
          help="with --refit-gmm: mixture size (none: the current GMM's)")
    s.add("--gmm-reg-covar", env="LEARN_GMM_REG_COVAR", default=1e-6, type=positive_float,
          help="with --refit-gmm: GaussianMixture reg_covar (raise it if fitting fails on few images)")
    s.add("--report", env="LEARN_REPORT", type=Path, default=None,
          help="report JSON path (none: MODELS/probe_report.json); the plot probe_pr.png goes next to it")
    s.add("--batch-size", env="LEARN_BATCH_SIZE", default=16, type=positive_int, help="images per CLIP call")
    s.add("--threads", env="LEARN_THREADS", default=0, type=non_negative_int, help="ONNX Runtime threads (0: all cores)")
    add_logging(p)


def cmd_learn(args: argparse.Namespace) -> int:
    from ..learn import PLOT_FILE, format_report, run

    models = models_dir(args.models)
    rep, written = run(args.labels, models, refit=args.refit_gmm, min_per_class=args.min_per_class, folds=args.folds,
                       c=args.c, seed=args.seed, target_precision=args.target_precision, threshold=args.threshold,
                       gmm_components=args.gmm_components, gmm_reg_covar=args.gmm_reg_covar, report_path=args.report,
                       plot_path=args.report.with_name(PLOT_FILE) if args.report else None,
                       batch_size=args.batch_size, threads=args.threads)
    print(format_report(rep))
    print("wrote " + ", ".join(str(p) for p in written))
    sys.stdout.flush()
    return 0
