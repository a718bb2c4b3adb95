"""The emulated sites for tests/test_scale_netns.py, run as a process inside the nomad namespace:

    python -m tests.netns_emulator --posts 48 --out nomad.json

A reddit listing of ``--posts`` distinct 1600x1200 photos (every one passes nomad's rules). It
binds the namespace's own loopback, so only processes in that namespace can reach it, writes the
flags and variables nomad needs to ``--out`` as JSON, and serves until SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from stack.emulator import Emulator, Scenario

SIZE = (1600, 1200)


def scenario(posts: int):
    """``port -> Scenario``: ``posts`` photo posts, ids ``sc0000``…"""
    def make(port: int) -> Scenario:
        s = Scenario(port)
        for i in range(posts):
            url = s.add_image("i.redd.it", f"scale{i:04d}.jpeg", *SIZE, seed=1000 + i)
            s.add_post(f"sc{i:04d}", url, expected="accept_candidate", preview=SIZE, subreddit="EarthPorn")
        return s
    return make


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=48)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with Emulator(scenario(a.posts)) as emu:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": emu.nomad_args(), "env": emu.nomad_env()}))
        tmp.replace(a.out)
        done.wait(600)  # bounded: a test that forgets it still ends
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
