"""The main job: run the whole system locally with one command (``make up``).

Makes sure the models exist (``stack.ensure_models``), starts anti_sus and
gallery_bridge on loopback, waits until both answer, then starts the gallery's
web app (``gallery-bridge web`` on http://127.0.0.1:8780/) and nomad mining
reddit /r/all (new) into the gallery folder. A service that dies is restarted
with backoff (1 s, doubling per crash in a row up to 60 s; a child that
stayed up a minute starts again at 1 s); one Ctrl-C (or SIGTERM) stops nomad
first (it flushes what it holds), then gallery_bridge, then anti_sus.
"""
from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from photocore.observe import setup_logging
from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import Parser, Settings, UserError, port
from stack import ensure_models
from stack.procs import Service, python_module, stop_all

log = logging.getLogger("stack.up")


PREFIX = "STACK_"


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """``python -m stack.up``'s flags, each also a ``STACK_…`` variable (:mod:`photocore.settings`)."""
    p = Parser(
        prog="python -m stack.up",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to `nomad run` unchanged (e.g. -- --listing r/EarthPorn/new).",
    )
    s = Settings(p, PREFIX, environ)
    s.add("--models", type=Path, default=Path(DEFAULT_MODELS_DIR),
          help="model directory (an old models/ folder with a manifest is still read, with a notice)")
    s.add("--gallery", type=Path, default=Path("gallery"), help="gallery folder")
    s.add("--state-dir", type=Path, default=Path("state"), help="nomad state and launcher logs")
    s.add("--anti-sus-port", type=port, default=7777, help="loopback port of anti_sus")
    s.add("--gallery-port", type=port, default=7778, help="loopback port of gallery_bridge")
    s.add("--web-port", type=port, default=8780, help="loopback port of the gallery's web app (gallery-bridge web)")
    s.switch("--skip-models", default=False, negatable=False,
             help="do not build missing models (anti_sus then refuses to start if any is missing)")
    s.add("--log-format", choices=["text", "json"], default="text", help="log format of every service")
    ensure_models.add_model_flags(p)
    return p


# Each server gets a fresh random token in this variable and echoes it (with its
# pid) in its ``info`` reply, so the launcher knows the answer comes from its own child.
INSTANCE_ENV = {"anti_sus": "ANTI_SUS_INSTANCE", "gallery_bridge": "GALLERY_BRIDGE_INSTANCE"}
PORT_FLAG = {"anti_sus": "--anti-sus-port", "gallery_bridge": "--gallery-port"}


def services(args: argparse.Namespace, nomad_args: Sequence[str]) -> list[Service]:
    """The four services, commanded like docker-compose.yml does (on loopback; the web app started third)."""
    a = f"tcp://127.0.0.1:{args.anti_sus_port}"
    g = f"tcp://127.0.0.1:{args.gallery_port}"
    fmt = ["--log-format", args.log_format]
    return [
        Service("anti_sus", python_module("anti_sus", "serve", "--models", str(args.models), "--bind", a, *fmt)),
        Service("gallery_bridge", python_module("gallery_bridge", "serve", "--bind", g, "--target", f"folder:{args.gallery}", *fmt)),
        Service("nomad", python_module("nomad", "run", "--anti-sus", a, "--gallery", g, "--state-dir", str(args.state_dir), *fmt, *nomad_args)),
        Service("web", python_module("gallery_bridge", "web", "--gallery", str(args.gallery), "--bind",
                                     f"127.0.0.1:{args.web_port}", "--connect", g, "--models", str(args.models), *fmt)),
    ]


def start(svc: Service) -> Service:
    """Start (or restart) ``svc``, a server getting a new instance token each time."""
    var = INSTANCE_ENV.get(svc.name)
    if var is not None:
        svc.env[var] = secrets.token_hex(16)
    return svc.start()


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


