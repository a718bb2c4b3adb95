"""``anti-sus tune``: score labelled folders, report P/R/F1 per threshold, suggest thresholds, plot histograms."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from photocore.errors import UserError
from photocore.settings import positive_int, probability

from . import options
from .options import add_logging, add_models, settings

FOLDER_FLAGS = ("--good", "--bad", "--watermarked", "--clean", "--flagged", "--unflagged")


def add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="score labelled folders, print P/R/F1 per threshold, suggest thresholds, plot histograms")
    s = settings(p)
    s.add("--good", env="TUNE_GOOD", type=Path, help="images the GMM should keep")
    s.add("--bad", env="TUNE_BAD", type=Path, help="images the GMM should drop")
    s.add("--watermarked", env="TUNE_WATERMARKED", type=Path, help="images the watermark stage should flag")
    s.add("--clean", env="TUNE_CLEAN", type=Path, help="images the watermark stage should pass")
    s.add("--target-precision", env="TUNE_TARGET_PRECISION", type=probability, help="GMM: best recall with at least this precision")
    s.add("--target-recall", env="TUNE_TARGET_RECALL", type=probability, help="GMM: best precision with at least this recall")
    s.add("--watermark-target-precision", env="TUNE_WATERMARK_TARGET_PRECISION", type=probability,
          help="watermark: best recall with at least this precision")
    s.add("--watermark-target-recall", env="TUNE_WATERMARK_TARGET_RECALL", type=probability,
          help="watermark: best precision with at least this recall")
    s.add("--prompt", env="TUNE_PROMPT", help="prompt check to tune (anti-sus prompts list) with --flagged and --unflagged")
    s.add("--flagged", env="TUNE_FLAGGED", type=Path, help="images the --prompt check should reject")
    s.add("--unflagged", env="TUNE_UNFLAGGED", type=Path, help="images the --prompt check should pass")
    s.add("--prompt-target-precision", env="TUNE_PROMPT_TARGET_PRECISION", type=probability,
          help="prompt check: best recall with at least this precision")
    s.add("--prompt-target-recall", env="TUNE_PROMPT_TARGET_RECALL", type=probability,
          help="prompt check: best precision with at least this recall")
    s.switch("--apply-prompt", env="TUNE_APPLY_PROMPT",
             help="write the suggested threshold of --prompt into the model directory's prompts.npz (its on/off stays)")
    s.add("--plot", env="TUNE_PLOT", default="tune.png", type=Path, help="histogram PNG to write")
    s.add("--json", env="TUNE_JSON", type=Path, help="also write the report as JSON here")
    s.add("--batch-size", default=32, type=positive_int, help="images per model call")
    add_models(p)
    add_logging(p)


def _folders(args: argparse.Namespace) -> dict[str, list[Path]]:
    """Every folder's image files, checked before the models load; a problem names the flag and the folder."""
    from ..score import IMAGE_SUFFIXES, expand

    folders: dict[str, list[Path]] = {}
    for flag in FOLDER_FLAGS:
        d = getattr(args, flag[2:])
        if d is None:
            continue
        if not d.exists():
            raise UserError(f"{flag} {d}: folder does not exist")
        if not d.is_dir():
            raise UserError(f"{flag} {d}: not a folder")
        files = expand([d])
        if not files:
            raise UserError(f"{flag} {d}: no image files in it (looked for {' '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
        folders[flag] = files
    return folders


def cmd_tune(args: argparse.Namespace) -> int:
    from ..score import local_scorer, score_files
    from ..tune import format_report, plot, report

    gmm_sets = (args.good, args.bad)
    wm_sets = (args.watermarked, args.clean)
    pr_sets = (args.prompt, args.flagged, args.unflagged)
    if any(gmm_sets) and not all(gmm_sets) or any(wm_sets) and not all(wm_sets) or any(pr_sets) and not all(pr_sets):
        raise UserError("give --good with --bad, --watermarked with --clean, and --prompt with --flagged and --unflagged")
    if not any(gmm_sets) and not any(wm_sets) and not any(pr_sets):
        raise UserError("nothing to tune: give --good and --bad, --watermarked and --clean, and/or --prompt with "
                        "--flagged and --unflagged")
    if args.apply_prompt and not all(pr_sets):
        raise UserError("--apply-prompt needs --prompt, --flagged and --unflagged")
    folders = _folders(args)
    # Looked up on the module at call time, so a test can put a fake pipeline in its place.
    pipeline = options.load_pipeline(args, float("-inf"), None, args.batch_size)
    scorer = local_scorer(pipeline, watermark_all=True)

    def scores(flag: str, column: str) -> list[float]:
        rows = score_files(folders[flag], scorer, args.batch_size, progress=sys.stderr.isatty())
        bad = [r for r in rows if r.verdict == "error"]
        if len(bad) == len(rows):
            raise UserError(f"{flag} {getattr(args, flag[2:])}: none of its {len(rows)} image files could be read; "
                            f"first: {bad[0].path}: {bad[0].error}")
        vals = [getattr(r, column) for r in rows if r.verdict != "error"]
        return [v for v in vals if v is not None]

    reports = []
    if all(gmm_sets):
        current = pipeline.details["gmm"].get("suggested_threshold")
        reports.append(report("gmm", "good", "bad", scores("--good", "gmm"), scores("--bad", "gmm"), current=current,
                              target_precision=args.target_precision, target_recall=args.target_recall))
    if all(wm_sets):
        if not pipeline.has_watermark:
            raise UserError("no watermark model in the model directory (or --no-watermark): cannot tune the watermark threshold")
        reports.append(report("watermark", "watermarked", "clean", scores("--watermarked", "watermark"),
                              scores("--clean", "watermark"), current=pipeline.watermark_threshold,
                              target_precision=args.watermark_target_precision, target_recall=args.watermark_target_recall))
    if all(pr_sets):
        reports.append(_prompt_report(args, pipeline, folders))
    for rep in reports:
        print(format_report(rep))
    png = plot(reports, args.plot)
    print(f"histograms: {png}")
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in reports], indent=2, default=float) + "\n", "utf-8")
        print(f"report: {args.json}")
    if args.apply_prompt:
        _apply_prompt(args, reports[-1])
    return 0


