"""The gallery-bridge command line: import, list, rebuild, ping, info and its error messages."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from PIL import ImageOps

from tests import gallery_helpers as T
from gallery_bridge.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures the root logger on pytest's captured stderr; undo it for later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "gallery_bridge", *args], cwd=REPO, env=base,
                          capture_output=True, text=True, timeout=timeout)


def test_import_list_rebuild(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    a, b = T.photo(70, (800, 600)), T.photo(71, (800, 600))
    (src / "a.jpg").write_bytes(T.encode(a))
    (src / "sub" / "b.png").write_bytes(T.encode(b, "PNG"))
    (src / "a_copy.jpg").write_bytes(T.encode(a))  # exact duplicate
    (src / "a_mirror.webp").write_bytes(T.encode(ImageOps.mirror(a), "WEBP"))  # near duplicate
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (src / "notes.txt").write_text("ignored")
    gallery = tmp_path / "gallery"
    assert main(["import", str(src), "--target", f"folder:{gallery}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"files": 5, "added": 2, "duplicate": 2, "rejected": 0, "error": 1}
    # Importing again adds nothing: same keys.
    assert main(["import", str(src), "--target", f"folder:{gallery}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["added"] == 0

    assert main(["list", "--json", "--target", f"folder:{gallery}"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["title"] for r in listed] == ["b", "a"]  # newest first

    thumb = gallery / "thumbs" / f"{listed[0]['id']}.jpg"
    thumb.unlink()
    (gallery / "index.html").unlink()
    db = sqlite3.connect(gallery / "catalogue.sqlite")
    db.execute("UPDATE entries SET phash='00' || substr(phash, 3)")
    db.commit()
    db.close()
    assert main(["rebuild", "--target", f"folder:{gallery}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"entries": 2, "unusable": 0}
    assert thumb.is_file() and (gallery / "index.html").is_file()
    db = sqlite3.connect(gallery / "catalogue.sqlite")
    hashes = {p for (p,) in db.execute("SELECT phash FROM entries")}
    db.close()
    from PIL import Image

    from gallery_bridge.dedup import fingerprint
    with Image.open(src / "a.jpg") as ia, Image.open(src / "sub" / "b.png") as ib:
        assert hashes == {fingerprint(ia).phash_hex, fingerprint(ib).phash_hex}  # the damaged hash was recomputed


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = [
        (["list", "--target", "ftp://x"], "target must be folder:PATH or scenery:URL"),
        (["import", str(tmp_path / "missing"), "--target", f"folder:{tmp_path / 'g'}"], "is not a folder"),
        (["import", str(tmp_path), "--target", "scenery:not-a-url"], "http(s) URL"),
        (["list", "--target", f"folder:{tmp_path / 'nothing'}"], "no gallery catalogue"),
    ]
    for args, text in cases:
        out = _run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert text in out.stderr and "Traceback" not in out.stderr
    out = _run("list", env={"GALLERY_BRIDGE_PAGE_LIMIT": "many"})
    assert out.returncode == 2 and "GALLERY_BRIDGE_PAGE_LIMIT" in out.stderr


def test_import_of_a_folder_without_images_says_so_and_fails(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no pictures here")
    out = _run("import", str(empty), "--target", f"folder:{tmp_path / 'g'}")
    assert out.returncode == 1
    assert f"no images found in {empty}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stdout == "" and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,env", [
    (["ping", "--connect", "127.0.0.1:7778"], {}),
    (["info"], {"GALLERY_BRIDGE_CONNECT": "localhost:7778"}),
    (["serve", "--bind", "127.0.0.1:7778"], {}),
    (["serve"], {"GALLERY_BRIDGE_BIND": "0.0.0.0:7778"}),
])
def test_endpoint_without_transport_gets_a_hint(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    value = next(iter(env.values())) if env else args[2]
    if args[0] == "serve":
        args = [*args, "--target", f"folder:{tmp_path / 'g'}"]
    out = _run(*args, "--timeout", "0.2", "--retries", "0", env=env) if args[0] != "serve" else _run(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert f"a ZeroMQ endpoint needs a transport: did you mean tcp://{value}?" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "g").exists()  # refused before anything was opened


def test_every_flag_names_its_env_var() -> None:
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "json"):
                assert "GALLERY_BRIDGE_" in (action.help or ""), (name, action.dest)


def test_ping_exit_codes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    down = _run("ping", "--connect", endpoint, "--timeout", "0.3", "--retries", "0")
    assert down.returncode == 1 and "no reply" in down.stderr
    proc = subprocess.Popen([sys.executable, "-m", "gallery_bridge", "serve", "--target", f"folder:{tmp_path / 'g'}",
                             "--log-format", "json"],
                            cwd=REPO, env={**os.environ, "GALLERY_BRIDGE_BIND": endpoint, "GALLERY_BRIDGE_INSTANCE": "launcher-token-1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        up = _run("ping", "--connect", endpoint, "--timeout", "0.5", "--retries", "60")
        # One human line, as `anti-sus ping` prints.
        assert up.returncode == 0 and up.stdout.startswith(f"pong from {endpoint} in ") and len(up.stdout.splitlines()) == 1
        assert f"pid {proc.pid}" in up.stdout and "instance launcher-token-1" in up.stdout
        raw = _run("ping", "--server", endpoint, "--timeout", "5", "--json")  # anti-sus's spelling; the raw reply
        assert raw.returncode == 0
        pong = json.loads(raw.stdout)
        assert pong["pong"] is True and pong["pid"] == proc.pid and pong["instance"] == "launcher-token-1"
        info = _run("info", "--connect", endpoint)
        assert info.returncode == 0 and json.loads(info.stdout)["target"]["kind"] == "folder"
        assert json.loads(info.stdout)["pid"] == proc.pid and json.loads(info.stdout)["instance"] == "launcher-token-1"
        busy = _run("serve", "--bind", endpoint, "--target", f"folder:{tmp_path / 'g2'}")
        assert busy.returncode == 2 and "cannot bind" in busy.stderr
        # One writer per gallery: a second one would run recovery under the first's feet.
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "one.jpg").write_bytes(T.encode(T.photo(72)))
        second = _run("import", str(tmp_path / "src"), "--target", f"folder:{tmp_path / 'g'}")
        assert second.returncode == 2 and "in use by another gallery-bridge process" in second.stderr
        assert _run("list", "--target", f"folder:{tmp_path / 'g'}").returncode == 0  # reading is fine
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    first = json.loads(err.splitlines()[0])  # --log-format json: one JSON object per line
    assert first["level"] in ("info", "warning")


def test_bad_boolean_env_fails_instead_of_meaning_off() -> None:
    # GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY=enabled must not be read as "off" (or "on"): it is refused, naming the variable.
    out = _run("list", env={"GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY": "enabled"})
    assert out.returncode == 2 and "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY='enabled' is invalid" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert build_parser().parse_args(["list", "--allow-insecure-scenery"]).allow_insecure_scenery is True


def test_scenery_password_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gallery_bridge.wiring import _password

    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    for var in ("GALLERY_BRIDGE_SCENERY_PASSWORD", "GALLERY_BRIDGE_SCENERY_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GALLERY_BRIDGE_SCENERY_PASSWORD_FILE", str(secret))
    assert _password(build_parser().parse_args(["list"])) == "from-file"
    monkeypatch.delenv("GALLERY_BRIDGE_SCENERY_PASSWORD_FILE")
    monkeypatch.setenv("GALLERY_BRIDGE_SCENERY_PASSWORD", "from-env")
    assert _password(build_parser().parse_args(["list"])) == "from-env"
    assert "GALLERY_BRIDGE_SCENERY_PASSWORD_FILE" in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