def info(kind: str, endpoint: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The ``info`` reply of whatever answers at ``endpoint``, or None when nothing answers."""
    try:
        if kind == "anti_sus":
            from anti_sus.client import FilterClient

            with FilterClient(endpoint, timeout=timeout, retries=0) as c:
                reply = c.info()
        else:
            from gallery_bridge.client import IngestClient

            with IngestClient(endpoint, timeout=timeout, retries=0) as c:
                reply = c.info()
    except Exception:  # noqa: BLE001 - not up yet, or not a server of ours at all
        return None
    return reply if isinstance(reply, dict) else None


def is_ours(svc: Service, reply: dict[str, Any]) -> bool:
    """True when an ``info`` reply comes from ``svc``'s own child: same instance token, same pid.

    A reply without the token is from a server that was not started by us (or
    predates the token), so it is not ours.
    """
    token = svc.env.get(INSTANCE_ENV[svc.name])
    if reply.get("instance") != token:
        return False
    return reply.get("pid") is None or reply.get("pid") == svc.pid


def _quote(text: str) -> str:
    return "\n".join(f"  | {line}" for line in text.splitlines())


def wait_ready(svc: Service, endpoint: str, port: int, stop_flag: list[bool], timeout: float = 120.0,
               interval: float = 0.5) -> str | None:
    """Wait until ``svc``'s own child answers at ``endpoint``; an error message when it cannot.

    Fails fast when the child exits during start-up (quoting its last stderr
    lines, e.g. "Address already in use") or when someone else answers on the port.
    """
    deadline = time.monotonic() + timeout
    while not stop_flag[0]:
        alive = svc.running
        reply = info(svc.name, endpoint)
        if reply is not None and is_ours(svc, reply):
            log.info("%s is up (pid %d) on %s", svc.name, svc.pid, endpoint)
            return None
        if reply is not None or not alive:
            lines = []
            if reply is not None:
                pid = reply.get("pid", "unknown")
                lines.append(f"port {port} is answered by another {svc.name} (pid {pid}), not ours: "
                             f"stop it or choose {PORT_FLAG[svc.name]}")
            if not svc.running:
                tail = svc.tail(10)
                lines.append(f"{svc.name} exited during start-up with code {svc.returncode}"
                             + (f"; its last messages:\n{_quote(tail)}" if tail else " and said nothing"))
            return "\n".join(lines)
        if time.monotonic() >= deadline:
            return f"{svc.name} did not answer on {endpoint} within {timeout:.0f}s"
        time.sleep(interval)
    return None


def supervise(svcs: list[Service], stop_flag: list[bool], *, base_backoff: float = 1.0, max_backoff: float = 60.0,
              stable_after: float = 60.0, poll: float = 0.5) -> None:
    """Restart any service that exits on its own until asked to stop.

    The wait before a restart doubles with each crash in a row
    (``base_backoff``, 2x, 4x … up to ``max_backoff``); a child that stayed up
    ``stable_after`` seconds before it died starts the count again.
    """
    next_start: dict[str, float] = {}
    crashes: dict[str, int] = {svc.name: 0 for svc in svcs}
    while not stop_flag[0]:
        now = time.monotonic()
        for svc in svcs:
            if svc.name in next_start:
                if now >= next_start[svc.name]:
                    del next_start[svc.name]
                    svc.restarts += 1
                    start(svc)
                continue
            if svc.running:
                continue
            uptime = now - svc.started_at
            if uptime >= stable_after:
                crashes[svc.name] = 0
            delay = min(max_backoff, base_backoff * 2.0 ** min(crashes[svc.name], 30))
            crashes[svc.name] += 1
            last = svc.tail(1)
            log.error("%s exited with code %s after %.1fs%s; restarting in %.1fs (crash %d in a row)", svc.name,
                      svc.returncode, uptime, f" (last message: {last})" if last else "", delay, crashes[svc.name])
            next_start[svc.name] = now + delay
        # Sleep until the next check or the next due restart, whichever comes first.
        wake = min([poll] + [t - time.monotonic() for t in next_start.values()])
        time.sleep(max(0.01, wake))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    nomad_extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, nomad_extra = argv[:i], argv[i + 1:]
    try:
        args = parser().parse_args(argv)
    except UserError as exc:  # a bad STACK_… variable
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    setup_logging(args.log_format)
    # Built models live in var/models; an old models/ folder is still read, with a notice to move it.
    args.models = models_dir(args.models)
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
        for svc, port in zip(svcs[:2], (args.anti_sus_port, args.gallery_port)):
            start(svc)
            error = wait_ready(svc, f"tcp://127.0.0.1:{port}", port, stop_flag)
            if error is not None:
                print(f"error: {error}", file=sys.stderr)
                return 1
            if stop_flag[0]:
                return 0
        start(svcs[3])
        start(svcs[2])
        log.info("mining into %s; browse it on http://127.0.0.1:%d/ (Ctrl-C stops everything)", args.gallery, args.web_port)
        supervise(svcs, stop_flag)
        return 0
    finally:
        stop_all([s for s in svcs if s.proc is not None])


if __name__ == "__main__":
    raise SystemExit(main())
