"""The scenery target against a local fake scenery (http.server on 127.0.0.1).

The fake reproduces scenery's /import_image: multipart fields image, source_url,
tags, import_images_bot_password; answers {"message": …} with scenery's own
sentences; sha256 duplicates; and no reply at all to a wrong password.
"""
from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import sys
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    import trustme

from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.dedup import DedupConfig
from gallery_bridge.ingest import Ingester
from gallery_bridge.targets import TargetError
from gallery_bridge.targets.scenery import SceneryTarget, interpret
from gallery_bridge.validate import Limits, Meta, check_image

PASSWORD = "s3cret-bot-pw"
REPO = Path(__file__).resolve().parent.parent


class FakeScenery:
    """scenery's /import_image on 127.0.0.1: plain http, or https with ``tls`` (a trustme CA)."""

    def __init__(self, tls: "trustme.CA | None" = None, basic_auth: tuple[str, str] | None = None) -> None:
        self.images: dict[str, int] = {}  # sha256 -> id
        self.requests: list[dict] = []
        self.paths: list[str] = []  # every POST's path, whatever happened to it
        self.auth_headers: list[str | None] = []
        self.fail_next = 0  # answer this many requests with HTTP 503
        self.message_override: str | None = None
        self.redirect: tuple[int, str] | None = None  # (status, Location) for POSTs to /import_image
        self.release = threading.Event()  # ends the silent (unauthorised) waits at teardown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                fake.paths.append(self.path)
                fake.auth_headers.append(self.headers.get("Authorization"))
                if fake.redirect is not None and self.path == "/import_image":
                    status, location = fake.redirect
                    self.rfile.read(int(self.headers["Content-Length"]))
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path not in ("/import_image", "/moved/import_image"):
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = BytesParser(policy=HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                fields = {}
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    fields[name] = part.get_payload(decode=True)
                fake.requests.append(fields)
                if fake.fail_next > 0:
                    fake.fail_next -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                if fields.get("import_images_bot_password", b"").decode() != PASSWORD:
                    # scenery's handler just returns: the request never gets a reply.
                    fake.release.wait(20)
                    return
                if fake.message_override is not None:
                    return self._answer(fake.message_override)
                sha = hashlib.sha256(fields["image"]).hexdigest()
                if sha in fake.images:
                    return self._answer(f"Image with the same sha256 is already in the db. Image id = {fake.images[sha]} ")
                new_id = 100 + len(fake.images)
                fake.images[sha] = new_id
                self._answer(f"Success! Image id = {new_id}")

            def _answer(self, message: str) -> None:
                data = json.dumps({"message": message}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Handler threads are joined on close: none may outlive the test (and log into a closed stream).
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True
        scheme = "http"
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.port = self.httpd.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def scenery() -> Iterator[FakeScenery]:
    fake = FakeScenery()
    yield fake
    fake.close()


def _ingester(tmp_path: Path, url: str, password: str = PASSWORD, **kw) -> Ingester:
    kw.setdefault("allow_insecure", url.startswith("http://"))  # the fake is plain http on loopback
    target = SceneryTarget(url, password, timeout=kw.pop("timeout", 5.0), retries=kw.pop("retries", 2),
                           backoff=0.01, **kw)
    return Ingester(Catalogue(tmp_path / "ledger.sqlite"), target, DedupConfig())


def _image(seed: int):
    return check_image(T.encode(T.photo(seed)), Limits())


def test_scenery_replies_are_mapped() -> None:
    assert interpret("Success! Image id = 42").status == "added"
    assert interpret("Success! Image id = 42").gallery_id == 42
    dup = interpret("Image with the same sha256 is already in the db. Image id = 7 ")
    assert (dup.status, dup.gallery_id) == ("duplicate", 7)
    sim = interpret("Similar image is already in the db. Image ids = [12,5] ")
    assert (sim.status, sim.gallery_id) == ("duplicate", 12)
    assert interpret("Not supported mime type").status == "rejected"
    assert interpret("fail") is None and interpret(None) is None and interpret("Success!") is None


def test_added_then_idempotent_by_ledger(tmp_path: Path, scenery: FakeScenery) -> None:
    ing = _ingester(tmp_path, scenery.url)
    meta = Meta(permalink="https://www.reddit.com/r/x/comments/1/", source_url="https://i.redd.it/1.jpg")
    img = _image(1)
    first = ing.ingest("reddit:t3_1:0", meta, img)
    assert (first.status, first.gallery_id) == ("added", 100)
    sent = scenery.requests[-1]
    assert sent["image"] == img.data
    assert json.loads(sent["tags"]) == ["from_nomad"]
    assert sent["source_url"] == b"https://www.reddit.com/r/x/comments/1/"
    assert sent["import_images_bot_password"] == PASSWORD.encode()
    n = len(scenery.requests)
    again = ing.ingest("reddit:t3_1:0", meta, img)
    assert (again.status, again.gallery_id, again.reason) == ("duplicate", 100, "key")
    near = ing.ingest("reddit:t3_2:0", meta, check_image(T.encode(T.crop_fraction(T.photo(1), left=0.02)), Limits()))
    assert (near.status, near.gallery_id) == ("duplicate", 100)
    assert len(scenery.requests) == n  # answered from the local ledger, scenery not asked
    ing.close()


def test_scenery_side_duplicate_is_recorded(tmp_path: Path, scenery: FakeScenery) -> None:
    img = _image(2)
    scenery.images[__import__("hashlib").sha256(img.data).hexdigest()] = 55  # scenery already has it
    ing = _ingester(tmp_path, scenery.url)
    r = ing.ingest("k1", Meta(), img)
    assert (r.status, r.gallery_id, r.reason) == ("duplicate", 55, "gallery")
    assert ing.ingest("k1", Meta(), img).gallery_id == 55
    ing.close()


def test_5xx_is_retried_with_backoff(tmp_path: Path, scenery: FakeScenery) -> None:
    sleeps: list[float] = []
    scenery.fail_next = 2
    ing = _ingester(tmp_path, scenery.url, retries=3, sleep=sleeps.append)
    r = ing.ingest("k", Meta(), _image(3))
    assert r.status == "added" and len(scenery.requests) == 3
    assert sleeps == [0.01, 0.02]  # exponential backoff
    ing.close()


def test_persistent_5xx_is_an_error_and_leaves_nothing(tmp_path: Path, scenery: FakeScenery) -> None:
    scenery.fail_next = 10
    ing = _ingester(tmp_path, scenery.url, retries=2)
    with pytest.raises(TargetError, match="HTTP 503"):
        ing.ingest("k", Meta(), _image(4))
    assert ing.catalogue.count() == 0 and ing.catalogue.pending() == []
    scenery.fail_next = 0
    assert ing.ingest("k", Meta(), _image(4)).status == "added"  # redelivery works
    ing.close()


def test_wrong_password_times_out_as_auth_problem(tmp_path: Path, scenery: FakeScenery) -> None:
    ing = _ingester(tmp_path, scenery.url, password="wrong", timeout=0.5, retries=1)
    with pytest.raises(TargetError, match="password"):
        ing.ingest("k", Meta(), _image(5))
    assert ing.catalogue.count() == 0 and scenery.images == {}
    ing.close()


def test_unconfirmed_answer_is_never_success(tmp_path: Path, scenery: FakeScenery) -> None:
    scenery.message_override = "fail"
    ing = _ingester(tmp_path, scenery.url)
    with pytest.raises(TargetError, match="did not confirm"):
        ing.ingest("k", Meta(), _image(6))
    scenery.message_override = "Not supported mime type"
    r = ing.ingest("k", Meta(), _image(6))
    assert (r.status, r.gallery_id) == ("rejected", None)
    assert ing.catalogue.count() == 0
    ing.close()


def test_scenery_down_is_an_error(tmp_path: Path) -> None:
    ing = _ingester(tmp_path, "http://127.0.0.1:9", retries=1)
    with pytest.raises(TargetError, match="cannot connect"):
        ing.ingest("k", Meta(), _image(7))
    ing.close()


def test_cli_refuses_scenery_without_password(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "gallery_bridge", "serve", "--bind", "tcp://127.0.0.1:*", "--target", "scenery:http://127.0.0.1:9",
         "--allow-insecure-scenery", "--ledger", str(tmp_path / "l.sqlite")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "GALLERY_BRIDGE_SCENERY_PASSWORD" in out.stderr and "Traceback" not in out.stderr


def test_service_with_scenery_target_end_to_end(tmp_path: Path, scenery: FakeScenery) -> None:
    import os
    import signal
    import socket

    from gallery_bridge.client import IngestClient, IngestError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pw_file = tmp_path / "pw"
    pw_file.write_text(PASSWORD + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    env.update({"GALLERY_BRIDGE_SCENERY_PASSWORD_FILE": str(pw_file), "GALLERY_BRIDGE_LEDGER": str(tmp_path / "l.sqlite"),
                "GALLERY_BRIDGE_SCENERY_TAGS": '["from_nomad", "landscape"]', "GALLERY_BRIDGE_SCENERY_RETRIES": "1",
                "GALLERY_BRIDGE_ALLOW_INSECURE_SCENERY": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "gallery_bridge", "serve", "--bind", f"tcp://127.0.0.1:{port}",
                             "--target", f"scenery:{scenery.url}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=0.3, retries=100) as client:
            assert client.ping()["pong"]
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=30, retries=0) as client:
            r = client.ingest("reddit:t3_e2e:0", {"permalink": "https://www.reddit.com/r/x/comments/e2e/"}, T.encode(T.photo(8)))
            assert (r.status, r.gallery_id) == ("added", 100)
            assert json.loads(scenery.requests[-1]["tags"]) == ["from_nomad", "landscape"]
            scenery.fail_next = 100
            with pytest.raises(IngestError) as err:
                client.ingest("reddit:t3_e2e:1", {}, T.encode(T.photo(9)))
            assert err.value.code == "internal" and err.value.retryable
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
