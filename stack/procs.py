"""Start, watch and stop the services as child processes.

Used by the local launcher (``make up``), the offline demo and the end-to-end
tests, so all three start the services the same way the docker-compose file does.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

log = logging.getLogger("stack")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args…`` with this interpreter (same venv as the caller)."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Service:
    """One child process: its command, its log file and restart bookkeeping."""

    name: str
    argv: list[str]
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    _log: IO[bytes] | None = None

    def start(self) -> "Service":
        """Start (or restart) the process; stdout and stderr go to its log file."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        # Own process group: a Ctrl-C on the terminal reaches the launcher only,
        # which then stops the children in order.
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log if self._log else None,
            stderr=subprocess.STDOUT if self._log else None,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL: the fault the tests inject."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        """The end of the service's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])


def wait_until(check, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    """Poll ``check()`` until it is true or ``timeout`` seconds pass (then TimeoutError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_all(services: Sequence[Service]) -> None:
    """Stop services in reverse start order (the crawler first, then what it feeds)."""
    for svc in reversed(services):
        svc.stop()
