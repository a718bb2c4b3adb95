"""Option groups several ``anti-sus`` commands share, and the helpers their commands use.

Every option comes from :mod:`photocore.settings`, so its ``ANTI_SUS_…``
variable follows the same rules as nomad's and gallery_bridge's (strict
booleans, one-line errors naming the variable, ``--help`` shows both).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any, Callable

from photocore.errors import UserError
from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import (Settings, byte_size, endpoint, finite_float, non_negative_int, positive_float, positive_int,
                                probability)

from ..defaults import DEFAULT_MEMORY_BUDGET, DEFAULT_WATERMARK_THRESHOLD

log = logging.getLogger("anti_sus")
PREFIX = "ANTI_SUS_"
DEFAULT_SERVER = "tcp://127.0.0.1:7777"
# 7778 is gallery_bridge's port; the broker's backend gets its own (docs/anti_sus.md has the port map).
DEFAULT_BACKEND = "tcp://127.0.0.1:7779"


def settings(p: argparse.ArgumentParser) -> Settings:
    """The ``ANTI_SUS_`` settings layer on one (sub)command parser."""
    return Settings(p, PREFIX)


# -- value types ---------------------------------------------------------------------

def _memory_bytes() -> int | None:
    """Memory this process may use: physical RAM, or a smaller cgroup (container) limit."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return total


QUEUED_BYTES_FLOOR = 256 << 20
QUEUED_BYTES_CEILING = 4 << 30


