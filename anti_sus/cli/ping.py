"""``anti-sus ping`` (health checks) and ``anti-sus info`` (a running server's models, thresholds and limits)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .options import add_client, add_logging, client_from


def add_ping_info(sub: Any) -> None:
    for name, helptext in (("ping", "exit 0 if the server answers (health checks)"),
                           ("info", "print the server's models, thresholds and limits")):
        p = sub.add_parser(name, help=helptext)
        add_client(p, 5.0)
        add_logging(p)


def cmd_ping(args: argparse.Namespace) -> int:
    with client_from(args, args.server, args.timeout, args.retries) as c:
        print(f"pong from {args.server} in {c.ping():.1f} ms")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with client_from(args, args.server, args.timeout, args.retries) as c:
        info = c.info()
    info = {k: v for k, v in info.items() if k not in ("v", "ok", "id")}
    print(json.dumps(info, indent=2))
    return 0
