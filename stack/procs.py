"""Start, watch and stop the services as child processes.

Used by the local launcher (``make up``), the offline demo and the end-to-end
tests, so all three start the services the same way the docker-compose file does.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

log = logging.getLogger("stack")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args…`` with this interpreter (same venv as the caller)."""
    return [sys.executable, "-m", module, *args]


def _tee(stream: IO[bytes], lines: "collections.deque[str]") -> None:
    """Copy a child's stderr to ours line by line, keeping the last lines for error messages."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    for raw in iter(stream.readline, b""):
        lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        try:
            if out is not None:
                out.write(raw)
                out.flush()
            else:
                sys.stderr.write(raw.decode("utf-8", "replace"))
        except (OSError, ValueError):  # our stderr closed: keep draining so the child never blocks
            out = None
    stream.close()


@dataclass
class Service:
    """One child process: its command, its log file and restart bookkeeping.

    Without a log file the child's stderr is copied to ours and its last
    ``tail_lines`` lines are kept, so a start-up failure can be quoted.
    """

    name: str
    argv: list[str]
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    tail_lines: int = 30
    _log: IO[bytes] | None = None
    _stderr: "collections.deque[str]" = field(default_factory=collections.deque)
    _reader: threading.Thread | None = None

    def start(self) -> "Service":
        """Start (or restart) the process; stdout and stderr go to its log file."""
        self._close_log()  # a restart reopens it
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        tee = self._log is None
        # Own process group: a Ctrl-C on the terminal reaches the launcher only,
        # which then stops the children in order.
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log if self._log else None,
            stderr=subprocess.STDOUT if self._log else subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        if tee:
            self._stderr = collections.deque(maxlen=self.tail_lines)
            self._reader = threading.Thread(target=_tee, args=(self.proc.stderr, self._stderr),
                                            name=f"{self.name}-stderr", daemon=True)
            self._reader.start()
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

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
        self._close_log()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        """The end of the service's log (or of its stderr when it has no log file), for error messages."""
        if self.log_path is None:
            if self._reader is not None and self.proc is not None and self.proc.poll() is not None:
                # The child is gone: let the reader drain the pipe so its last words are included.
                self._reader.join(timeout=2.0)
            return "\n".join(list(self._stderr)[-lines:])
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])


def wait_until(check: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition") -> None:
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
