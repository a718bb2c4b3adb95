"""A load generator for bench/scale.py and tests/test_scale_netns.py, run as its own process (inside a
network namespace):

    python -m bench.netns_load --server tcp://10.77.3.1:7777 --seconds 8 --clients 4 --batch 8

Each client thread sends filter requests of ``--batch`` random ``--size``² images back to back for
``--seconds`` (after ``--warmup`` seconds that are not counted) and the totals are printed as one
JSON line: images, seconds, images per second, errors, and the images of the whole run (warm-up included). Small images keep the wire cheap while the
workers' cost stays the same (every image is resized to the models' inputs), so the figure measures
the workers, not the network.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterClient


def run(server: str, seconds: float, warmup: float, clients: int, batch: int, size: int, timeout: float) -> dict[str, float]:
    """Drive the server with ``clients`` threads; images done per second within the measured window."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    start = time.monotonic()
    measure_from, end = start + warmup, start + warmup + seconds
    counted = [0] * clients
    total = [0] * clients  # warm-up included, for figures per CPU-second of the workers
    errors = [0] * clients

    def client(k: int) -> None:
        with FilterClient(server, timeout=timeout, retries=2) as c:
            while time.monotonic() < end:
                try:
                    c.filter(images, gmm_threshold=-1e30)
                except (AntiSusError, AntiSusUnavailable):
                    errors[k] += 1
                    continue
                total[k] += batch
                if measure_from <= time.monotonic() <= end:
                    counted[k] += batch

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + warmup + 4 * timeout + 10)
    return {"images": sum(counted), "seconds": seconds, "rate": sum(counted) / seconds, "errors": sum(errors),
            "images_total": sum(total)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    print(json.dumps(run(a.server, a.seconds, a.warmup, a.clients, a.batch, a.size, a.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
