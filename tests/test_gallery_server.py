"""The gallery_bridge server itself: oversized frames, CURVE allow-list, identity, clean close."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from photocore.curve import keygen
from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import GalleryUnavailable, IngestClient, IngestError
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig, max_message_bytes
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.validate import Limits

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def ingester(tmp_path: Path) -> Iterator[Ingester]:
    target = FolderTarget(tmp_path / "gallery")
    ing = Ingester(Catalogue(target.catalogue_path), target)
    yield ing
    ing.close()


def test_60_mb_image_frame_gets_too_large_and_the_service_goes_on(ingester: Ingester) -> None:
    limits = Limits()  # the defaults: 50 MiB per image
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", limits=limits)).start()
    try:
        with IngestClient(server.endpoint, timeout=60, retries=0) as client:
            big = b"\xff\xd8\xff" + b"\0" * (60_000_000 - 3)
            with pytest.raises(IngestError) as err:
                client.ingest("big:60mb", {}, big)
            assert err.value.code == "too_large" and "limit 52428800" in err.value.message
            assert not err.value.retryable
            del big
            # Same client, same connection: still served.
            assert client.ping()["pong"] is True
            assert client.ingest("small:1", {}, T.encode(T.photo(31))).status == "added"
    finally:
        server.close()
    assert ingester.catalogue.count() == 1


def test_oversize_window_is_bounded() -> None:
    """Between the limit and twice it: a reply; the libzmq cap stays finite."""
    lim = Limits(max_image_bytes=1000)
    assert 2000 < max_message_bytes(lim) < 2000 + 200_000


def test_ping_and_info_carry_pid_and_instance(ingester: Ingester) -> None:
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", instance="token-abc")).start()
    try:
        with IngestClient(server.endpoint, timeout=20, retries=0) as client:
            for reply in (client.ping(), client.info()):
                assert reply["pid"] == os.getpid() and reply["instance"] == "token-abc"
    finally:
        server.close()
    # Without one, every start draws its own token.
    a, b = ServerConfig().instance, ServerConfig().instance
    assert a != b and len(a) == 32 and int(a, 16) >= 0


def _server_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t is not threading.main_thread()}


def test_close_joins_every_thread_and_logs_before_returning(ingester: Ingester, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    before = _server_threads()
    server_pub, server_sec = keygen(tmp_path / "keys", "gallery")
    keygen(tmp_path / "allowed", "nomad")
    caplog.set_level(logging.INFO, logger="gallery_bridge")
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret_key=server_sec,
                                           curve_allow=tmp_path / "allowed")).start()
    assert len(_server_threads() - before) >= 2  # the loop and the ZAP authenticator
    server.close()
    # Nothing of the server is left to log into a capture stream that a later test closes.
    leftover = [t for t in _server_threads() - before if t.is_alive()]
    assert leftover == []
    assert any("gallery_bridge stopping" in r.getMessage() for r in caplog.records)
    server.close()  # idempotent


def test_close_without_start_frees_the_port(ingester: Ingester) -> None:
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*"))
    endpoint = server.endpoint
    server.close()
    again = Server(ingester, ServerConfig(bind=endpoint))  # the same port binds again
    again.close()


def test_allow_list_serves_listed_clients_only(ingester: Ingester, tmp_path: Path) -> None:
    server_pub, server_sec = keygen(tmp_path / "keys", "gallery")
    allowed_pub, allowed_sec = keygen(tmp_path / "allowed", "nomad")
    allowed_sec.rename(tmp_path / "keys" / allowed_sec.name)  # the client's secret stays with the client
    allowed_sec = tmp_path / "keys" / allowed_sec.name
    _, stranger_sec = keygen(tmp_path / "strangers", "other")
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret_key=server_sec,
                                           curve_allow=tmp_path / "allowed")).start()
    try:
        spub = zmq.auth.load_certificate(str(server_pub))[0]
        good = zmq.auth.load_certificate(str(allowed_sec))
        with IngestClient(server.endpoint, timeout=60, retries=0, curve=(spub, *good)) as c:  # type: ignore[arg-type]
            assert c.ingest("curve:ok", {}, T.encode(T.photo(32))).status == "added"
            assert c.info()["curve"] == {"enabled": True, "allow_list": True}
        bad = zmq.auth.load_certificate(str(stranger_sec))
        with IngestClient(server.endpoint, timeout=1, retries=1, curve=(spub, *bad)) as c:  # type: ignore[arg-type]
            with pytest.raises(GalleryUnavailable):
                c.ingest("curve:stranger", {}, T.encode(T.photo(33)))
        with IngestClient(server.endpoint, timeout=1, retries=0) as plain:
            with pytest.raises(GalleryUnavailable):
                plain.ping()
    finally:
        server.close()
    assert ingester.catalogue.count() == 1  # the stranger got nothing in


def test_allow_list_needs_a_certificate_secret(ingester: Ingester, tmp_path: Path) -> None:
    _, secret = zmq.curve_keypair()
    with pytest.raises(ValueError, match="curve_secret_key"):
        Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret=secret, curve_allow=tmp_path))


def test_a_slow_close_is_reported_not_hidden(ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*"))
    release = threading.Event()
    started = threading.Event()

    def busy(body: list[bytes]) -> bytes:
        started.set()
        release.wait(30)
        return b"{}"

    monkeypatch.setattr(server, "handle", busy)
    server.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send(b"x")
        assert started.wait(20)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="still running"):
            server.close(timeout=0.3)
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
        sock.close(0)
        server.close()


# ---- the CLI's CURVE flags --------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    return subprocess.run([sys.executable, "-m", "gallery_bridge", "serve", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_wrong_key_files_get_a_clear_line(tmp_path: Path) -> None:
    server_pub, server_sec = keygen(tmp_path / "keys", "gallery")
    client_pub, client_sec = keygen(tmp_path / "clients", "nomad")
    only_secrets = tmp_path / "only_secrets"
    only_secrets.mkdir()
    (only_secrets / "nomad.key_secret").write_bytes(client_sec.read_bytes())
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "nomad.key").write_bytes(client_sec.read_bytes())  # a secret under a public name
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    cases = [
        (["--curve-secret-file", str(server_pub)], "holds only a public key: pass the server's .key_secret file"),
        (["--curve-secret-file", str(garbage)], "neither a ZeroMQ certificate nor a Z85 secret key"),
        (["--curve-secret-file", str(tmp_path / "missing.key_secret")], "no such file"),
        (["--curve-secret-file", str(server_sec), "--curve-allow", str(client_sec)], "is a secret key file"),
        (["--curve-secret-file", str(server_sec), "--curve-allow", str(client_pub)], "is a file"),
        (["--curve-secret-file", str(server_sec), "--curve-allow", str(renamed)], "holds a secret key"),
        (["--curve-secret-file", str(server_sec), "--curve-allow", str(only_secrets)], "holds no client .key file"),
        (["--curve-allow", str(tmp_path / "clients")], "--curve-allow needs --curve-secret-file"),
    ]
    for flags, text in cases:
        out = _serve("--bind", "tcp://127.0.0.1:*", "--target", f"folder:{tmp_path / 'g'}", *flags)
        assert out.returncode == 2, (flags, out.stderr)
        assert text in out.stderr, (flags, out.stderr)
        assert "cannot bind" not in out.stderr and "Invalid argument" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def _ping_with(endpoint: str, server_pub: Path, client_secret: Path | None, timeout: float) -> bool:
    spub = zmq.auth.load_certificate(str(server_pub))[0]
    keys = zmq.auth.load_certificate(str(client_secret)) if client_secret else zmq.curve_keypair()
    with IngestClient(endpoint, timeout=timeout, retries=0, curve=(spub, *keys)) as c:  # type: ignore[arg-type]
        try:
            return c.ping()["pong"] is True
        except GalleryUnavailable:
            return False


def test_cli_serve_with_allow_list(tmp_path: Path) -> None:
    server_pub, server_sec = keygen(tmp_path / "keys", "gallery")
    _, allowed_sec = keygen(tmp_path / "allowed", "nomad")  # keygen writes the secret next to it: only warned about
    _, stranger_sec = keygen(tmp_path / "strangers", "other")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    proc = subprocess.Popen([sys.executable, "-m", "gallery_bridge", "serve", "--bind", endpoint, "--target", f"folder:{tmp_path / 'g'}",
                             "--curve-secret-key", str(server_sec), "--curve-allow", str(tmp_path / "allowed")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _ping_with(endpoint, server_pub, allowed_sec, 0.5):
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
        assert not _ping_with(endpoint, server_pub, stranger_sec, 1.0)  # unlisted: no service
        assert not _ping_with(endpoint, server_pub, None, 1.0)  # a throwaway key pair neither
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "only the public .key files are read" in err


def test_cli_bare_z85_secret_still_encrypts(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    (tmp_path / "z85").write_bytes(secret + b"\n")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    env["GALLERY_BRIDGE_CURVE_SECRET_FILE"] = str(tmp_path / "z85")
    proc = subprocess.Popen([sys.executable, "-m", "gallery_bridge", "serve", "--bind", endpoint, "--target", f"folder:{tmp_path / 'g'}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with IngestClient(endpoint, timeout=0.5, retries=100, curve=(public, *zmq.curve_keypair())) as c:
            assert c.info()["curve"] == {"enabled": True, "allow_list": False}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_stop_and_join_alone_also_leave_no_thread(ingester: Ingester, tmp_path: Path) -> None:
    """Callers that run the loop on their own thread and only stop() it: the loop cleans up after itself."""
    before = _server_threads()
    _, server_sec = keygen(tmp_path / "keys", "gallery")
    keygen(tmp_path / "allowed", "nomad")
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret_key=server_sec, curve_allow=tmp_path / "allowed"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server.stop()
    thread.join(20)
    assert [t for t in _server_threads() - before if t.is_alive()] == []