def default_queued_bytes() -> int:
    """``--max-queued-bytes`` default: 1/8 of the memory, at least 256 MiB and at most 4 GiB."""
    mem = _memory_bytes()
    if mem is None:
        return 1 << 30
    return min(max(mem // 8, QUEUED_BYTES_FLOOR), QUEUED_BYTES_CEILING)


_INSTANCE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def instance_token(s: str) -> str:
    """The ``--instance`` token: short and printable, so it fits a log line and a health reply."""
    if not _INSTANCE.fullmatch(s):
        raise argparse.ArgumentTypeError(f"must be 1-128 characters of A-Z a-z 0-9 _ . : -, got {s!r}")
    return s


# -- option groups -------------------------------------------------------------------

def add_logging(p: argparse.ArgumentParser) -> None:
    s = settings(p)
    s.add("--log-format", default="text", choices=["text", "json"], help="log line format")
    s.add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def add_models(p: argparse.ArgumentParser) -> None:
    s = settings(p)
    s.add("--models", default=DEFAULT_MODELS_DIR, help="model directory (verified against its manifest.json)")
    s.add("--threads", default=0, type=non_negative_int, help="ONNX Runtime threads per model (0: all cores)")
    s.add("--provider", default="cpu", choices=["cpu", "cuda"],
          help="ONNX Runtime execution provider; cuda needs onnxruntime-gpu and a GPU, else it runs on the CPU "
          "with one warning")
    s.switch("--int8", help="require the int8 CLIP (clip_int8): fail without one, serve it even when its gate report "
             "is stale; without --int8/--fp32 it is served when its gate passed for this CLIP and GMM")
    s.switch("--fp32", negatable=False, help="refuse the int8 models (clip_int8, watermark_int8) and serve fp32; "
             "without it the int8 watermark model is served when its gate passed for this watermark model")
    s.switch("--no-watermark", negatable=False, help="run without the watermark stage")
    s.add("--memory-budget", default=DEFAULT_MEMORY_BUDGET, type=byte_size, shown="192M",
          help="bytes of activations one model call may use, e.g. 128M or 1G; each model runs its images in "
          "sub-batches that fit (same scores, bounded memory)")


def add_thresholds(p: argparse.ArgumentParser, server_defaults: bool) -> None:
    """The thresholds; the server owns the defaults, ``score`` defers to the model (or the server)."""
    s = settings(p)
    s.add("--gmm-threshold", type=finite_float, default=None,
          help="keep images whose GMM log-likelihood is >= this (none: the suggested threshold in gmm.json"
          + ("" if server_defaults else ", or the server's") + ")")
    s.add("--watermark-threshold", type=probability, default=DEFAULT_WATERMARK_THRESHOLD if server_defaults else None,
          help="drop images whose P(watermark) is >= this"
          + ("" if server_defaults else f" (none: {DEFAULT_WATERMARK_THRESHOLD}, or the server's)"))
    s.add("--probe-threshold", type=probability, default=None,
          help="with a learnt probe (anti-sus learn): drop images whose P(good) is below this (none: the threshold "
          "stored with the probe" + ("" if server_defaults else ", or the server's") + "; ignored without a probe)")


def add_limits(p: argparse.ArgumentParser) -> None:
    s = settings(p)
    s.add("--max-images", default=64, type=positive_int, help="most images in one request")
    s.add("--max-pixels", default=1024 * 1024, type=positive_int, help="most pixels (H*W) per image")
    s.add("--hwm", default=16, type=positive_int, help="ZeroMQ send/receive high-water mark (messages)")


def add_curve_server(p: argparse.ArgumentParser) -> None:
    s = settings(p)
    s.add("--curve-secret-key", type=Path, help="enable CURVE with this server .key_secret file")
    s.add("--curve-allow", type=Path,
          help="directory of allowed client public .key files (without it, any client knowing the server key)")


def add_client(p: argparse.ArgumentParser, timeout: float) -> None:
    s = settings(p)
    s.add("--server", type=endpoint, default=DEFAULT_SERVER, help="server (or broker frontend) endpoint")
    s.add("--timeout", default=timeout, type=positive_float, help="seconds to wait for each reply")
    s.add("--retries", default=1, type=non_negative_int, help="resends after a timeout")
    s.add("--curve-server-key", type=Path, help="server public .key file (enables CURVE)")
    s.add("--curve-client-key", type=Path, help="this client's .key_secret file")


# -- helpers of the commands ----------------------------------------------------------

def load_pipeline(args: argparse.Namespace, gmm_threshold: float | None = None, watermark_threshold: float | None = None,
                  max_batch: int = 32) -> Any:
    """The model pipeline of ``--models`` (None thresholds: the model's suggestion and the one default)."""
    from ..pipeline import Pipeline
    from ..stages.onnx import use_provider

    use_provider(args.provider)  # before any session opens: every model of this process runs on it
    # models_dir: the default var/models, or the old models/ folder with a notice to move it.
    return Pipeline.load(models_dir(args.models), int8=args.int8, fp32=args.fp32, no_watermark=args.no_watermark, threads=args.threads,
                         max_batch=max_batch, memory_budget=args.memory_budget, gmm_threshold=gmm_threshold,
                         watermark_threshold=DEFAULT_WATERMARK_THRESHOLD if watermark_threshold is None else watermark_threshold,
                         probe_threshold=getattr(args, "probe_threshold", None))  # tune has no such flag


def on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT call ``stop`` (the loop finishes its batch in flight) instead of killing mid-reply."""
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %s: finishing the batch in flight, then stopping", signal.Signals(signum).name)
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def on_reload_signal(reload: Callable[[], bool]) -> None:
    """SIGHUP calls ``reload`` (the server loads its models again beside the old ones and swaps between batches)."""
    def handler(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP: reloading the models")
        if not reload():
            log.warning("SIGHUP ignored: a reload is already in progress")
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, handler)


def client_from(args: argparse.Namespace, server: str, timeout: float, retries: int) -> Any:
    """A :class:`FilterClient` from the ``--curve-…`` client flags."""
    from ..client import FilterClient

    if args.curve_client_key and not args.curve_server_key:
        raise UserError("--curve-client-key needs --curve-server-key")
    return FilterClient(server, timeout=timeout, retries=retries,
                        curve_server_key=args.curve_server_key, curve_client_keys=args.curve_client_key)
