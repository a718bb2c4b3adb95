"""photocore.observe: text or JSON log lines, Prometheus metrics on a loopback port."""
from __future__ import annotations

import json
import logging
import socket
import urllib.request

import pytest

from photocore.observe import JsonFormatter, setup_logging, start_metrics


def test_json_lines_carry_extras_and_exceptions() -> None:
    rec = logging.makeLogRecord({"name": "svc", "levelname": "WARNING", "msg": "hello %s", "args": ("x",), "key": "k1"})
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "hello x" and line["level"] == "warning" and line["logger"] == "svc" and line["key"] == "k1"
    assert line["ts"].endswith("Z")


def test_setup_logging_formats(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("json", "debug")
        logging.getLogger("photocore.t").debug("one", extra={"n": 1})
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(err)["n"] == 1 and root.level == logging.DEBUG
        setup_logging("text", "INFO")
        logging.getLogger("photocore.t").info("two")
        assert "INFO photocore.t: two" in capsys.readouterr().err
        assert len(root.handlers) == 1
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def test_start_metrics_serves_prometheus_on_loopback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_metrics(None)  # off: nothing happens
    start_metrics(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "python_info" in body or "process_" in body
