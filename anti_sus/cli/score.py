"""``anti-sus score``: score image files in-process or through a running server; one row per file."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from photocore.errors import UserError
from photocore.settings import endpoint, positive_float, positive_int

from . import options
from .options import add_logging, add_models, add_thresholds, client_from, settings

log = logging.getLogger("anti_sus")


def add_score(sub: Any) -> None:
    p = sub.add_parser("score", help="score image files: path, GMM score, P(watermark), verdict")
    p.add_argument("paths", nargs="+", help="image files or directories (walked recursively)")
    s = settings(p)
    s.add("--server", env="SCORE_SERVER", type=endpoint, help="score through this running server instead of in-process")
    s.add("--timeout", default=120.0, type=positive_float, help="seconds per reply with --server")
    s.add("--curve-server-key", type=Path, help="server public .key file (with --server)")
    s.add("--curve-client-key", type=Path, help="client .key_secret file (with --server)")
    add_models(p)
    add_thresholds(p, False)
    s.add("--format", env="SCORE_FORMAT", default="csv", choices=["csv", "json"], help="output format")
    s.add("--output", env="SCORE_OUTPUT", default="-", help="output file ('-': stdout)")
    s.add("--batch-size", default=32, type=positive_int, help="images per request")
    add_logging(p)


def cmd_score(args: argparse.Namespace) -> int:
    from ..score import expand, local_scorer, remote_scorer, score_files, write_rows

    files = expand(args.paths)
    if not files:
        raise UserError(f"no image files in {' '.join(args.paths)}")
    if args.server:
        client = client_from(args, args.server, args.timeout, 1)
        scorer = remote_scorer(client, gmm_threshold=args.gmm_threshold, watermark_threshold=args.watermark_threshold,
                               probe_threshold=args.probe_threshold)
    else:
        client = None
        scorer = local_scorer(options.load_pipeline(args, args.gmm_threshold, args.watermark_threshold, args.batch_size))
    try:
        rows = score_files(files, scorer, args.batch_size, progress=sys.stderr.isatty())
    finally:
        if client is not None:
            client.close()
    if args.output == "-":
        write_rows(rows, sys.stdout, args.format)
    else:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            write_rows(rows, f, args.format)
    errors = [r for r in rows if r.verdict == "error"]
    if errors and len(errors) == len(rows):
        print(f"anti-sus: error: none of the {len(rows)} files could be scored; first: {errors[0].path}: {errors[0].error}",
              file=sys.stderr)
        return 1
    if errors:
        log.warning("%d of %d files could not be read", len(errors), len(rows))
    return 0
