"""A real ``gallery-bridge serve`` in a subprocess for the crash tests: start it, send one request it dies in."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import zmq

from gallery_bridge.client import GalleryUnavailable, IngestClient
from gallery_bridge.ingest import CRASH_ENV

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(root: Path, port: int, crash_at: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``gallery-bridge serve`` on ``root`` (folder target), answering pings; ``crash_at`` arms a SIGKILL point."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    if crash_at:
        full[CRASH_ENV] = crash_at
    full.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gallery_bridge", "serve", "--bind", f"tcp://127.0.0.1:{port}", "--target", f"folder:{root}"],
        cwd=REPO, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    with IngestClient(f"tcp://127.0.0.1:{port}", timeout=0.3, retries=100) as client:
        try:
            client.ping()
        except GalleryUnavailable:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate(timeout=10)[1].decode()[-2000:]}")
    return proc


def send_and_wait_for_death(proc: subprocess.Popen, port: int, header: dict[str, Any], data: bytes) -> int:
    """Send one request (no reply will come) and wait for the process to kill itself; returns its exit code."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart([json.dumps({"v": 1, "id": "crash", **header}).encode(), data])
        code = proc.wait(timeout=60)
        assert not sock.poll(0), "a reply came although the process was killed before replying"
        return code
    finally:
        sock.close(0)
