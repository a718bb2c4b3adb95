"""Credentials never reach nomad's logs, error messages or stderr (photocore.redact)."""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from nomad.http import FetchError, HttpClient, HttpConfig
from photocore.redact import RedactingFilter, redact, register_secret
from stack.procs import free_port, python_module
from stack.emulator import Emulator

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("text,secret", [
    ("https://api.flickr.com/services/rest?method=flickr.photos.getSizes&api_key=K1234567&format=json", "K1234567"),
    ('GET /3/image/x?client_id=C1234567 HTTP/1.1', "C1234567"),
    ("https://example.com/cb?code=1&client_secret=S1234567&x=2", "S1234567"),
    ("https://example.com/?access_token=T1234567", "T1234567"),
    ("https://example.com/?token=T7654321#frag", "T7654321"),
    ("https://example.com/?KEY=K7654321", "K7654321"),
    ("https://example.com/?sig=abcdef99&password=P1234567", "abcdef99"),
    ("https://example.com/?sig=abcdef99&password=P1234567", "P1234567"),
    ("https://alice:P4ssw0rd@example.com/x", "P4ssw0rd"),
    ("https://alice:P4ssw0rd@example.com/x", "alice"),
])
def test_redact_masks_credentials_in_urls(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "***" in out


def test_redact_leaves_other_text_alone() -> None:
    text = "cycle: posts_seen=3 monkey=1 https://i.redd.it/abc.jpg?width=640&format=pjpg"
    assert redact(text) == text


def test_registered_secret_is_masked_anywhere() -> None:
    register_secret("echoed-secret-value-42")
    assert "echoed-secret-value-42" not in redact('{"error": "bad key echoed-secret-value-42"}')
    assert "echoed-secret-value-42" not in redact("x=echoed%2Dsecret-value-42".replace("%2D", "-"))


def test_fetch_error_of_an_unreachable_host_has_no_key() -> None:
    port = free_port()  # nothing listens: connection refused, the URL goes into the message
    with HttpClient(HttpConfig(allow_private=True, retries=0, connect_timeout=1)) as c:
        with pytest.raises(FetchError) as ei:
            c.get(f"http://127.0.0.1:{port}/services/rest", params={"method": "m", "api_key": "FLICKRSECRET99"})
    assert ei.value.reason == "connection"
    assert "FLICKRSECRET99" not in str(ei.value) and "FLICKRSECRET99" not in (ei.value.url or "")
    assert "api_key=***" in str(ei.value)


def test_filter_masks_urllib3_debug_lines_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RedactingFilter())
    caplog.set_level(logging.DEBUG)
    port = free_port()
    secret = "IMGUR" + "SECRET77"  # built, so the traceback's source lines do not show it
    with HttpClient(HttpConfig(allow_private=True, retries=0, connect_timeout=1)) as c:
        try:
            c.get(f"http://127.0.0.1:{port}/x", params={"client_id": secret})
        except FetchError:
            logging.getLogger("nomad.test").exception("failed %s", f"http://127.0.0.1:{port}/x?client_id={secret}")
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert secret not in text and "client_id=***" in text and "Traceback" in text


@pytest.mark.parametrize("flickr_reachable", [True, False])
def test_crawl_at_debug_logs_no_secret(tmp_path: Path, flickr_reachable: bool) -> None:
    """A whole `nomad once` against the emulator at DEBUG: no credential in stdout or stderr.

    Reachable flickr: urllib3 logs each request line (api_key in the query) at DEBUG.
    Unreachable flickr: the connection error carries the URL at INFO/WARNING.
    """
    with Emulator() as emu:
        env = emu.nomad_env()
        secrets = [env["FLICKR_API_KEY"], env["IMGUR_CLIENT_ID"], env["REDDIT_CLIENT_SECRET"]]
        args = emu.nomad_args()
        if not flickr_reachable:
            dead = free_port()
            i = args.index("--flickr-api-url")
            args[i + 1] = f"https://api.flickr.com:{dead}"
            args += ["--resolve", f"api.flickr.com:{dead}:127.0.0.1"]
        cmd = python_module(
            "nomad", "once", *args, "--state-dir", str(tmp_path / "state"), "--save-dir", str(tmp_path / "out"),
            "--anti-sus", f"tcp://127.0.0.1:{free_port()}", "--anti-sus-timeout", "1", "--wait-limit", "8",
            "--log-level", "DEBUG", "--http-retries", "0", "--deadline", "3", "--connect-timeout", "1",
        )
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
        flickr_calls = emu.count(host="api.flickr.com")
    out = proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if flickr_reachable:
        assert flickr_calls > 0 and "api_key=***" in out  # the key was used, and its log lines masked
    else:
        assert "api.flickr.com" in out and "connection" in out  # the failure is still reported
    for s in secrets:
        assert s not in out, f"secret {s[:3]}… leaked"
