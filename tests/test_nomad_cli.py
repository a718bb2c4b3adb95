"""The nomad command line: flags and env vars, stats, clear errors, and `nomad run` stopping on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nomad.cli import build_parser, main
from nomad.sources.base import Candidate, ImageRef
from nomad.store import Store
from stack.procs import Service, free_port, python_module
from stack.emulator import Emulator

pytestmark = pytest.mark.timeout(240)


def test_every_flag_names_its_env_var() -> None:
    parser = build_parser({})
    for sub in ("run", "once", "stats", "sources", "retry-dead"):
        action = next(a for a in parser._subparsers._group_actions if a.choices)  # type: ignore[union-attr]
        sp = action.choices[sub]
        for act in sp._actions:
            if act.option_strings and act.dest not in ("help", "json"):
                assert "[env NOMAD_" in (act.help or ""), (sub, act.option_strings)
    help_text = subprocess.run([sys.executable, "-m", "nomad", "once", "--help"], capture_output=True, text=True).stdout
    assert "NOMAD_BATCH_SIZE" in help_text and "NOMAD_REDDIT_URL" in help_text and "default: 64]" in " ".join(help_text.split())
    for name in ("NOMAD_MAX_DELIVERY_ATTEMPTS", "NOMAD_GALLERY_SERVER_KEY", "NOMAD_GALLERY_CLIENT_KEY"):
        assert name in help_text


def test_env_vars_set_defaults_and_flags_win() -> None:
    env = {"NOMAD_BATCH_SIZE": "7", "NOMAD_LISTING": "r/pics/new,r/EarthPorn/new", "NOMAD_SKIP_NSFW": "0",
           "NOMAD_RESOLVE": "a.example:443:127.0.0.1 b.example:443:127.0.0.1"}
    from nomad.config import many

    args = build_parser(env).parse_args(["once"])
    assert args.batch_size == 7 and args.skip_nsfw is False
    assert many(args, "listing") == ["r/pics/new", "r/EarthPorn/new"]
    assert many(args, "resolve") == ["a.example:443:127.0.0.1", "b.example:443:127.0.0.1"]
    args = build_parser(env).parse_args(["once", "--batch-size", "9", "--listing", "r/all/new"])
    assert args.batch_size == 9 and many(args, "listing") == ["r/all/new"]


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nomad", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["once", "--batch-size", "0"], {}, "must be >= 1"),
        (["once"], {"NOMAD_BATCH_SIZE": "lots"}, "NOMAD_BATCH_SIZE"),
        (["once", "--ca-bundle", "/nonexistent/ca.pem"], {}, "ca-bundle"),
        (["once", "--resolve", "nonsense"], {}, "--resolve"),
        (["once"], {"REDDIT_CLIENT_ID": "only-the-id"}, "REDDIT_CLIENT_SECRET"),
        (["stats", "--state-dir", "/nonexistent/state"], {}, "no state DB"),
        # Thresholds follow anti_sus's own rules: a probability in [0, 1], a finite GMM level.
        (["once", "--watermark-threshold", "2"], {}, "must be within [0, 1]"),
        (["once", "--watermark-threshold=-0.1"], {}, "must be within [0, 1]"),
        (["once", "--gmm-threshold", "nan"], {}, "must be a finite number"),
        (["once", "--gmm-threshold", "inf"], {}, "must be a finite number"),
        (["once"], {"NOMAD_WATERMARK_THRESHOLD": "2"}, "NOMAD_WATERMARK_THRESHOLD"),
        (["once"], {"NOMAD_GMM_THRESHOLD": "nan"}, "NOMAD_GMM_THRESHOLD"),
        # The shared settings layer: strict booleans, endpoints with a hint, secret files.
        (["once"], {"NOMAD_SKIP_NSFW": "maybe"}, "NOMAD_SKIP_NSFW"),
        (["stats"], {"NOMAD_METRICS_PORT": "70000"}, "NOMAD_METRICS_PORT"),
        (["once", "--anti-sus", "127.0.0.1:7777"], {}, "did you mean tcp://127.0.0.1:7777?"),
        (["once"], {"NOMAD_GALLERY": "localhost:7778"}, "did you mean tcp://localhost:7778?"),
        (["once", "--http-retries", "-1"], {}, "must be >= 0"),
        (["once"], {"REDDIT_CLIENT_ID_FILE": "/nonexistent/id", "REDDIT_CLIENT_SECRET": "s"}, "REDDIT_CLIENT_ID_FILE"),
    ],
)
def test_user_errors_are_one_clear_line_not_a_traceback(argv: list[str], env: dict[str, str], message: str, tmp_path: Path) -> None:
    if "--state-dir" not in argv:
        argv = [*argv, "--state-dir", str(tmp_path / "state")]
    proc = run_cli(*argv, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_stats_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Store(tmp_path) as s:
        s.record_post(Candidate("reddit", "t3_a"), "expanded")
        s.record_post(Candidate("reddit", "t3_b"), "rejected", reason="nsfw")
        s.add_image(ImageRef("reddit:t3_a:0", "https://i.redd.it/a.jpg"), "t3_a", state="rejected", reason="too_small")
    assert main(["stats", "--state-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["posts"] == {"expanded": 1, "rejected": 1} and data["images_rejected"] == {"too_small": 1}
    assert main(["stats", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"posts_rejected\s+nsfw=1", out)


def _cycles(metrics: str) -> float:
    """``nomad_cycles_total`` from a Prometheus text page (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith("nomad_cycles_total "):
            return float(line.split()[1])
    return 0.0


def test_run_polls_serves_metrics_and_stops_on_sigterm(tiny_models: Path, tmp_path: Path) -> None:
    a_ep, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    anti = Service("anti_sus", python_module("anti_sus", "serve", "--models", str(tiny_models), "--bind", a_ep, "--threads", "1"),
                   log_path=tmp_path / "anti_sus.log").start()
    with Emulator() as emu:
        cmd = python_module(
            "nomad", "run", *emu.nomad_args(), "--interval", "2", "--state-dir", str(tmp_path / "state"),
            "--save-dir", str(tmp_path / "out"), "--anti-sus", a_ep, "--anti-sus-timeout", "5",
            "--gmm-threshold=-1e30", "--watermark-threshold=1.0", "--deadline", "2", "--http-retries", "0",
            "--metrics-port", str(port), "--batch-timeout", "1",
        )
        nomad = subprocess.Popen(cmd, env={**os.environ, **emu.nomad_env()}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            metrics = ""
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                time.sleep(1)
                try:
                    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                except OSError:
                    continue
                # Two cycles finished: the second saw no new post (the metric, not a guess at timing).
                if 'nomad_images_total{outcome="delivered"' in metrics and _cycles(metrics) >= 2:
                    break
            nomad.send_signal(signal.SIGTERM)
            _, err = nomad.communicate(timeout=60)
        finally:
            if nomad.poll() is None:
                nomad.kill()
            anti.stop()
    assert nomad.returncode == 0, err[-3000:]
    assert _cycles(metrics) >= 2 and "nomad_last_cycle_end_time_seconds" in metrics
    assert 'nomad_posts_total{outcome="expanded"}' in metrics and 'nomad_images_total{outcome="rejected",reason="too_small"}' in metrics
    assert err.count("cycle: posts_seen=") >= 2  # one line per cycle; the second cycle saw no new post
    assert "new_posts=0" in err
    with Store(tmp_path / "state") as s:
        assert s.outbox_size() == 0 and list(s.spool_dir.iterdir()) == []
        assert s.stats()["images"].get("delivered", 0) >= 10
    assert len(list((tmp_path / "out").glob("*.json"))) >= 10


def test_once_with_unreachable_reddit_says_so(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc = run_cli("once", "--source", "reddit", "--reddit-url", f"http://127.0.0.1:{port}", "--allow-private-addresses",
                   "--connect-timeout", "1", "--reddit-retries", "0", "--state-dir", str(tmp_path / "state"), "--save-dir", str(tmp_path / "out"),
                   env={"REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": ""})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "could not read any listing" in proc.stderr and "Traceback" not in proc.stderr


def test_once_offline_with_a_wait_limit_exits_3_not_0(tmp_path: Path) -> None:
    """Nothing answers, and the wait limit cuts the listing's retry backoff: unfinished (3), never success."""
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = run_cli("once", "--reddit-url", f"http://127.0.0.1:{port}", "--allow-private-addresses",
                   "--connect-timeout", "1", "--reddit-retries", "6", "--wait-limit", "3",
                   "--anti-sus", f"tcp://127.0.0.1:{free_port()}", "--gallery", f"tcp://127.0.0.1:{free_port()}",
                   "--state-dir", str(tmp_path / "state"),
                   env={"REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": ""})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "gave up after --wait-limit 3s" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 50


def test_once_exit_codes_0_2_3_with_the_emulator(tiny_models: Path, tmp_path: Path) -> None:
    """0: everything decided and delivered; 3: anti_sus gone, --wait-limit gives up; 2: a bad flag."""
    a_ep = f"tcp://127.0.0.1:{free_port()}"
    common = ["--gmm-threshold=-1e30", "--watermark-threshold=1.0", "--deadline", "2", "--http-retries", "0",
              "--batch-timeout", "1", "--anti-sus-timeout", "5"]
    with Emulator() as emu:
        env = {**emu.nomad_env()}
        anti = Service("anti_sus", python_module("anti_sus", "serve", "--models", str(tiny_models), "--bind", a_ep, "--threads", "1"),
                       log_path=tmp_path / "anti_sus.log").start()
        try:
            ok = run_cli("once", *emu.nomad_args(), *common, "--source", "reddit", "--anti-sus", a_ep,
                         "--state-dir", str(tmp_path / "s0"), "--save-dir", str(tmp_path / "out"), env=env, timeout=200)
            # gallery_bridge unreachable: everything is scored, then the outbox waits until the limit.
            no_gallery = run_cli("once", *emu.nomad_args(), *common, "--source", "reddit", "--anti-sus", a_ep,
                                 "--gallery", f"tcp://127.0.0.1:{free_port()}", "--gallery-timeout", "1", "--wait-limit", "30",
                                 "--state-dir", str(tmp_path / "sg"), env=env, timeout=200)
        finally:
            anti.stop()
        assert no_gallery.returncode == 3, no_gallery.stderr[-3000:]
        assert "gave up after --wait-limit 30s" in no_gallery.stderr
        with Store(tmp_path / "sg") as s:
            assert s.outbox_size() >= 1 and s.dead_letters() == []  # an outage dead-letters nothing
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert len(list((tmp_path / "out").glob("*.json"))) >= 1
        cut = run_cli("once", *emu.nomad_args(), *common, "--source", "reddit", "--anti-sus", a_ep, "--wait-limit", "4",
                      "--state-dir", str(tmp_path / "s3"), "--save-dir", str(tmp_path / "out3"), env=env, timeout=120)
        assert cut.returncode == 3, cut.stderr[-3000:]
        assert "gave up after --wait-limit 4s" in cut.stderr and "Traceback" not in cut.stderr
    bad = run_cli("once", "--max-delivery-attempts", "0", "--state-dir", str(tmp_path / "s2"))
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr


def _readme_rows() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("## Commands and flags", 1)[1].split("\n\n", 3)[2]
    return [line for line in table.splitlines() if line.startswith("| `")]


def test_readme_commands_table_matches_help() -> None:
    """Every nomad command is in README's table, and every flag the table names exists in that command's --help."""
    rows = _readme_rows()
    commands = [r.split("`")[1] for r in rows]
    action = next(a for a in build_parser({})._subparsers._group_actions if a.choices)  # type: ignore[union-attr]
    for sub in action.choices:
        assert any(c.startswith(f"nomad {sub}") or f"`nomad {sub}`" in r for c, r in zip(commands, rows)), sub
    helps: dict[tuple[str, str], str] = {}
    for row in rows:
        module = sub = ""
        for cell in re.findall(r"`([^`]*)`", row.split("|")[1]):
            words = cell.split()
            if words and words[0] in ("nomad", "anti-sus", "gallery-bridge"):
                module = {"nomad": "nomad", "anti-sus": "anti_sus", "gallery-bridge": "gallery_bridge"}[words[0]]
                sub = words[1].split("\\|")[0]
            elif not (words and words[0].startswith("--") and module):
                continue  # not a command; a cell of bare flags belongs to the command before it
            if (module, sub) not in helps:
                out = subprocess.run([sys.executable, "-m", module, sub, "--help"], capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, (module, sub, out.stderr)
                helps[module, sub] = out.stdout
            for flag in re.findall(r"--[a-z][a-z0-9-]*", cell):
                assert re.search(rf"{re.escape(flag)}\b", helps[module, sub]), (cell, flag)
    named = " ".join(rows)
    for flag in ("--max-queued-bytes", "--curve-allow", "--allow-insecure-scenery", "--gallery-server-key",
                 "--gallery-client-key", "--source", "--commons-listing", "--bluesky-max-posts", "--reddit-feed-interval"):
        assert flag in named, flag


def test_flags_reach_the_crawler_parts_through_one_table_each(tmp_path: Path) -> None:
    """Non-default flags arrive in HttpConfig, Rules, CrawlerConfig and FilterStage, and no crawl flag is left unused."""
    from nomad import config as cfg
    from nomad.crawler import CrawlerConfig
    from nomad.http import HttpConfig
    from nomad.rules import Rules

    env = {"NOMAD_DENY_DOMAIN": "a.example,b.example", "NOMAD_ALLOW_PRIVATE_ADDRESSES": "yes"}
    args = build_parser(env).parse_args([
        "once", "--user-agent", "ua/1", "--connect-timeout", "1.5", "--http-retries", "0", "--resolve", "h:443:127.0.0.1",
        "--min-long-side", "10", "--min-short-side", "5", "--no-skip-nsfw", "--deny-subreddit", "r/x",
        "--workers", "7", "--batch-size", "9", "--max-delivery-attempts", "2", "--backoff-max", "4",
        "--gmm-threshold=-5", "--state-dir", str(tmp_path)])
    http = HttpConfig(**cfg.pick(args, cfg.HTTP))
    assert (http.user_agent, http.connect_timeout, http.retries, http.allow_private, http.resolve) == \
        ("ua/1", 1.5, 0, True, ["h:443:127.0.0.1"])
    assert http.backoff_max == HttpConfig().backoff_max, "--backoff-max is delivery's, not the HTTP client's"
    rules = Rules(**cfg.pick(args, cfg.RULES))
    assert (rules.min_long, rules.min_short, rules.skip_nsfw, rules.skip_spoilers) == (10, 5, False, True)
    assert rules.deny_domains == ["a.example", "b.example"] and rules.deny_subreddits == ["r/x"]
    crawl = CrawlerConfig(**cfg.pick(args, cfg.CRAWLER))
    assert (crawl.workers, crawl.batch_size, crawl.max_delivery_attempts, crawl.backoff_max) == (7, 9, 2, 4.0)
    assert cfg.pick(args, cfg.FILTER) == {"gmm_threshold": -5.0, "watermark_threshold": None, "backoff_max": 4.0}
    # A list handed to a part is its own copy: changing it does not change the parsed flags.
    rules.deny_domains.append("c.example")
    assert args.deny_domain == ["a.example", "b.example"]

    # Every crawl flag is used: by a table, by the command line module itself, or by the source registry.
    from nomad.sources import registry

    tables = {d for t in (cfg.HTTP, cfg.RULES, cfg.CRAWLER, cfg.FILTER, cfg.REVIEW) for d in t.values()}
    cli_own = {"command", "help", "wait_limit", "anti_sus", "anti_sus_timeout", "anti_sus_server_key", "anti_sus_client_key",
               "gallery", "gallery_timeout", "gallery_server_key", "gallery_client_key", "save_dir", "state_dir",
               "log_format", "log_level", "metrics_port", "user_agent", "dupskip", "dupskip_timeout", "review"}
    registry_own = {"source", "listing", "backfill", "reddit_url", "reddit_oauth_url", "imgur_api_url", "flickr_api_url",
                    "reddit_retries", "ratelimit_reserve"}
    sources = tuple(f"{name}_" for name in registry.LISTING_MODULES)
    action = next(a for a in build_parser({})._subparsers._group_actions if a.choices)  # type: ignore[union-attr]
    unused = [a.dest for a in action.choices["once"]._actions
              if a.dest not in tables | cli_own | registry_own and not a.dest.startswith(sources)]
    assert unused == []


def test_secret_from_a_file(tmp_path: Path) -> None:
    from nomad.config import secret

    (tmp_path / "id").write_text("abc\n")
    assert secret("REDDIT_CLIENT_ID", {"REDDIT_CLIENT_ID_FILE": str(tmp_path / "id")}) == "abc"
    assert secret("REDDIT_CLIENT_ID", {"REDDIT_CLIENT_ID": "env", "REDDIT_CLIENT_ID_FILE": str(tmp_path / "id")}) == "env"
    assert secret("REDDIT_CLIENT_ID", {}) is None


def test_one_user_agent_default() -> None:
    """The flag and every client class default to the same User-Agent, defined once."""
    import inspect

    from nomad import DEFAULT_USER_AGENT
    from nomad.http import HttpConfig
    from nomad.sources import bluesky
    from nomad.sources.reddit import RedditConfig

    assert build_parser({}).parse_args(["once"]).user_agent == DEFAULT_USER_AGENT
    assert HttpConfig().user_agent == RedditConfig().user_agent == DEFAULT_USER_AGENT
    source_classes = [c for _, c in inspect.getmembers(bluesky, inspect.isclass) if c.__module__ == bluesky.__name__]
    defaults = [p.default for c in source_classes for n, p in inspect.signature(c.__init__).parameters.items() if n == "user_agent"]
    assert defaults and set(defaults) == {DEFAULT_USER_AGENT}


def test_nomad_starts_openblas_single_threaded_unless_told(tmp_path: Path) -> None:
    """nomad sets OPENBLAS_NUM_THREADS=1 before numpy loads (its spinning workers only cost CPU); a user's count wins."""
    code = ("import os, sys\nfrom nomad.cli import main\nrc = main(['sources', '--state-dir', sys.argv[1]])\n"
            "import numpy\nprint(rc, os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('OMP_NUM_THREADS'))\n")
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}
    for extra, want in (({}, "0 1 None"), ({"OMP_NUM_THREADS": "3"}, "0 None 3")):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state")], env={**base, **extra},
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip().splitlines()[-1] == want, out.stderr[-2000:]
