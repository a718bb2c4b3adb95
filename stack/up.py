"""The main job: run the whole system locally with one command (``make up``).

Makes sure the models exist (``stack.ensure_models``), starts anti_sus and
gallery_bridge on loopback, waits until both answer, then starts nomad mining
reddit /r/all (new) into the gallery folder. A service that dies is restarted
with backoff; one Ctrl-C (or SIGTERM) stops nomad first (it flushes what it
holds), then gallery_bridge, then anti_sus.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from anti_sus.observe import setup_logging
from stack import ensure_models
from stack.procs import Service, python_module, stop_all, wait_until

log = logging.getLogger("stack.up")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stack.up",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to `nomad run` unchanged (e.g. -- --listing r/EarthPorn/new).",
    )
    p.add_argument("--models", type=Path, default=Path(_env("STACK_MODELS", "models")), help="model directory [env STACK_MODELS]")
    p.add_argument("--gallery", type=Path, default=Path(_env("STACK_GALLERY", "gallery")), help="gallery folder [env STACK_GALLERY]")
    p.add_argument("--state-dir", type=Path, default=Path(_env("STACK_STATE_DIR", "state")), help="nomad state and launcher logs [env STACK_STATE_DIR]")
    p.add_argument("--anti-sus-port", type=int, default=int(_env("STACK_ANTI_SUS_PORT", "7777")), help="loopback port of anti_sus [env STACK_ANTI_SUS_PORT]")
    p.add_argument("--gallery-port", type=int, default=int(_env("STACK_GALLERY_PORT", "7778")), help="loopback port of gallery_bridge [env STACK_GALLERY_PORT]")
    p.add_argument("--skip-models", action="store_true", help="do not build missing models (anti_sus then refuses to start if any is missing)")
    p.add_argument("--log-format", choices=["text", "json"], default=_env("STACK_LOG_FORMAT", "text"), help="log format of every service [env STACK_LOG_FORMAT]")
    ensure_models.add_model_flags(p)
    return p


def services(args: argparse.Namespace, nomad_args: Sequence[str]) -> list[Service]:
    """The three services, commanded exactly like docker-compose.yml does (on loopback)."""
    a = f"tcp://127.0.0.1:{args.anti_sus_port}"
    g = f"tcp://127.0.0.1:{args.gallery_port}"
    fmt = ["--log-format", args.log_format]
    return [
        Service("anti_sus", python_module("anti_sus", "serve", "--models", str(args.models), "--bind", a, *fmt)),
        Service("gallery_bridge", python_module("gallery_bridge", "serve", "--bind", g, "--target", f"folder:{args.gallery}", *fmt)),
        Service("nomad", python_module("nomad", "run", "--anti-sus", a, "--gallery", g, "--state-dir", str(args.state_dir), *fmt, *nomad_args)),
    ]


def answers(kind: str, endpoint: str) -> bool:
    """True when the service at ``endpoint`` answers a ping."""
    if kind == "anti_sus":
        from anti_sus.client import FilterClient

        with FilterClient(endpoint, timeout=1.0, retries=0) as c:
            try:
                c.ping()
                return True
            except Exception:  # noqa: BLE001 - not up yet, whatever the reason
                return False
    from gallery_bridge.client import IngestClient

    with IngestClient(endpoint, timeout=1.0, retries=0) as c:
        try:
            c.ping()
            return True
        except Exception:  # noqa: BLE001
            return False


def supervise(svcs: list[Service], stop_flag: list[bool], max_backoff: float = 60.0) -> None:
    """Restart any service that exits on its own, with exponential backoff, until asked to stop."""
    next_start: dict[str, float] = {}
    while not stop_flag[0]:
        now = time.monotonic()
        for svc in svcs:
            if svc.running:
                continue
            if svc.name not in next_start:
                code = svc.proc.returncode if svc.proc else None
                delay = min(max_backoff, 2.0 ** min(svc.restarts, 6))
                log.error("%s exited with code %s; restarting in %.0fs", svc.name, code, delay)
                next_start[svc.name] = now + delay
            elif now >= next_start.pop(svc.name):
                svc.restarts += 1
                svc.start()
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    nomad_extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, nomad_extra = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    setup_logging(args.log_format)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    args.gallery.mkdir(parents=True, exist_ok=True)
    if not args.skip_models:
        try:
            ensure_models.ensure(args)
        except ensure_models.EnsureError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    stop_flag = [False]

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping nomad, gallery_bridge, anti_sus", signal.Signals(signum).name)
        stop_flag[0] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    svcs = services(args, nomad_extra)
    try:
        for svc, endpoint in zip(svcs[:2], (f"tcp://127.0.0.1:{args.anti_sus_port}", f"tcp://127.0.0.1:{args.gallery_port}")):
            svc.start()
            wait_until(lambda: answers(svc.name, endpoint) or not svc.running or stop_flag[0], 120, 0.5, f"{svc.name} to answer")
            if not svc.running:
                print(f"error: {svc.name} stopped at start (exit code {svc.proc.returncode if svc.proc else '?'}); see its messages above", file=sys.stderr)
                return 1
            if stop_flag[0]:
                return 0
        svcs[2].start()
        log.info("mining into %s (index: %s); Ctrl-C stops everything", args.gallery, args.gallery / "index.html")
        supervise(svcs, stop_flag)
        return 0
    finally:
        stop_all([s for s in svcs if s.proc is not None])


if __name__ == "__main__":
    raise SystemExit(main())
