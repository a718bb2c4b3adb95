"""The scenery target keeps its password: https only (unless allowed), no redirect off the origin, no secret in info or logs.

Fake sceneries run on 127.0.0.1, over TLS with a trustme CA where https is needed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import requests
import trustme

from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import IngestClient, IngestError
from gallery_bridge.dedup import DedupConfig
from gallery_bridge.ingest import Ingester
from gallery_bridge.targets import TargetError
from gallery_bridge.targets.scenery import RedirectRefused, SceneryTarget
from gallery_bridge.validate import Limits, Meta, check_image
from tests.test_gallery_scenery import PASSWORD, FakeScenery

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="gallery_bridge test CA")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def https_scenery(ca: trustme.CA) -> Iterator[FakeScenery]:
    fake = FakeScenery(tls=ca)
    yield fake
    fake.close()


@pytest.fixture
def elsewhere(ca: trustme.CA) -> Iterator[FakeScenery]:
    """Another origin (other port) that would happily answer "Success!"."""
    fake = FakeScenery(tls=ca)
    yield fake
    fake.close()


def _target(url: str, ca_file: Path | None = None, **kw) -> SceneryTarget:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would beat session.verify
    if ca_file is not None:
        session.verify = str(ca_file)
    return SceneryTarget(url, PASSWORD, timeout=5, retries=kw.pop("retries", 0), backoff=0.01, session=session, **kw)


def _ingester(tmp_path: Path, target: SceneryTarget) -> Ingester:
    return Ingester(Catalogue(tmp_path / "ledger.sqlite"), target, DedupConfig())


def _image(seed: int):
    return check_image(T.encode(T.photo(seed)), Limits())


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "gallery_bridge", *args], cwd=REPO, env=base,
                          capture_output=True, text=True, timeout=120)


# ---- plain http ------------------------------------------------------------------

def test_plain_http_is_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--allow-insecure-scenery"):
        SceneryTarget("http://127.0.0.1:9", PASSWORD)  # loopback too: be strict
    SceneryTarget("http://127.0.0.1:9", PASSWORD, allow_insecure=True).close()
    SceneryTarget("https://scenery.example", PASSWORD).close()


def test_cli_refuses_http_in_one_line_and_the_flag_or_env_allows_it(tmp_path: Path) -> None:
    scenery = FakeScenery()  # plain http
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.jpg").write_bytes(T.encode(T.photo(51)))
        common = ["import", str(src), "--target", f"scenery:{scenery.url}", "--ledger", str(tmp_path / "l.sqlite")]
        env = {"GALLERY_BRIDGE_SCENERY_PASSWORD": PASSWORD}
        refused = _run(*common, env=env)
        assert refused.returncode == 2, refused.stderr
        assert "plain http" in refused.stderr and "--allow-insecure-scenery" in refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert scenery.paths == []  # nothing was sent
        ok = _run(*common, "--allow-insecure-scenery", env=env)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout.splitlines()[-1])["added"] == 1
        by_env = _run(*common, env={**env, "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY": "1"})
        assert by_env.returncode == 0 and json.loads(by_env.stdout.splitlines()[-1])["duplicate"] == 1
        bad = _run(*common, env={**env, "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY": "maybe"})
        assert bad.returncode == 2 and "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY" in bad.stderr
    finally:
        scenery.close()


def test_https_scenery_works(tmp_path: Path, https_scenery: FakeScenery, ca_file: Path) -> None:
    ing = _ingester(tmp_path, _target(https_scenery.url, ca_file))
    try:
        r = ing.ingest("k", Meta(), _image(52))
        assert (r.status, r.gallery_id) == ("added", 100)
    finally:
        ing.close()


# ---- redirects -------------------------------------------------------------------

@pytest.mark.parametrize("status", [307, 308])
def test_redirect_to_another_origin_is_an_error_and_gets_no_password(tmp_path: Path, https_scenery: FakeScenery,
                                                                      elsewhere: FakeScenery, ca_file: Path, status: int) -> None:
    https_scenery.redirect = (status, f"{elsewhere.url}/import_image")
    ing = _ingester(tmp_path, _target(https_scenery.url, ca_file, retries=2))
    try:
        with pytest.raises(RedirectRefused, match="another origin"):
            ing.ingest("k", Meta(), _image(53))
        assert elsewhere.paths == []  # the body (and the password) never left the configured origin
        assert len(https_scenery.paths) == 1  # an error at once, not retried
        assert ing.catalogue.count() == 0 and ing.catalogue.pending() == []
    finally:
        ing.close()


@pytest.mark.parametrize("location", [
    "https://localhost:{port}/import_image",  # same port, other host name
    "http://127.0.0.1:{port}/import_image",  # same host and port, other scheme
])
def test_origin_is_scheme_host_and_port(tmp_path: Path, https_scenery: FakeScenery, ca_file: Path, location: str) -> None:
    https_scenery.redirect = (307, location.format(port=https_scenery.port))
    ing = _ingester(tmp_path, _target(https_scenery.url, ca_file))
    try:
        with pytest.raises(RedirectRefused):
            ing.ingest("k", Meta(), _image(54))
        assert https_scenery.paths == ["/import_image"]
    finally:
        ing.close()


def test_same_origin_307_is_followed_other_redirects_are_errors(tmp_path: Path, https_scenery: FakeScenery,
                                                                ca_file: Path) -> None:
    https_scenery.redirect = (307, "/moved/import_image")
    ing = _ingester(tmp_path, _target(https_scenery.url, ca_file))
    try:
        r = ing.ingest("k1", Meta(), _image(55))
        assert r.status == "added" and https_scenery.paths == ["/import_image", "/moved/import_image"]
        assert https_scenery.requests[-1]["import_images_bot_password"] == PASSWORD.encode()
        https_scenery.redirect = (302, "/moved/import_image")  # would turn the upload into a GET
        with pytest.raises(RedirectRefused, match="HTTP 302"):
            ing.ingest("k2", Meta(), _image(56))
    finally:
        ing.close()


# ---- userinfo and the password never shown ----------------------------------------------

def test_userinfo_is_used_but_never_shown(tmp_path: Path, https_scenery: FakeScenery, ca_file: Path) -> None:
    url = https_scenery.url.replace("https://", "https://proxyuser:url-pass-77@")
    ing = _ingester(tmp_path, _target(url, ca_file))
    try:
        assert ing.ingest("k", Meta(), _image(57)).status == "added"
        assert https_scenery.auth_headers[-1] is not None  # basic auth from the userinfo was sent
        shown = json.dumps(ing.info())
        assert "url-pass-77" not in shown and "proxyuser" not in shown and https_scenery.url in shown
        https_scenery.fail_next = 10
        with pytest.raises(TargetError) as err:
            ing.ingest("k2", Meta(), _image(58))
        assert "url-pass-77" not in str(err.value) and "proxyuser" not in str(err.value)
    finally:
        ing.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_credential_in_logs_at_any_level(tmp_path: Path, https_scenery: FakeScenery, elsewhere: FakeScenery,
                                            ca_file: Path, fmt: str) -> None:
    url_secret = "urlinfo-Secret-31337"
    pw_file = tmp_path / "pw"
    pw_file.write_text(PASSWORD + "\n")
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    target = https_scenery.url.replace("https://", f"https://bot:{url_secret}@")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    env.update({"GALLERY_BRIDGE_SCENERY_PASSWORD_FILE": str(pw_file), "REQUESTS_CA_BUNDLE": str(ca_file)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gallery_bridge", "serve", "--bind", endpoint, "--target", f"scenery:{target}",
         "--ledger", str(tmp_path / "l.sqlite"), "--scenery-retries", "1", "--scenery-timeout", "5",
         "--log-level", "DEBUG", "--log-format", fmt],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    replies: list[str] = []
    try:
        with IngestClient(endpoint, timeout=0.3, retries=200) as client:
            client.ping()
        with IngestClient(endpoint, timeout=60, retries=0) as client:
            assert client.ingest("k:ok", {}, T.encode(T.photo(60))).status == "added"
            # A scenery that echoes the password in its answer, a redirect away, a 5xx storm:
            # every path that logs or answers an error.
            https_scenery.message_override = f"fail: bad import_images_bot_password {PASSWORD}"
            with pytest.raises(IngestError) as err:
                client.ingest("k:echo", {}, T.encode(T.photo(61)))
            replies.append(str(err.value))
            https_scenery.message_override = None
            https_scenery.redirect = (307, f"{elsewhere.url.replace('https://', f'https://bot:{url_secret}@')}/import_image")
            with pytest.raises(IngestError) as err:
                client.ingest("k:redirect", {}, T.encode(T.photo(62)))
            replies.append(str(err.value))
            https_scenery.redirect = None
            https_scenery.fail_next = 100
            with pytest.raises(IngestError) as err:
                client.ingest("k:5xx", {}, T.encode(T.photo(63)))
            replies.append(str(err.value))
            replies.append(json.dumps(client.info()))
        info = _run("info", "--connect", endpoint)
        assert info.returncode == 0
        replies.append(info.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, logs = proc.communicate(timeout=60)
    assert proc.returncode == 0, logs[-3000:]
    assert elsewhere.paths == []
    assert "DEBUG" in logs.upper() and "POST /import_image" in logs  # urllib3's DEBUG lines were captured
    assert "***" in logs  # the echoed password was there to be masked
    for text in (logs, *replies):
        assert PASSWORD not in text and url_secret not in text and "bot:" not in text


def test_redacting_filter_masks_messages_tracebacks_and_extras() -> None:
    import io
    import logging

    from photocore.observe import JsonFormatter
    from photocore.redact import RedactingFilter, redact, register_secret

    register_secret("p@ss word/9")
    assert redact("https://u:x@host/a and p%40ss%20word%2F9 and p@ss word/9") == "https://***@host/a and *** and ***"
    for formatter in (logging.Formatter("%(levelname)s %(message)s"), JsonFormatter()):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(RedactingFilter())
        logger = logging.getLogger("gallery_bridge.test_redact")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            try:
                raise RuntimeError("boom with p@ss word/9")
            except RuntimeError:
                logger.exception("failed at %s", "https://bot:p@ss word/9@h/", extra={"target": "p@ss word/9"})
            logger.debug("debug line p@ss word/9")
        finally:
            logger.removeHandler(handler)
        out = stream.getvalue()
        assert "p@ss word/9" not in out and "boom with ***" in out and "RuntimeError" in out
