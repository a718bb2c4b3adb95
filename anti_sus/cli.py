"""``anti-sus``: serve, broker, keygen, ping, info, score, tune.

Every flag can also be set from an environment variable (shown in ``--help``),
so containers configure the server without a command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from photocore.paths import DEFAULT_MODELS_DIR, models_dir

from . import __version__

log = logging.getLogger("anti_sus")
DEFAULT_SERVER = "tcp://127.0.0.1:7777"
# 7778 is gallery_bridge's port; the broker's backend gets its own (docs/anti_sus.md has the port map).
DEFAULT_BACKEND = "tcp://127.0.0.1:7779"


class UserError(Exception):
    """A failure the user can fix; printed without a traceback."""


def _truthy(s: str) -> bool:
    return s.strip().lower() in ("1", "true", "yes", "on")


def opt(p: argparse.ArgumentParser, flag: str, env: str, *, default: Any = None, type: Callable[[str], Any] = str,
        help: str, flag_bool: bool = False, multiple: bool = False, **kw: Any) -> None:
    """Add ``flag`` whose default comes from ``env`` when set; the help names both."""
    raw = os.environ.get(env)
    if flag_bool:
        value = _truthy(raw) if raw is not None else bool(default)
        p.add_argument(flag, action="store_true", default=value, help=f"{help} [env {env}=1]", **kw)
        return
    if raw is not None and raw != "":
        try:
            value = [type(x.strip()) for x in raw.split(",") if x.strip()] if multiple else type(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"environment variable {env}={raw!r} is invalid: {exc}") from None
    else:
        value = default
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    text = f"{help} [env {env}{', comma-separated' if multiple else ''}; default: {shown}]"
    if multiple:
        # Flags given on the command line replace the env/default list instead of appending to it.
        p.add_argument(flag, action=_ReplaceAppend, type=type, default=value, help=text, **kw)
    else:
        p.add_argument(flag, type=type, default=value, help=text, **kw)


class _ReplaceAppend(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        current = getattr(ns, self.dest)
        if not getattr(ns, f"_{self.dest}_given", False):
            current = []
            setattr(ns, f"_{self.dest}_given", True)
        setattr(ns, self.dest, [*current, values])


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def probability(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {v}")
    return v


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def byte_size(s: str) -> int:
    """``1073741824``, ``512M``, ``1.5G``, ``2GiB`` -> bytes (K/M/G/T are powers of 1024); at least 1."""
    m = _SIZE.fullmatch(s)
    if not m:
        raise argparse.ArgumentTypeError(f"must be a byte count like 1073741824, 512M or 2G, got {s!r}")
    v = int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte, got {s!r}")
    return v


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
    if not _INSTANCE.fullmatch(s):
        raise argparse.ArgumentTypeError(f"must be 1-128 characters of A-Z a-z 0-9 _ . : -, got {s!r}")
    return s


def finite(s: str) -> float:
    v = float(s)
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v


# -- endpoints -----------------------------------------------------------------------

TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "tipc", "vmci", "udp", "ws", "wss")
# dest -> (flag, binds?): checked at start so a typo is named, not answered with ZeroMQ's "Invalid argument".
ENDPOINT_FLAGS = {"bind": ("--bind", True), "frontend": ("--frontend", True), "backend": ("--backend", True),
                  "connect": ("--connect", False), "server": ("--server", False)}


def endpoint_problem(ep: str, binds: bool) -> str | None:
    """What is wrong with a ZeroMQ endpoint string, or None when it looks usable."""
    if "://" not in ep:
        example = f"tcp://{ep}" if re.fullmatch(r"[^\s/]+:(\d+|\*)", ep) else DEFAULT_SERVER
        return f"a ZeroMQ endpoint needs a transport, e.g. {example}"
    transport, _, address = ep.partition("://")
    if transport not in TRANSPORTS:
        return f"unknown transport {transport!r}; use tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    if not address:
        return f"no address after {transport}://"
    if transport == "tcp":
        host, sep, port = address.rpartition(":")
        if not sep or not host:
            return f"a tcp endpoint needs HOST:PORT, e.g. tcp://{address or '127.0.0.1'}:7777"
        if port == "*" and binds:
            return None
        if not port.isdigit() or not 0 < int(port) < 65536:
            return f"port {port!r} is not a number within 1-65535" + (" (or * for any free port)" if binds else "")
    return None


def check_endpoints(args: argparse.Namespace) -> None:
    """Raise :class:`UserError` naming the flag and value of the first unusable endpoint."""
    for dest, (flag, binds) in ENDPOINT_FLAGS.items():
        value = getattr(args, dest, None)
        for ep in ([] if value is None else value if isinstance(value, list) else [value]):
            problem = endpoint_problem(str(ep).strip(), binds)
            if problem:
                raise UserError(f"{flag} {ep}: {problem}")


# -- parser ------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    opt(p, "--log-format", "ANTI_SUS_LOG_FORMAT", default="text", choices=["text", "json"], help="log line format")
    opt(p, "--log-level", "ANTI_SUS_LOG_LEVEL", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def _models(p: argparse.ArgumentParser) -> None:
    opt(p, "--models", "ANTI_SUS_MODELS", default=DEFAULT_MODELS_DIR, help="model directory (verified against its manifest.json)")
    opt(p, "--threads", "ANTI_SUS_THREADS", default=0, type=int, help="ONNX Runtime threads per model (0: all cores)")
    opt(p, "--int8", "ANTI_SUS_INT8", flag_bool=True, help="use the int8-quantized CLIP if the model directory has one")
    opt(p, "--no-watermark", "ANTI_SUS_NO_WATERMARK", flag_bool=True, help="run without the watermark stage")


def _thresholds(p: argparse.ArgumentParser, server_defaults: bool) -> None:
    opt(p, "--gmm-threshold", "ANTI_SUS_GMM_THRESHOLD", type=finite,
        default=None, help="keep images whose GMM log-likelihood is >= this (none: the suggested threshold in gmm.json"
        + ("" if server_defaults else ", or the server's") + ")")
    opt(p, "--watermark-threshold", "ANTI_SUS_WATERMARK_THRESHOLD", type=probability, default=None if not server_defaults else 0.5,
        help="drop images whose P(watermark) is >= this")


def _limits(p: argparse.ArgumentParser) -> None:
    opt(p, "--max-images", "ANTI_SUS_MAX_IMAGES", default=64, type=positive_int, help="most images in one request")
    opt(p, "--max-pixels", "ANTI_SUS_MAX_PIXELS", default=1024 * 1024, type=positive_int, help="most pixels (H*W) per image")
    opt(p, "--hwm", "ANTI_SUS_HWM", default=16, type=positive_int, help="ZeroMQ send/receive high-water mark (messages)")


def _curve_server(p: argparse.ArgumentParser) -> None:
    opt(p, "--curve-secret-key", "ANTI_SUS_CURVE_SECRET_KEY", type=Path, help="enable CURVE with this server .key_secret file")
    opt(p, "--curve-allow", "ANTI_SUS_CURVE_ALLOW", type=Path,
        help="directory of allowed client public .key files (without it, any client knowing the server key)")


def _client(p: argparse.ArgumentParser, timeout: float) -> None:
    opt(p, "--server", "ANTI_SUS_SERVER", default=DEFAULT_SERVER, help="server (or broker frontend) endpoint")
    opt(p, "--timeout", "ANTI_SUS_TIMEOUT", default=timeout, type=float, help="seconds to wait for each reply")
    opt(p, "--retries", "ANTI_SUS_RETRIES", default=1, type=int, help="resends after a timeout")
    opt(p, "--curve-server-key", "ANTI_SUS_CURVE_SERVER_KEY", type=Path, help="server public .key file (enables CURVE)")
    opt(p, "--curve-client-key", "ANTI_SUS_CURVE_CLIENT_KEY", type=Path, help="this client's .key_secret file")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="anti-sus", description="anti_sus image-filter server and tools (CLIP -> GMM -> watermark)")
    ap.add_argument("--version", action="version", version=f"anti_sus {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the filter server (or a broker worker with --connect)")
    opt(s, "--bind", "ANTI_SUS_BIND", default=[DEFAULT_SERVER], multiple=True, help="endpoint to bind (repeat for several)")
    opt(s, "--connect", "ANTI_SUS_CONNECT", help="work for a broker: connect to its backend endpoint instead of binding")
    opt(s, "--credits", "ANTI_SUS_CREDITS", default=1, type=positive_int, help="requests a broker worker takes at once")
    opt(s, "--heartbeat", "ANTI_SUS_HEARTBEAT", default=2.0, type=float, help="seconds between a broker worker's READY heartbeats")
    _models(s)
    _thresholds(s, True)
    opt(s, "--max-batch", "ANTI_SUS_MAX_BATCH", default=32, type=positive_int, help="most images per model call (requests are batched together up to this)")
    opt(s, "--max-queue", "ANTI_SUS_MAX_QUEUE", default=256, type=positive_int,
        help="most images queued; a request beyond it is answered busy (clients retry)")
    opt(s, "--max-queued-bytes", "ANTI_SUS_MAX_QUEUED_BYTES", default=default_queued_bytes(), type=byte_size,
        help="most payload bytes held (queued + the batch in hand), e.g. 512M or 2G; a request beyond it is answered busy "
             "(default: 1/8 of this machine's memory, within 256 MiB..4 GiB)")
    opt(s, "--instance", "ANTI_SUS_INSTANCE", type=instance_token,
        help="token that info/ping report, so a launcher can tell its own server (default: a random one per start)")
    _limits(s)
    _curve_server(s)
    opt(s, "--metrics-port", "ANTI_SUS_METRICS_PORT", default=0, type=int, help="serve Prometheus metrics on this port (0: off)")
    opt(s, "--metrics-host", "ANTI_SUS_METRICS_HOST", default="127.0.0.1", help="address for the metrics endpoint")
    _common(s)

    b = sub.add_parser("broker", help="load-balancing broker in front of several `serve --connect` workers")
    opt(b, "--frontend", "ANTI_SUS_FRONTEND", default=[DEFAULT_SERVER], multiple=True, help="endpoint for clients (repeat for several)")
    opt(b, "--backend", "ANTI_SUS_BACKEND", default=[DEFAULT_BACKEND], multiple=True, help="endpoint for workers (repeat for several)")
    opt(b, "--worker-timeout", "ANTI_SUS_WORKER_TIMEOUT", default=10.0, type=float,
        help="drop a worker not heard from for this many seconds (workers beat every --heartbeat)")
    _limits(b)
    _curve_server(b)
    _common(b)

    k = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    k.add_argument("directory", type=Path, help="where to write the key files")
    opt(k, "--name", "ANTI_SUS_KEYGEN_NAME", default="server", help="file name stem")

    for name, helptext in (("ping", "exit 0 if the server answers (health checks)"), ("info", "print the server's models, thresholds and limits")):
        c = sub.add_parser(name, help=helptext)
        _client(c, 5.0)
        _common(c)

    sc = sub.add_parser("score", help="score image files: path, GMM score, P(watermark), verdict")
    sc.add_argument("paths", nargs="+", help="image files or directories (walked recursively)")
    opt(sc, "--server", "ANTI_SUS_SCORE_SERVER", help="score through this running server instead of in-process")
    opt(sc, "--timeout", "ANTI_SUS_TIMEOUT", default=120.0, type=float, help="seconds per reply with --server")
    opt(sc, "--curve-server-key", "ANTI_SUS_CURVE_SERVER_KEY", type=Path, help="server public .key file (with --server)")
    opt(sc, "--curve-client-key", "ANTI_SUS_CURVE_CLIENT_KEY", type=Path, help="client .key_secret file (with --server)")
    _models(sc)
    _thresholds(sc, False)
    opt(sc, "--format", "ANTI_SUS_SCORE_FORMAT", default="csv", choices=["csv", "json"], help="output format")
    opt(sc, "--output", "ANTI_SUS_SCORE_OUTPUT", default="-", help="output file ('-': stdout)")
    opt(sc, "--batch-size", "ANTI_SUS_BATCH_SIZE", default=32, type=positive_int, help="images per request")
    _common(sc)

    t = sub.add_parser("tune", help="score labelled folders, print P/R/F1 per threshold, suggest thresholds, plot histograms")
    opt(t, "--good", "ANTI_SUS_TUNE_GOOD", type=Path, help="images the GMM should keep")
    opt(t, "--bad", "ANTI_SUS_TUNE_BAD", type=Path, help="images the GMM should drop")
    opt(t, "--watermarked", "ANTI_SUS_TUNE_WATERMARKED", type=Path, help="images the watermark stage should flag")
    opt(t, "--clean", "ANTI_SUS_TUNE_CLEAN", type=Path, help="images the watermark stage should pass")
    opt(t, "--target-precision", "ANTI_SUS_TUNE_TARGET_PRECISION", type=probability, help="GMM: best recall with at least this precision")
    opt(t, "--target-recall", "ANTI_SUS_TUNE_TARGET_RECALL", type=probability, help="GMM: best precision with at least this recall")
    opt(t, "--watermark-target-precision", "ANTI_SUS_TUNE_WATERMARK_TARGET_PRECISION", type=probability, help="watermark: best recall with at least this precision")
    opt(t, "--watermark-target-recall", "ANTI_SUS_TUNE_WATERMARK_TARGET_RECALL", type=probability, help="watermark: best precision with at least this recall")
    opt(t, "--plot", "ANTI_SUS_TUNE_PLOT", default="tune.png", type=Path, help="histogram PNG to write")
    opt(t, "--json", "ANTI_SUS_TUNE_JSON", type=Path, help="also write the report as JSON here")
    opt(t, "--batch-size", "ANTI_SUS_BATCH_SIZE", default=32, type=positive_int, help="images per model call")
    _models(t)
    _common(t)
    return ap


# -- commands ------------------------------------------------------------------------

def _load_pipeline(args: argparse.Namespace, gmm_threshold: float | None = None, watermark_threshold: float | None = None,
                   max_batch: int = 32) -> Any:
    from .pipeline import DEFAULT_WATERMARK_THRESHOLD, Pipeline

    # models_dir: the default var/models, or the old models/ folder with a notice to move it.
    return Pipeline.load(models_dir(args.models), int8=args.int8, no_watermark=args.no_watermark, threads=args.threads, max_batch=max_batch,
                         gmm_threshold=gmm_threshold,
                         watermark_threshold=DEFAULT_WATERMARK_THRESHOLD if watermark_threshold is None else watermark_threshold)


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %s: finishing the batch in flight, then stopping", signal.Signals(signum).name)
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from .observe import start_metrics
    from .server import FilterServer, ServerConfig
    from .wire import Limits

    if args.curve_allow and not args.curve_secret_key:
        raise UserError("--curve-allow needs --curve-secret-key")
    if args.connect and args.curve_secret_key:
        raise UserError("a broker worker (--connect) takes no CURVE keys: secure the broker's frontend instead "
                        "(anti-sus broker --curve-secret-key …) and keep its backend on a private network")
    pipeline = _load_pipeline(args, args.gmm_threshold, args.watermark_threshold, args.max_batch)
    cfg = ServerConfig(binds=list(args.bind), connect=args.connect, limits=Limits(args.max_images, args.max_pixels),
                       max_batch=args.max_batch, max_queue=max(args.max_queue, args.max_images),
                       max_queued_bytes=args.max_queued_bytes, hwm=args.hwm, credits=args.credits, heartbeat=args.heartbeat,
                       curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow, instance=args.instance)
    server = FilterServer(pipeline, cfg)
    try:
        server.bind()
    except zmq.ZMQError as exc:
        raise UserError(f"cannot {'connect to' if args.connect else 'bind'} {args.connect or ', '.join(args.bind)}: {exc}") from None
    if args.metrics_port:
        start_metrics(args.metrics_port, args.metrics_host)
    _on_signals(server.stop)
    server.serve_forever()
    if server.failure is not None:
        # Exit non-zero so a supervisor (compose, systemd, the stack launcher) restarts a server that cannot compute.
        print(f"anti-sus: error: {server.failure}; exiting", file=sys.stderr)
        return 1
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from .broker import Broker
    from .wire import Limits

    if args.curve_allow and not args.curve_secret_key:
        raise UserError("--curve-allow needs --curve-secret-key")
    broker = Broker(list(args.frontend), list(args.backend), limits=Limits(args.max_images, args.max_pixels), hwm=args.hwm,
                    worker_timeout=args.worker_timeout, curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow)
    _on_signals(broker.stop)
    broker.serve_forever()
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .security import keygen

    public, secret = keygen(args.directory, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private; give the .key file to the other side)")
    return 0


def _client_from(args: argparse.Namespace, endpoint: str, timeout: float, retries: int) -> Any:
    from .client import FilterClient

    if args.curve_client_key and not args.curve_server_key:
        raise UserError("--curve-client-key needs --curve-server-key")
    return FilterClient(endpoint, timeout=timeout, retries=retries,
                        curve_server_key=args.curve_server_key, curve_client_keys=args.curve_client_key)


def cmd_ping(args: argparse.Namespace) -> int:
    with _client_from(args, args.server, args.timeout, args.retries) as c:
        print(f"pong from {args.server} in {c.ping():.1f} ms")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client_from(args, args.server, args.timeout, args.retries) as c:
        info = c.info()
    info = {k: v for k, v in info.items() if k not in ("v", "ok", "id")}
    print(json.dumps(info, indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .score import expand, local_scorer, remote_scorer, score_files, write_rows

    files = expand(args.paths)
    if not files:
        raise UserError(f"no image files in {' '.join(args.paths)}")
    if args.server:
        client = _client_from(args, args.server, args.timeout, 1)
        scorer = remote_scorer(client, gmm_threshold=args.gmm_threshold, watermark_threshold=args.watermark_threshold)
    else:
        client = None
        scorer = local_scorer(_load_pipeline(args, args.gmm_threshold, args.watermark_threshold, args.batch_size))
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


def cmd_tune(args: argparse.Namespace) -> int:
    from .score import IMAGE_SUFFIXES, expand, local_scorer, score_files
    from .tune import format_report, plot, report

    gmm_sets = (args.good, args.bad)
    wm_sets = (args.watermarked, args.clean)
    if any(gmm_sets) and not all(gmm_sets) or any(wm_sets) and not all(wm_sets):
        raise UserError("give --good with --bad, and --watermarked with --clean")
    if not any(gmm_sets) and not any(wm_sets):
        raise UserError("nothing to tune: give --good and --bad, and/or --watermarked and --clean")
    # Every folder is checked before the models load, and a problem names the flag and the folder.
    folders: dict[str, list[Path]] = {}
    for flag, d in (("--good", args.good), ("--bad", args.bad), ("--watermarked", args.watermarked), ("--clean", args.clean)):
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
    pipeline = _load_pipeline(args, float("-inf"), None, args.batch_size)
    scorer = local_scorer(pipeline, watermark_all=True)

    def scores(flag: str, d: Path, column: int) -> list[float]:
        rows = score_files(folders[flag], scorer, args.batch_size, progress=sys.stderr.isatty())
        bad = [r for r in rows if r.verdict == "error"]
        if len(bad) == len(rows):
            raise UserError(f"{flag} {d}: none of its {len(rows)} image files could be read; first: {bad[0].path}: {bad[0].error}")
        vals = [r.gmm if column == 0 else r.watermark for r in rows if r.verdict != "error"]
        return [v for v in vals if v is not None]

    reports = []
    if all(gmm_sets):
        current = pipeline.details["gmm"].get("suggested_threshold")
        reports.append(report("gmm", "good", "bad", scores("--good", args.good, 0), scores("--bad", args.bad, 0), current=current,
                              target_precision=args.target_precision, target_recall=args.target_recall))
    if all(wm_sets):
        if not pipeline.has_watermark:
            raise UserError("no watermark model in the model directory (or --no-watermark): cannot tune the watermark threshold")
        reports.append(report("watermark", "watermarked", "clean", scores("--watermarked", args.watermarked, 1),
                              scores("--clean", args.clean, 1),
                              current=pipeline.watermark_threshold, target_precision=args.watermark_target_precision,
                              target_recall=args.watermark_target_recall))
    for rep in reports:
        print(format_report(rep))
    png = plot(reports, args.plot)
    print(f"histograms: {png}")
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in reports], indent=2, default=float) + "\n", "utf-8")
        print(f"report: {args.json}")
    return 0


COMMANDS = {"serve": cmd_serve, "broker": cmd_broker, "keygen": cmd_keygen, "ping": cmd_ping, "info": cmd_info,
            "score": cmd_score, "tune": cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anti-sus`` and ``python -m anti_sus``; returns the exit status."""
    import zmq

    from .client import AntiSusError, AntiSusUnavailable
    from .modeldir import ModelDirError
    from .security import CurveKeyError

    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        print(f"anti-sus: error: {exc}", file=sys.stderr)
        return 2
    from .observe import setup_logging

    setup_logging(getattr(args, "log_format", "text"), getattr(args, "log_level", "INFO"))
    try:
        check_endpoints(args)
        return COMMANDS[args.command](args)
    except (ModelDirError, UserError, CurveKeyError) as exc:
        print(f"anti-sus: error: {exc}", file=sys.stderr)
        return 2
    except AntiSusUnavailable as exc:
        print(f"anti-sus: {exc}", file=sys.stderr)
        return 1
    except AntiSusError as exc:
        print(f"anti-sus: server error {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        print(f"anti-sus: error: ZeroMQ: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"anti-sus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
