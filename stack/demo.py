"""The offline demo (``make demo``): the whole system on loopback in about a minute.

Builds tiny random-weight ONNX models (``models.tiny_onnx``: no torch needed),
starts the emulated internet (reddit, imgur, flickr, Wikimedia Commons, Bluesky's
Jetstream and image hosts over HTTPS on 127.0.0.1, with hostile cases), starts anti_sus and gallery_bridge, runs
``nomad once`` against the emulator with the SSRF guard on and no credentials
at all (every key-less source a new user gets: reddit's Atom feeds, flickr's
public feed, Commons and Bluesky), then prints what happened and the URL of the
gallery's web app (``gallery-bridge web``: the images, and the review page of
what anti_sus rejected). Run from a terminal it keeps the web app up until
Ctrl-C (``--serve``/``--no-serve``).

Nothing leaves the machine. The tiny models have random weights, so which
photos count as "good" is arbitrary; the point is to see every stage work.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from photocore.errors import UserError
from stack.procs import Service, free_port, python_module, stop_all, wait_until


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stack.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("demo-run"), help="where models, gallery, state and logs go (wiped first)")
    p.add_argument("--keep-models", action="store_true", help="reuse tiny models already in WORKDIR/models")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on `nomad once` after this many seconds")
    p.add_argument("--web-port", type=int, default=8780, help="loopback port of the web app (a free one when taken)")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the web app running after the demo until Ctrl-C (default: when run from a terminal)")
    return p


DEMO_GMM_PERCENTILE = "p50"
"""The GMM threshold the demo runs anti_sus with: its fit's median, not the usual 5th percentile. With
random-weight models almost every emulated photo passes the 5th, so nothing would be rejected and the
review page (what anti_sus threw away, to be labelled) would stay empty; this way a good part is."""


def demo_gmm_threshold(models: Path) -> list[str]:
    """``--gmm-threshold`` at the tiny GMM's ``DEMO_GMM_PERCENTILE``, or nothing when the fit does not say."""
    try:
        value = json.loads((models / "gmm.json").read_text("utf-8"))["score_percentiles"][DEMO_GMM_PERCENTILE]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return ["--gmm-threshold", f"{float(value):.4f}"]


def web_port(wanted: int) -> int:
    """``wanted`` when it is free on loopback, else any free port (a second demo, or `make up` running)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            return free_port()


def web_counts(url: str) -> tuple[int, int | None]:
    """(images in the gallery, review items) as the web app's own API reports them; None: no review queue."""
    with urllib.request.urlopen(url + "api/images?limit=1", timeout=30) as r:
        images = int(json.load(r)["total"])
    try:
        with urllib.request.urlopen(url + "api/review?limit=1", timeout=30) as r:
            reviews: int | None = int(json.load(r)["total"])
    except OSError:  # 503: a build without the review queue
        reviews = None
    return images, reviews


def web_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def say(msg: str) -> None:
    print(msg, flush=True)


def build_models(models: Path, keep: bool) -> None:
    if keep and (models / "manifest.json").is_file():
        say(f"  reusing tiny models in {models}")
        return
    # models.tiny_onnx, not models.tiny: the runtime install has onnx but no torch (the models extra).
    from models import tiny_onnx

    t = time.monotonic()
    tiny_onnx.build(models)
    say(f"  built tiny ONNX models in {models} ({time.monotonic() - t:.0f}s)")


