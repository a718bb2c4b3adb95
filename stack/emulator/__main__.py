"""Run the loopback emulator until Ctrl-C, printing the environment and flags nomad needs."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import threading
from typing import Callable

from . import Emulator


def _env_default(name: str, kind: Callable[[str], object], fallback: object, ap: argparse.ArgumentParser) -> object:
    raw = os.environ.get(name)
    if not raw:
        return fallback
    try:
        return kind(raw)
    except ValueError:
        ap.error(f"environment variable {name}={raw!r} is not a valid {kind.__name__}")
    return fallback  # unreachable: ap.error exits


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.emulator", description=__doc__)
    ap.add_argument("--port", type=int, default=_env_default("NOMAD_EMULATOR_PORT", int, 0, ap),
                    help="port on 127.0.0.1, 0 for a random one (default: 0) [env NOMAD_EMULATOR_PORT]")
    ap.add_argument("--rate-limit", type=int, default=_env_default("NOMAD_EMULATOR_RATE_LIMIT", int, 100, ap),
                    help="reddit requests per window per client (default: 100) [env NOMAD_EMULATOR_RATE_LIMIT]")
    ap.add_argument("--rate-window", type=float, default=_env_default("NOMAD_EMULATOR_RATE_WINDOW", float, 600.0, ap),
                    help="reddit rate-limit window in seconds (default: 600) [env NOMAD_EMULATOR_RATE_WINDOW]")
    args = ap.parse_args()
    try:
        emu = Emulator(rate_limit=args.rate_limit, rate_window=args.rate_window, port=args.port)
    except OSError as exc:
        print(f"cannot start the emulator on 127.0.0.1:{args.port}: {exc}")
        return 1
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with emu:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in emu.nomad_env().items())
        print(f"emulator on 127.0.0.1:{emu.port} ({len(emu.scenario.posts)} posts); run nomad with:\n")
        print(f"{env} nomad once {shlex.join(emu.nomad_args())}\n", flush=True)
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
