"""photocore.curve: key files, the allow-list check and CURVE sockets (real ZAP on 127.0.0.1)."""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from photocore.curve import (CurveKeyError, check_allow_dir, client_keys, keygen, load_keypair, read_key_file,
                             secure_client, secure_server, server_public_key)

pytestmark = pytest.mark.timeout(60)


def test_keygen_writes_a_private_secret(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path / "k", "svc")
    assert public.name == "svc.key" and secret.name == "svc.key_secret"
    assert secret.stat().st_mode & 0o077 == 0
    assert load_keypair(public)[1] is None and load_keypair(secret)[1] is not None


def test_server_public_key_reads_certificates_and_bare_keys_and_refuses_secrets(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path, "s")
    pub = load_keypair(public)[0]
    assert server_public_key(public, "--x") == pub
    bare = tmp_path / "bare.pub"
    bare.write_bytes(pub + b"\n")
    assert server_public_key(bare, "--x") == pub
    with pytest.raises(CurveKeyError, match="holds a secret key"):
        server_public_key(secret, "--x")
    renamed = tmp_path / "renamed.key"
    renamed.write_bytes(secret.read_bytes())
    with pytest.raises(CurveKeyError, match="holds a secret key"):
        server_public_key(renamed, "--x")
    junk = tmp_path / "junk"
    junk.write_text("hello")
    with pytest.raises(CurveKeyError, match="neither a ZeroMQ certificate nor a Z85 public key"):
        server_public_key(junk, "--x")
    with pytest.raises(CurveKeyError, match="not found"):
        read_key_file(tmp_path / "missing", "--x")


def test_client_keys_from_a_secret_file_or_a_throwaway_pair(tmp_path: Path) -> None:
    spub, _ = keygen(tmp_path, "server")
    cpub, csec = keygen(tmp_path, "client")
    server, public, secret = client_keys(spub, csec)
    assert server == load_keypair(spub)[0] and public == load_keypair(cpub)[0] and secret == load_keypair(csec)[1]
    a, b = client_keys(spub, None), client_keys(spub, None)
    assert a[1] != b[1]  # a fresh throwaway pair each time
    with pytest.raises(CurveKeyError, match="no secret key"):
        client_keys(spub, cpub)


def test_allow_dir_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    allow = tmp_path / "allow"
    pub, sec = keygen(allow, "nomad")  # keygen puts the secret next to it: only warned about
    with caplog.at_level(logging.WARNING):
        assert check_allow_dir(allow) == allow
    assert "nomad.key_secret" in caplog.text
    with pytest.raises(CurveKeyError, match="is a secret key file"):
        check_allow_dir(sec)
    with pytest.raises(CurveKeyError, match="is a file"):
        check_allow_dir(pub)
    with pytest.raises(CurveKeyError, match="does not exist"):
        check_allow_dir(tmp_path / "nowhere")
    only_secret = tmp_path / "only"
    keygen(only_secret, "x")
    (only_secret / "x.key").unlink()
    with pytest.raises(CurveKeyError, match="holds no client .key file.*x.key_secret"):
        check_allow_dir(only_secret)
    (only_secret / "y.key").write_bytes(sec.read_bytes())  # a secret under a public name
    with pytest.raises(CurveKeyError, match="holds a secret key"):
        check_allow_dir(only_secret)


def _ask(ctx: zmq.Context, endpoint: str, keys: tuple[bytes, bytes, bytes] | None, timeout_ms: int) -> bool:
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    sock.connect(endpoint)
    try:
        sock.send(b"hi")
        return bool(sock.poll(timeout_ms, zmq.POLLIN)) and sock.recv() == b"hi back"
    finally:
        sock.close(0)


def allow_listed_keys(tmp_path: Path) -> dict[str, Path]:
    """A server key pair, a client whose public key is in the ``allow`` directory, and a stranger."""
    spub, ssec = keygen(tmp_path / "keys", "server")
    cpub, csec = keygen(tmp_path / "keys", "client")
    _, stranger = keygen(tmp_path / "keys", "stranger")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "client.key").write_bytes(cpub.read_bytes())
    return {"server": spub, "server_secret": ssec, "client_secret": csec, "stranger_secret": stranger, "allow": allow}


@contextlib.contextmanager
def rep_server(secret: Path | bytes, allow: Path | None) -> Iterator[tuple[zmq.Context, str, list[bytes]]]:
    """A CURVE REP socket on 127.0.0.1 that answers one request; yields (context, endpoint, requests answered)."""
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    auth = secure_server(ctx, [rep], secret, allow)
    answered: list[bytes] = []

    def serve_one() -> None:
        if rep.poll(20000, zmq.POLLIN):
            answered.append(rep.recv())
            rep.send(b"hi back")

    t = threading.Thread(target=serve_one, daemon=True)
    try:
        endpoint = f"tcp://127.0.0.1:{rep.bind_to_random_port('tcp://127.0.0.1')}"
        t.start()
        yield ctx, endpoint, answered
    finally:
        t.join(25)
        rep.close(0)
        auth.stop()
        ctx.term()


def test_secure_server_serves_listed_keys_and_refuses_an_unlisted_one(tmp_path: Path) -> None:
    k = allow_listed_keys(tmp_path)
    with rep_server(k["server_secret"], k["allow"]) as (ctx, endpoint, answered):
        assert not _ask(ctx, endpoint, client_keys(k["server"], k["stranger_secret"]), 700)  # unlisted: ZAP says no
        assert not _ask(ctx, endpoint, None, 300)  # no CURVE at all
        assert _ask(ctx, endpoint, client_keys(k["server"], k["client_secret"]), 20000)
    assert answered == [b"hi"]  # only the listed client's request got through


def test_secure_server_needs_a_secret_and_a_good_allow_dir(tmp_path: Path) -> None:
    spub, ssec = keygen(tmp_path, "server")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(CurveKeyError, match="no secret key"):
            secure_server(ctx, [sock], spub, None)
        with pytest.raises(CurveKeyError, match="does not exist"):
            secure_server(ctx, [sock], ssec, tmp_path / "none")
    finally:
        sock.close(0)
        ctx.term()


def test_secure_client_sets_the_three_keys(tmp_path: Path) -> None:
    spub, _ = keygen(tmp_path, "server")
    _, csec = keygen(tmp_path, "client")

    class Fake:
        curve_serverkey = curve_publickey = curve_secretkey = b""

    sock = Fake()
    secure_client(sock, spub, csec)
    assert (sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey) == client_keys(spub, csec)


def test_secure_server_with_a_bare_z85_secret_encrypts_for_any_client() -> None:
    public, secret = zmq.curve_keypair()
    with rep_server(secret, None) as (ctx, endpoint, answered):
        assert not _ask(ctx, endpoint, None, 300)  # plain text gets nothing
        assert _ask(ctx, endpoint, client_keys(public, None), 20000)  # a throwaway pair that knows the key
        with pytest.raises(CurveKeyError, match="40-character Z85"):
            secure_server(ctx, [ctx.socket(zmq.REP)], b"short", None)
    assert answered == [b"hi"]
