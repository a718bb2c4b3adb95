"""Command-line plumbing shared by the ``models`` commands.

Every flag can also be set from an environment variable (for containers and CI):
``ANTI_SUS_<COMMAND>_<FLAG>``, e.g. ``--pretrained`` of ``export_clip`` is
``ANTI_SUS_EXPORT_CLIP_PRETRAINED``. ``--help`` shows each variable's name.
User-caused failures raise :class:`UserError`; :func:`run_main` turns them into a
one-line message and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence


class UserError(Exception):
    """A failure the user can fix (bad input, missing file); printed without a traceback."""


class EnvParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose options default to an environment variable."""

    def __init__(self, command: str, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(prog=f"python -m models.{command}", **kwargs)
        self.env_prefix = "ANTI_SUS_" + command.upper().replace(".", "_") + "_"

    def env_name(self, flag: str) -> str:
        return self.env_prefix + flag.lstrip("-").upper().replace("-", "_")

    def add_env(self, flag: str, *, help: str, **kwargs: Any) -> argparse.Action:
        """Add ``flag`` with its default read from ``ANTI_SUS_<COMMAND>_<FLAG>``."""
        env = self.env_name(flag)
        raw = os.environ.get(env)
        action = kwargs.get("action")
        if raw is not None and raw != "":
            if action in ("store_true", "store_false"):
                kwargs["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                conv: Callable[[str], Any] = kwargs.get("type") or str
                try:
                    kwargs["default"] = conv(raw)
                except (TypeError, ValueError) as exc:
                    self.error(f"environment variable {env}={raw!r} is invalid: {exc}")
                kwargs["required"] = False
        return self.add_argument(flag, help=f"{help} [env: {env}]", **kwargs)

    def add_parity_gate(self) -> None:
        """Flags of the ONNX export commands: opset and the parity gate against torch."""
        from .onnx_export import MAX_ABS, MIN_COSINE, OPSET

        self.add_env("--opset", type=int, default=OPSET, help="ONNX opset (>= 14)")
        self.add_env("--min-cosine", type=float, default=MIN_COSINE, help="parity gate: lowest acceptable cosine")
        self.add_env("--max-abs", type=float, default=MAX_ABS, help="parity gate: largest acceptable absolute difference")

    def parse_args(self, *args: Any, **kwargs: Any) -> argparse.Namespace:  # type: ignore[override]
        ns = super().parse_args(*args, **kwargs)
        if getattr(ns, "opset", 14) < 14:
            raise UserError(f"--opset must be >= 14, got {ns.opset}")
        return ns

    def add_common(self) -> None:
        """Flags every models command has: logging and CPU threads."""
        self.add_env("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
        self.add_env("--log-format", default="text", choices=["text", "json"], help="log line format")
        self.add_env("--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads for torch and ONNX Runtime")


def setup(args: argparse.Namespace, torch_threads: bool = True) -> None:
    """Apply the common flags: logging and (for torch commands) a modest torch thread count."""
    from anti_sus.observe import setup_logging

    setup_logging(args.log_format, args.log_level)
    if torch_threads:
        import torch

        torch.set_num_threads(max(1, int(args.threads)))


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a :class:`UserError` or ``OSError`` becomes ``error: …`` on stderr and exit 2."""
    from anti_sus.modeldir import ModelDirError

    try:
        return main(argv)
    except UserError as exc:
        logging.getLogger("models").debug("user error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, full disk, unreadable input: the message says which file
        logging.getLogger("models").debug("OS error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def int_list(text: str) -> list[int]:
    """``"4,8,16"`` -> ``[4, 8, 16]`` (argparse type)."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
