"""photocore.settings: the one flags + env + secret-file layer and its validators."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from photocore.errors import UserError
from photocore.settings import (Parser, Settings, bind_endpoint, byte_size, endpoint, finite_float, host_port,
                                non_negative_float, non_negative_int, parse_bool, port, port_or_off, positive_float,
                                positive_int, probability, read_secret)


def build(environ: dict[str, str]) -> Parser:
    p = Parser(prog="t")
    s = Settings(p, "T_", environ)
    s.add("--batch", type=positive_int, default=32, help="images per call")
    s.add("--bind", type=bind_endpoint, default=["tcp://127.0.0.1:7777"], many=True, help="endpoints")
    s.add("--mode", default="a", choices=["a", "b"], help="mode")
    s.add("--server", "--connect", dest="server", env="SERVER", default="tcp://127.0.0.1:1", type=endpoint, help="server")
    s.switch("--int8", help="quantized")
    s.switch("--no-watermark", help="no watermark stage", negatable=False)
    s.group("limits").add("--max-pixels", type=positive_int, default=1000, help="pixels")
    return p


def test_env_is_the_default_and_flags_win() -> None:
    env = {"T_BATCH": "8", "T_BIND": "tcp://127.0.0.1:1, ipc:///tmp/x", "T_INT8": "yes", "T_MAX_PIXELS": "5"}
    args = build(env).parse_args([])
    assert (args.batch, args.bind, args.int8, args.max_pixels) == (8, ["tcp://127.0.0.1:1", "ipc:///tmp/x"], True, 5)
    args = build(env).parse_args(["--batch", "4", "--bind", "tcp://*:9", "--bind", "inproc://y", "--no-int8"])
    # Command-line occurrences replace the env list instead of adding to it.
    assert (args.batch, args.bind, args.int8) == (4, ["tcp://*:9", "inproc://y"], False)
    args = build({}).parse_args([])
    assert (args.batch, args.bind, args.int8, args.no_watermark) == (32, ["tcp://127.0.0.1:7777"], False, False)
    # The default list object is never extended in place, so a second parse starts clean.
    p = build({})
    p.parse_args(["--bind", "tcp://*:1"])
    assert p.parse_args([]).bind == ["tcp://127.0.0.1:7777"]


def test_empty_variable_counts_as_unset() -> None:
    assert build({"T_BATCH": "", "T_INT8": " "}).parse_args([]).batch == 32


@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "tru"])
def test_bad_boolean_in_env_fails_naming_the_variable(raw: str) -> None:
    with pytest.raises(UserError) as exc:
        build({"T_INT8": raw})
    assert "T_INT8" in str(exc.value) and raw in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.status == 2


@pytest.mark.parametrize("raw, expected", [("1", True), ("TRUE", True), ("on", True), ("Yes", True),
                                           ("0", False), ("false", False), ("OFF", False), ("no", False)])
def test_strict_booleans(raw: str, expected: bool) -> None:
    assert parse_bool(raw) is expected
    # A --no-x switch that the environment turned on can be turned off again in the environment (=0).
    assert build({"T_NO_WATERMARK": raw}).parse_args([]).no_watermark is expected


@pytest.mark.parametrize("env, words", [
    ({"T_BATCH": "lots"}, ["T_BATCH", "must be a whole number"]),
    ({"T_BATCH": "0"}, ["T_BATCH", "must be >= 1"]),
    ({"T_MODE": "c"}, ["T_MODE", "choose from a, b"]),
    ({"T_BIND": "tcp://127.0.0.1:1,127.0.0.1:2"}, ["T_BIND", "did you mean tcp://127.0.0.1:2?"]),
    ({"T_SERVER": "localhost:7777"}, ["T_SERVER", "did you mean tcp://localhost:7777?"]),
])
def test_bad_env_values_are_one_line_user_errors(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(UserError) as exc:
        build(env)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_bad_flag_values_are_one_line_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build({}).parse_args(["--connect", "127.0.0.1:7777"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean tcp://127.0.0.1:7777?" in err and err.startswith("t: error: argument")


def test_help_shows_each_variable_and_its_default() -> None:
    text = build({"T_BATCH": "8"}).format_help()
    flat = " ".join(text.split())
    assert "[env T_BATCH; default: 32]" in flat  # the built-in default, not the env value
    assert "[env T_BIND, comma-separated; default: tcp://127.0.0.1:7777]" in flat
    assert "[env T_INT8=1|0; default: off]" in flat and "--no-int8" in flat
    assert "[env T_SERVER; default: tcp://127.0.0.1:1]" in flat and "[env T_MAX_PIXELS; default: 1000]" in flat


def test_required_option_may_come_from_env() -> None:
    p = Parser(prog="t")
    Settings(p, "T_", {"T_OUT": "/x"}).add("--out", type=Path, required=True, help="output")
    assert p.parse_args([]).out == Path("/x")
    p = Parser(prog="t")
    Settings(p, "T_", {}).add("--out", type=Path, required=True, help="output")
    with pytest.raises(SystemExit):
        p.parse_args([])


def test_secret_from_variable_or_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    assert read_secret("T_PW", {"T_PW": " direct "}) == "direct"
    assert read_secret("T_PW", {"T_PW_FILE": str(f)}) == "s3cret"
    assert read_secret("T_PW", {"T_PW": "direct", "T_PW_FILE": str(f)}) == "direct"
    assert read_secret("T_PW", {}) is None
    with pytest.raises(UserError) as exc:
        read_secret("T_PW", {"T_PW_FILE": str(tmp_path / "missing")})
    assert "T_PW_FILE" in str(exc.value) and "missing" in str(exc.value)
    p = Parser(prog="t")
    s = Settings(p, "T_", {"T_PW_FILE": str(f)})
    var = s.secret("PW", help="the password")
    assert var == "T_PW" and s.read_secret("PW") == "s3cret"
    assert "T_PW_FILE" in p.format_help()
    assert not any("pw" in o.lower() for a in p._actions for o in a.option_strings)  # a secret is never a flag


@pytest.mark.parametrize("fn, good, bad", [
    (positive_int, [("1", 1), ("64", 64)], ["0", "-3", "1.5", "x"]),
    (non_negative_int, [("0", 0), ("7", 7)], ["-1", "x"]),
    (positive_float, [("0.5", 0.5)], ["0", "-1", "nan", "inf"]),
    (non_negative_float, [("0", 0.0), ("2.5", 2.5)], ["-0.1", "nan", "inf", "x"]),
    (finite_float, [("-3.5", -3.5), ("1e3", 1000.0)], ["nan", "inf", "-inf", "x"]),
    (probability, [("0", 0.0), ("1", 1.0), ("0.5", 0.5)], ["1.5", "-0.1", "nan", "x"]),
    (port, [("1", 1), ("65535", 65535)], ["0", "65536", "x"]),
    (port_or_off, [("0", 0), ("9090", 9090)], ["-1", "65536"]),
    (byte_size, [("512M", 512 << 20), ("2GiB", 2 << 30), ("1024", 1024)], ["0", "lots", "-1M"]),
    (host_port, [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9))], ["127.0.0.1", ":80", "h:0", "h:x"]),
    (endpoint, [("tcp://127.0.0.1:7777", "tcp://127.0.0.1:7777"), ("ipc:///tmp/s", "ipc:///tmp/s"), ("inproc://x", "inproc://x")],
     ["tcp://127.0.0.1:*", "127.0.0.1:7777", "tpc://h:1", "tcp://h", "tcp://h:99999", "tcp://"]),
    (bind_endpoint, [("tcp://*:7777", "tcp://*:7777"), ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")],
     ["0.0.0.0:7777", "tcp://h:0"]),
])
def test_validators(fn, good, bad) -> None:  # type: ignore[no-untyped-def]
    for text, value in good:
        assert fn(text) == value, text
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_endpoint_hint_when_tcp_is_missing() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"did you mean tcp://gallery:7778\?"):
        endpoint("gallery:7778")
    with pytest.raises(argparse.ArgumentTypeError, match="e.g. tcp://host:port"):
        endpoint("localhost")
