"""``anti-sus reload``: a running server (or a broker and its workers) loads its model directory again and swaps to it."""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_client, add_logging, client_from


def add_reload(sub: Any) -> None:
    p = sub.add_parser("reload", help="make a running server (or a broker's workers, one at a time) reload their models")
    add_client(p, 120.0)  # loading and verifying the models takes a while; a broker reloads its workers in turn
    add_logging(p)


def cmd_reload(args: argparse.Namespace) -> int:
    with client_from(args, args.server, args.timeout, args.retries) as c:
        reply = c.reload()
    workers = reply.get("workers")
    if isinstance(workers, list):
        for w in workers:
            print(f"worker {w.get('worker')}: generation {w.get('generation')}, manifest {str(w.get('manifest_sha256'))[:12]}")
        print(f"reloaded {len(workers)} worker(s) behind {args.server}")
    else:
        print(f"reloaded {args.server}: generation {reply.get('generation')}, manifest "
              f"{str(reply.get('manifest_sha256'))[:12]} from {reply.get('models_dir')}")
    return 0