def nomad_stats(state: Path) -> dict[str, Any]:
    out = subprocess.run(python_module("nomad", "stats", "--state-dir", str(state), "--json"),
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


KEYED = ("REDDIT_", "IMGUR_", "FLICKR_")
"""Credential variables the demo leaves out: it runs the key-less sources only."""

KEYLESS_SOURCES = ("reddit", "commons", "flickr", "bluesky")
"""Every source that works without an account; named explicitly, so a NOMAD_SOURCE in the shell cannot narrow the demo."""


def nomad_command(emu: Any, anti_sus: str, gallery: str, state: Path) -> list[str]:
    """``nomad once`` over the emulator with every key-less source."""
    sources = [a for name in KEYLESS_SOURCES for a in ("--source", name)]
    # Every anti_sus rejection goes to the review queue (--review-rate 1): a demo is small, the page should show them all.
    return python_module("nomad", "once", "--anti-sus", anti_sus, "--gallery", gallery, "--state-dir", str(state),
                         "--deadline", "8", "--batch-timeout", "2", "--review-rate", "1", *sources, *emu.nomad_args())


def nomad_environment(emu: Any) -> dict[str, str]:
    """This shell's environment without any site credential (a fresh machine), plus the emulator's NOMAD_CONTACT."""
    return {k: v for k, v in os.environ.items() if not k.startswith(KEYED)} | emu.nomad_env(keyless=True)


def sources_report(state: Path, env: dict[str, str]) -> str:
    """``nomad sources`` after the run: which key-less sources ran and what they last did."""
    out = subprocess.run(python_module("nomad", "sources", "--state-dir", str(state)), capture_output=True, text=True,
                         timeout=60, env=env)
    return "sources (no credentials set)\n" + "\n".join("  " + line for line in out.stdout.splitlines())


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def summary(stats: dict[str, Any], gallery: Path, emulated_posts: int) -> str:
    """The demo's closing report: outcomes by reason and the gallery page."""
    posts, images = stats.get("posts", {}), stats.get("images", {})
    accepted = images.get("accepted", 0) + images.get("delivered", 0)
    files = sorted((gallery / "images").glob("*")) if (gallery / "images").is_dir() else []
    rows = [
        ("emulated reddit posts", f"{emulated_posts} (plus the other sources' items)"),
        ("posts read", f"{sum(posts.values())} ({posts.get('expanded', 0)} with images; "
                       f"{posts.get('rejected', 0)} rejected: {_by_reason(stats.get('posts_rejected', {}))})"),
        ("image candidates", f"{sum(images.values())}"),
        ("accepted by anti_sus", f"{accepted} ({images.get('delivered', 0)} delivered to the gallery, outbox {stats.get('outbox', 0)})"),
        ("rejected", f"{images.get('rejected', 0)}: {_by_reason(stats.get('images_rejected', {}))}"),
        ("failed (retries spent)", f"{images.get('failed', 0)}: {_by_reason(stats.get('images_failed', {}))}"),
        ("gallery", f"{len(files)} image(s) in {gallery / 'images'}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append(f"\nthe static contact sheet: {(gallery / 'index.html').resolve().as_uri()}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from stack.emulator import Emulator

    work = args.workdir.resolve()
    models, gallery, state, logs = work / "models", work / "gallery", work / "state", work / "logs"
    for d in (gallery, state, logs):
        shutil.rmtree(d, ignore_errors=True)
    if not args.keep_models:
        shutil.rmtree(models, ignore_errors=True)
    for d in (models, gallery, state, logs):
        d.mkdir(parents=True, exist_ok=True)

    say("1/4 models")
    try:
        build_models(models, args.keep_models)
    except UserError as exc:  # onnx missing from an install made without the project's dependencies
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say("2/4 emulated internet (reddit, flickr, Wikimedia Commons, Bluesky, imgur, image hosts) on 127.0.0.1")
    svcs: list[Service] = []
    with Emulator() as emu:
        say(f"  https on 127.0.0.1:{emu.port}, {len(emu.scenario.posts)} posts, hostile cases included")
        a, g = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        say("3/4 anti_sus, gallery_bridge and the web app")
        url = f"http://127.0.0.1:{web_port(args.web_port)}/"
        svcs = [
            Service("anti_sus", python_module("anti_sus", "serve", "--models", str(models), "--bind", a,
                                              *demo_gmm_threshold(models)), logs / "anti_sus.log").start(),
            Service("gallery_bridge", python_module("gallery_bridge", "serve", "--bind", g, "--target", f"folder:{gallery}"), logs / "gallery_bridge.log").start(),
            Service("web", python_module("gallery_bridge", "web", "--gallery", str(gallery), "--connect", g, "--models",
                                         str(models), "--bind", url[7:-1]), logs / "web.log").start(),
        ]
        try:
            from stack.up import answers

            for svc, ep in zip(svcs, (a, g)):
                wait_until(lambda: answers(svc.name, ep) or not svc.running, 60, 0.3, f"{svc.name} to answer")
                if not svc.running:
                    say(f"error: {svc.name} did not start:\n{svc.tail()}")
                    return 1
            wait_until(lambda: web_ready(url) or not svcs[2].running, 60, 0.3, "the web app to answer")
            if not svcs[2].running:
                say(f"error: the web app did not start:\n{svcs[2].tail()}")
                return 1
            say("4/4 nomad once (one poll cycle, everything decided and delivered)")
            cmd = nomad_command(emu, a, g, state)
            # No accounts: whatever credentials this shell holds stay out, as on a fresh machine.
            env = nomad_environment(emu)
            t = time.monotonic()
            with open(logs / "nomad.log", "wb") as nlog:
                proc = subprocess.run(cmd, env=env, stdout=nlog, stderr=subprocess.STDOUT, timeout=args.timeout)
            say(f"  nomad finished in {time.monotonic() - t:.0f}s with exit code {proc.returncode} (log: {logs / 'nomad.log'})")
            if proc.returncode != 0:
                say((logs / "nomad.log").read_text("utf-8", "replace")[-3000:])
                return 1
            say("")
            say(summary(nomad_stats(state), gallery, len(emu.scenario.posts)))
            say(sources_report(state, env))
            images, reviews = web_counts(url)
            say(f"\nbrowse the gallery: {url}  ({images} images, "
                + ("no review queue in this build)" if reviews is None else f"{reviews} rejected images to review at {url}review)"))
            if args.serve if args.serve is not None else sys.stdout.isatty():
                say("the web app stays up until Ctrl-C (labels are written by gallery_bridge, which stays up too)")
                try:
                    while all(s.running for s in svcs[1:]):
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            return 0
        finally:
            stop_all(svcs)


if __name__ == "__main__":
    raise SystemExit(main())
