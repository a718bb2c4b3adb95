"""``python -m tests.emulator``: run the emulator until Ctrl-C, printing the flags nomad needs."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import threading

from . import Emulator


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.emulator", description=__doc__)
    ap.add_argument("--port", type=int, default=int(os.environ.get("NOMAD_EMULATOR_PORT", "0")),
                    help="port on 127.0.0.1 (0: random) [env NOMAD_EMULATOR_PORT]")
    ap.add_argument("--rate-limit", type=int, default=int(os.environ.get("NOMAD_EMULATOR_RATE_LIMIT", "100")),
                    help="reddit requests per window per client [env NOMAD_EMULATOR_RATE_LIMIT]")
    ap.add_argument("--rate-window", type=float, default=float(os.environ.get("NOMAD_EMULATOR_RATE_WINDOW", "600")),
                    help="reddit rate-limit window in seconds [env NOMAD_EMULATOR_RATE_WINDOW]")
    args = ap.parse_args()
    try:
        emu = Emulator(rate_limit=args.rate_limit, rate_window=args.rate_window, port=args.port)
    except OSError as exc:
        print(f"cannot start the emulator: {exc}")
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
