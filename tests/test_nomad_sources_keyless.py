"""Every key-less source at once, as a new user (and `make demo`) runs nomad: no --source, no credentials.

The emulator's ``nomad_args()``/``nomad_env(keyless=True)`` must point every source at it: reddit's Atom
feed (its JSON answers the block page), flickr's public feed, Commons (``NOMAD_CONTACT`` set) and Bluesky's
Jetstream. The crawl runs in-process (real HTTPS, SSRF guard on) with a scripted anti_sus.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nomad.cli import build_parser
from nomad.sources.commons import user_agent
from stack.emulator import CONTACT, Emulator
from stack.emulator.jetstream import CDN_HOST, JETSTREAM_HOST
from tests.nomad_outcomes import all_keyless_expected, keyless_cycle

pytestmark = pytest.mark.timeout(240)

KEYED = ("REDDIT_", "IMGUR_", "FLICKR_")


def once(emu: Emulator, tmp: Path, *extra: str) -> tuple[Any, dict[str, str], dict[str, Any], list[str]]:
    return keyless_cycle(emu, tmp, all_keyless_expected(emu.scenario), *extra, deadline="3")


def test_emulator_env_is_keyless_but_names_a_contact() -> None:
    with Emulator() as emu:
        env = emu.nomad_env(keyless=True)
        args = emu.nomad_args()
    assert env == {"NOMAD_CONTACT": CONTACT}
    assert args[args.index("--bluesky-jetstream-url") + 1] == f"wss://{JETSTREAM_HOST}:{emu.port}/subscribe"
    assert args[args.index("--bluesky-cdn-url") + 1] == f"https://{CDN_HOST}:{emu.port}"


def test_default_sources_without_credentials_read_all_four_and_a_rerun_fetches_nothing(tmp_path: Path) -> None:
    with Emulator() as emu:
        stats, got, statuses, names = once(emu, tmp_path)
        assert names == ["reddit", "commons", "flickr", "bluesky"]  # the default: every key-less source
        expected = all_keyless_expected(emu.scenario)
        wrong = {k: (v, got[k]) for k, v in expected.items() if got[k] != v}
        assert not wrong, wrong
        accepted = sum(1 for v in expected.values() if v == "accept_candidate")
        assert stats.accepted == stats.delivered == accepted
        assert stats.listings_failed == 0
        assert {name: st["state"] for name, st in statuses.items()} == dict.fromkeys(names, "ok")
        records = emu.records()
        assert sum(1 for r in records if "reddit.com" in r.host and r.path.endswith(".json")) <= 2
        assert emu.count(host=JETSTREAM_HOST, path="/subscribe") == 1
        uploads = [r for r in records if r.host == "upload.wikimedia.org"]
        assert uploads and all(r.headers.get("User-Agent") == user_agent(CONTACT) for r in uploads)
        for prefix in ("reddit:", "commons:", "flickr:", "bluesky:"):
            assert any(k.startswith(prefix) for k in keys_delivered(tmp_path)), prefix

        assert emu.wait_idle(10)  # the emulator logs a request when its handler ends (the abandoned slow body)
        before = len(emu.records())
        stats, got, _statuses, _ = once(emu, tmp_path, "--max-retries", "1")
        hosts = {r.host for r in emu.records()[before:]}
        assert hosts <= {"www.reddit.com", "api.flickr.com", "commons.wikimedia.org", JETSTREAM_HOST}  # listings only
        assert stats.new_posts == 0 and stats.downloaded == 0
        assert not {k: (v, got[k]) for k, v in expected.items() if got[k] != v}  # nothing lost or changed


def keys_delivered(tmp: Path) -> list[str]:
    import json

    return [json.loads(p.read_text())["key"] for p in (tmp / "out").glob("*.json")]


def test_the_demo_runs_nomad_with_every_keyless_source_and_no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nomad.sources import registry
    from stack import demo

    monkeypatch.setenv("REDDIT_CLIENT_ID", "from-the-shell")
    monkeypatch.setenv("NOMAD_SOURCE", "reddit")  # a shell setting must not narrow the demo
    with Emulator() as emu:
        cmd = demo.nomad_command(emu, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", tmp_path / "state")
        env = demo.nomad_environment(emu)
    argv = cmd[cmd.index("once"):]
    args = build_parser(env).parse_args(argv)
    assert registry.selected(args, env) == ["reddit", "commons", "flickr", "bluesky"]
    assert "REDDIT_CLIENT_ID" not in env and env["NOMAD_CONTACT"] == CONTACT
    assert args.bluesky_jetstream_url.endswith(f":{emu.port}/subscribe")
