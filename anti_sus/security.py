"""CURVE security through ``zmq.auth``: key files, server sockets, client sockets."""
from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class CurveKeyError(ValueError):
    """A key file or directory that cannot be used (message says which)."""


def keygen(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(d), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_keypair(path: str | Path) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; secret is None for a public-only ``.key``."""
    p = Path(path)
    if not p.is_file():
        raise CurveKeyError(f"key file {p} not found (make one with `anti-sus keygen`)")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (ValueError, OSError) as exc:
        raise CurveKeyError(f"{p} is not a ZeroMQ certificate: {exc}") from None
    return public, secret


def public_key(value: bytes | str | Path) -> bytes:
    """A Z85 public key given directly (bytes) or as a certificate file path."""
    if isinstance(value, bytes):
        return value
    return load_keypair(value)[0]


def secure_server(ctx: zmq.Context, sockets: list[zmq.Socket], secret_key_file: str | Path,
                  allow_dir: str | Path | None) -> ThreadAuthenticator:
    """Make ``sockets`` CURVE servers; only clients whose public key is in ``allow_dir`` get in.

    Without ``allow_dir`` any client that knows the server key is accepted
    (encryption without client authentication).
    """
    public, secret = load_keypair(secret_key_file)
    if secret is None:
        raise CurveKeyError(f"{secret_key_file} holds no secret key; pass the .key_secret file")
    if allow_dir is not None and not Path(allow_dir).is_dir():
        raise CurveKeyError(f"--curve-allow {allow_dir} is not a directory of client .key files")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    if allow_dir is not None:
        auth.configure_curve(domain="*", location=str(allow_dir))
    else:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    for s in sockets:
        s.curve_secretkey = secret
        s.curve_publickey = public
        s.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, server_key: bytes | str | Path, client_keys: tuple[bytes, bytes] | str | Path | None) -> None:
    """Make ``sock`` a CURVE client of the server with public key ``server_key``.

    ``client_keys`` is (public, secret) or a ``.key_secret`` file; without it a
    throwaway key pair is generated (only accepted by servers that allow any client).
    """
    if client_keys is None:
        public, secret = zmq.curve_keypair()
    elif isinstance(client_keys, tuple):
        public, secret = client_keys
    else:
        public, maybe = load_keypair(client_keys)
        if maybe is None:
            raise CurveKeyError(f"{client_keys} holds no secret key; pass the client's .key_secret file")
        secret = maybe
    sock.curve_serverkey = public_key(server_key)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