def _prompt_report(args: argparse.Namespace, pipeline: Any, folders: dict[str, list[Path]]) -> Any:
    """The tuning report of prompt check ``--prompt`` (P(reject) of --flagged vs --unflagged images)."""
    from ..tune import prompt_scores, report

    checks = getattr(pipeline, "prompt_checks", None)
    if checks is None:
        raise UserError(f"no prompt checks in {args.models}: add one with anti-sus prompts add NAME --reject … --accept …")
    if args.prompt not in checks.names:
        raise UserError(f"--prompt {args.prompt}: no such check (the model directory has: {', '.join(checks.names) or 'none'})")
    sets = []
    for flag in ("--flagged", "--unflagged"):
        vals, errors = prompt_scores(pipeline, folders[flag], args.prompt, args.batch_size)
        if not vals:
            raise UserError(f"{flag} {getattr(args, flag[2:])}: none of its image files could be read; first: {errors[0]}")
        sets.append(vals)
    current = dict(zip(checks.names, checks.thresholds.tolist()))[args.prompt]
    return report(f"prompt:{args.prompt}", "flagged", "unflagged", sets[0], sets[1], current=current,
                  target_precision=args.prompt_target_precision, target_recall=args.prompt_target_recall)


def _apply_prompt(args: argparse.Namespace, rep: Any) -> None:
    """Store the suggested threshold of ``--prompt`` in prompts.npz (atomically, manifest too)."""
    from photocore.paths import models_dir

    from ..stages.prompts import CheckSpec, load_dir, save_dir

    if rep.suggested is None:
        raise UserError(f"--apply-prompt: no threshold suggested for {args.prompt} ({'; '.join(rep.notes)})")
    d = models_dir(args.models)
    checks = load_dir(d)
    assert checks is not None
    t = min(max(float(rep.suggested.threshold), 0.0), 1.0)
    specs = [CheckSpec(c.name, c.reject, c.accept, t, c.enabled) if c.name == args.prompt else c for c in checks.specs()]
    save_dir(d, checks.replaced(specs), "anti-sus tune --apply-prompt")
    print(f"prompt check {args.prompt}: threshold {t:.6g} written to {d / 'prompts.npz'}")
