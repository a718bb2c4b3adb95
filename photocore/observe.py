"""Logging and metrics setup of every service (nomad, anti_sus, gallery_bridge, stack, models).

One log line per event, as text or JSON (``--log-format json``) for log shippers;
Prometheus metrics on ``--metrics-port`` through prometheus_client. Credentials
are masked by adding :class:`photocore.redact.RedactingFilter` to the handlers
(``photocore.redact.install()``) after :func:`setup_logging`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger for a service: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def start_metrics(port: int | None, host: str = "127.0.0.1") -> None:
    """Serve Prometheus metrics on ``host:port`` (loopback by default); no-op when port is None/0."""
    if not port:
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, port)
