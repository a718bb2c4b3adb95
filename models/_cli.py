"""Command-line plumbing shared by the ``models`` commands, on :mod:`photocore.settings`.

Every flag can also be set from an environment variable (for containers and CI):
``ANTI_SUS_<COMMAND>_<FLAG>``, e.g. ``--pretrained`` of ``export_clip`` is
``ANTI_SUS_EXPORT_CLIP_PRETRAINED``. ``--help`` shows each variable's name and
the default; the rules are those of the services (strict booleans, a bad value
is one line naming the variable). User-caused failures raise
:class:`~photocore.errors.UserError`; :func:`run_main` turns them into a
one-line message and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from photocore.errors import UserError
from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import Parser, Settings, finite_float, positive_int

__all__ = ["EnvParser", "UserError", "int_list", "run_main", "setup"]


class EnvParser(Parser):
    """The parser of one ``models`` command: options default to ``ANTI_SUS_<COMMAND>_…`` variables."""

    def __init__(self, command: str, **kwargs: Any) -> None:
        super().__init__(prog=f"python -m models.{command}", **kwargs)
        self.env_prefix = "ANTI_SUS_" + command.upper().replace(".", "_") + "_"
        self.settings = Settings(self, self.env_prefix)

    def env_name(self, flag: str) -> str:
        return self.settings.env_name(flag)

    def add_env(self, flag: str, *, help: str, **kwargs: Any) -> argparse.Action:
        """Add ``flag`` with its default read from ``ANTI_SUS_<COMMAND>_<FLAG>`` (``action="store_true"``: a switch)."""
        if kwargs.pop("action", None) == "store_true":
            return self.settings.switch(flag, default=bool(kwargs.pop("default", False)), help=help)
        return self.settings.add(flag, help=help, **kwargs)

    def add_export(self) -> None:
        """Flags of the ONNX export commands: the output folder, opset, the parity gate against torch, and the common ones."""
        from .onnx_export import MAX_ABS, MIN_COSINE, OPSET

        self.add_env("--out", type=Path, default=Path(DEFAULT_MODELS_DIR), help="model directory to write into")
        self.add_env("--opset", type=_opset, default=OPSET, help="ONNX opset (>= 14)")
        self.add_env("--min-cosine", type=finite_float, default=MIN_COSINE, help="parity gate: lowest acceptable cosine")
        self.add_env("--max-abs", type=finite_float, default=MAX_ABS, help="parity gate: largest acceptable absolute difference")
        self.add_common()

    def parse_export(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parse an export command's flags and apply the common ones; ``out`` is the model folder to merge into."""
        args = self.parse_args(argv)
        setup(args)
        # Merged into an existing manifest: an old models/ folder that is still in use gets the new artifact too.
        args.out = models_dir(args.out)
        return args

    def add_tiny(self, out_help: str, images: int) -> None:
        """The flags of the two tiny-model builders (``models.tiny``, ``models.tiny_onnx``)."""
        self.add_env("--out", type=Path, required=True, help=out_help)
        self.add_env("--seed", type=int, default=0, help="seed for weights and generated images")
        self.add_env("--images", type=int, default=images, help="procedural images the GMM is fitted on")

    def add_common(self) -> None:
        """Flags every models command has: logging and CPU threads."""
        self.add_env("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
        self.add_env("--log-format", default="text", choices=["text", "json"], help="log line format")
        self.add_env("--threads", type=positive_int, default=min(4, os.cpu_count() or 1), shown="min(4, CPU cores)",
                     help="CPU threads for torch and ONNX Runtime")


def _opset(text: str) -> int:
    """An ONNX opset the exporters support (>= 14)."""
    value = positive_int(text)
    if value < 14:
        raise argparse.ArgumentTypeError(f"must be >= 14, got {value}")
    return value


def setup(args: argparse.Namespace, torch_threads: bool = True) -> None:
    """Apply the common flags: logging and (for torch commands) a modest torch thread count."""
    from photocore.observe import setup_logging

    setup_logging(args.log_format, args.log_level)
    if torch_threads:
        import torch

        torch.set_num_threads(max(1, int(args.threads)))


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a :class:`UserError` or ``OSError`` becomes ``error: …`` on stderr and exit 2.

    A failed parity gate is exit 1 with its figures on stdout (the export's report).
    """
    from anti_sus.modeldir import ModelDirError

    from .onnx_export import ParityError

    try:
        return main(argv)
    except UserError as exc:
        logging.getLogger("models").debug("user error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    except ModelDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"error: {exc}", flush=True)
        return 1
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
