"""photocore.redact: one credential filter for nomad and gallery_bridge."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from photocore.observe import JsonFormatter
from photocore.redact import (MASK, RedactingFilter, install, redact, redact_url, register_env_secrets, register_secret,
                              safe_url, userinfo_secrets)


BODY = "POST /token body: grant_type=x&refresh_token=R1234567&oauth_signature=S7654321"
LEAKS = {
    BODY: ("R1234567", "S7654321"),
    "https://s3/x?X-Amz-Credential=AKIA1234%2Fus&X-Amz-Signature=abcd1234": ("AKIA1234", "abcd1234"),
    "redirect to https://h/cb?api_key%3DK9999999": ("K9999999",),
    "sftp://bot:s3cr3t!@files.example/up": ("s3cr3t!", "bot"),
}


def test_urls_and_bodies_lose_their_credentials() -> None:
    for text, secrets in LEAKS.items():
        out = redact(text)
        assert MASK in out and not any(s in out for s in secrets), out


def test_other_text_is_left_alone() -> None:
    text = "posts_seen=3 monkey=1 https://i.redd.it/abc.jpg?width=640&format=pjpg"
    assert redact(text) == text
    assert redact_url(None) is None


def test_registered_secrets_in_every_spelling() -> None:
    register_secret("p@ss word/9", None, "")
    assert redact("x p%40ss%20word%2F9 y p%40ss+word%2F9 z p@ss word/9") == "x *** y *** z ***"


def test_userinfo_helpers() -> None:
    assert userinfo_secrets("https://bot:s%40cret@h/x") == ["s@cret"]
    assert userinfo_secrets("https://h/x") == []
    assert safe_url("https://bot:pw@h:8443/x?q=1") == "https://h:8443/x?q=1"


def test_env_secrets_and_their_files(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("from-a-file-123\n")
    register_env_secrets({"X_API_KEY": "env-key-4567", "X_TOKEN_FILE": str(f), "SHORT_TOKEN": "abc", "HOME": "/root"})
    out = redact("env-key-4567 from-a-file-123 abc /root")
    assert out == "*** *** abc /root"  # short values would mask too much; HOME is no credential


def test_filter_masks_message_traceback_and_extras_for_text_and_json() -> None:
    register_secret("hunter2-secret")
    for formatter in (logging.Formatter("%(levelname)s %(message)s"), JsonFormatter()):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        logger = logging.getLogger("photocore.test_redact")
        logger.addHandler(handler)
        logger.propagate = False
        install(logger)
        install(logger)  # idempotent
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        try:
            try:
                raise RuntimeError("boom hunter2-secret")
            except RuntimeError:
                logger.exception("GET %s", "https://x/?api_key=K99999999", extra={"target": "hunter2-secret"})
        finally:
            logger.removeHandler(handler)
        out = stream.getvalue()
        assert "hunter2-secret" not in out and "K99999999" not in out
        assert "RuntimeError: boom ***" in out and "api_key=***" in out
        if isinstance(formatter, JsonFormatter):
            line = json.loads(out.splitlines()[0])
            assert line["target"] == "***" and "Traceback" in line["exc"]
