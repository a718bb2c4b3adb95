"""``anti-sus``: serve, broker, keygen, ping, info, reload, score, tune, learn, prompts.

Every flag can also be set from an environment variable (shown in ``--help``),
so containers configure the server without a command line. The options come
from :mod:`photocore.settings`, the configuration layer all three services
share; each command lives in its own module (``serve``: serve and broker,
``keygen``, ``ping``: ping and info, ``reload``, ``score``, ``tune``, ``learn``, ``prompts``), and this one builds
the parser and dispatches.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from photocore.errors import UserError, report_failure
from photocore.settings import Parser, byte_size, endpoint_problem, finite_float, probability

from .. import __version__
from .keygen import add_keygen, cmd_keygen
from .learn import add_learn, cmd_learn
from .options import DEFAULT_BACKEND, DEFAULT_SERVER, QUEUED_BYTES_CEILING, QUEUED_BYTES_FLOOR, default_queued_bytes
from .ping import add_ping_info, cmd_info, cmd_ping
from .prompts import add_prompts, cmd_prompts
from .reload import add_reload, cmd_reload
from .score import add_score, cmd_score
from .serve import add_broker, add_serve, cmd_broker, cmd_serve
from .tune import add_tune, cmd_tune

__all__ = ["main", "build_parser", "COMMANDS", "UserError", "DEFAULT_SERVER", "DEFAULT_BACKEND", "QUEUED_BYTES_FLOOR",
           "QUEUED_BYTES_CEILING", "default_queued_bytes", "byte_size", "endpoint_problem", "finite", "probability"]

# The validators' old names here (nomad imported them from anti_sus.cli); photocore.settings owns them now.
finite = finite_float

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve, "broker": cmd_broker, "keygen": cmd_keygen, "ping": cmd_ping, "info": cmd_info,
    "score": cmd_score, "tune": cmd_tune, "learn": cmd_learn, "prompts": cmd_prompts,
    "reload": cmd_reload}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; raises :class:`UserError` for a bad ``ANTI_SUS_…`` variable."""
    ap = Parser(prog="anti-sus", description="anti_sus image-filter server and tools (CLIP -> GMM -> watermark)")
    ap.add_argument("--version", action="version", version=f"anti_sus {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_serve, add_broker, add_keygen, add_ping_info, add_score, add_tune, add_learn, add_prompts, add_reload):
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anti-sus`` and ``python -m anti_sus``; returns the exit status."""
    import zmq

    from photocore.curve import CurveKeyError
    from photocore.observe import setup_logging

    from ..client import AntiSusError, AntiSusUnavailable
    from ..modeldir import ModelDirError

    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        print(f"anti-sus: error: {exc}", file=sys.stderr)
        return exc.status
    setup_logging(getattr(args, "log_format", "text"), getattr(args, "log_level", "INFO"))
    try:
        return COMMANDS[args.command](args)
    except (ModelDirError, UserError, CurveKeyError) as exc:
        print(f"anti-sus: error: {exc}", file=sys.stderr)
        return getattr(exc, "status", 2)
    except (AntiSusUnavailable, AntiSusError) as exc:
        return report_failure("anti-sus", exc)
    except zmq.ZMQError as exc:
        print(f"anti-sus: error: ZeroMQ: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"anti-sus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
