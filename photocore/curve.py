"""CURVE security through ``zmq.auth``: key files, server sockets with an allow-list, client sockets.

One setup for every ZeroMQ link: anti_sus's server and broker and
gallery_bridge's server call :func:`secure_server`; the clients
(:class:`photocore.client.ReqClient` and so nomad towards either service) call
:func:`secure_client`. Keys are ZeroMQ certificate files written by
:func:`keygen` (``anti-sus keygen``): ``NAME.key`` is public, ``NAME.key_secret``
stays with its owner.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

ClientKeys = tuple[bytes, bytes, bytes]
"""(server public key, client public key, client secret key), Z85 bytes."""


class CurveKeyError(ValueError):
    """A key file or directory that cannot be used (message says which)."""


def keygen(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 600) into ``directory``."""
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


def is_z85_key(raw: bytes) -> bool:
    """Whether ``raw`` is a bare 40-character Z85 key (32 bytes once decoded)."""
    if len(raw) != 40:
        return False
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, IndexError):
        return False
    return True


def public_key(value: bytes | str | Path) -> bytes:
    """A Z85 public key given directly (bytes) or as a certificate file path."""
    if isinstance(value, bytes):
        return value
    return load_keypair(value)[0]


@dataclass(frozen=True)
class KeyFile:
    """What a key file holds: a certificate's public (and maybe secret) key, or one bare Z85 key.

    A bare key file does not say whether it is public or secret; the flag it
    was given to does.
    """

    public: bytes | None = None
    secret: bytes | None = None
    bare: bytes | None = None


def read_key_file(path: str | Path, flag: str, kind: str = "public") -> KeyFile:
    """Read a ZeroMQ certificate (``anti-sus keygen``) or a file holding a bare 40-character Z85 key.

    ``kind`` ("public" or "secret") only words the error of a file that is neither.
    """
    p = Path(path)
    if not p.is_file():
        raise CurveKeyError(f"{flag} {p}: not found")
    try:
        public, secret = load_keypair(p)
    except CurveKeyError:
        try:
            raw = p.read_bytes().strip()
        except OSError as exc:
            raise CurveKeyError(f"{flag} {p}: {exc.strerror or exc}") from None
        if is_z85_key(raw):
            return KeyFile(bare=raw)
        raise CurveKeyError(f"{flag} {p} is neither a ZeroMQ certificate nor a Z85 {kind} key "
                            "(make a key pair with `anti-sus keygen`)") from None
    return KeyFile(public=public, secret=secret)


def server_public_key(path: str | Path, flag: str = "--server-key") -> bytes:
    """A server's public key for a client, from a certificate (``.key``) or a file holding a bare Z85 key.

    A secret key where the public one belongs is refused: the server's secret
    must never be copied to a client.
    """
    p = Path(path)
    secret_msg = (f"{flag} {p} holds a secret key; pass the server's public key "
                  "(the .key file, never the .key_secret: the secret stays on the server)")
    if p.name.endswith(".key_secret"):
        raise CurveKeyError(secret_msg)
    key = read_key_file(p, flag, "public")
    if key.secret is not None:
        raise CurveKeyError(secret_msg)
    return key.bare if key.bare is not None else key.public  # type: ignore[return-value]


def client_keys(server_key: bytes | str | Path, client_keys: tuple[bytes, bytes] | str | Path | None) -> ClientKeys:
    """(server public, client public, client secret) for a client socket.

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
    return public_key(server_key), public, secret


def check_allow_dir(path: str | Path, flag: str = "--curve-allow") -> Path:
    """The allow-list directory, checked: public client ``.key`` files only, at least one.

    A secret key where a public one belongs is refused (a client's secret stays
    with the client); stray ``.key_secret`` files next to the public keys are
    only warned about, since ``keygen`` writes both into one folder.
    """
    p = Path(path)
    what = f"{flag} takes a directory of the allowed clients' public .key files"
    if p.is_file():
        try:
            secret = load_keypair(p)[1]
        except CurveKeyError:
            secret = None
        if secret is not None:
            raise CurveKeyError(f"{flag} {p} is a secret key file: {what} (a .key_secret stays with its client)")
        raise CurveKeyError(f"{flag} {p} is a file: {what}; put the .key file into a directory and pass that")
    if not p.is_dir():
        raise CurveKeyError(f"{flag} {p} does not exist: {what}")
    keys = sorted(p.glob("*.key"))
    for key in keys:
        try:
            secret = load_keypair(key)[1]
        except CurveKeyError as exc:
            raise CurveKeyError(f"{flag}: {exc}") from None
        if secret is not None:
            raise CurveKeyError(f"{flag}: {key} holds a secret key: {what} (a .key_secret stays with its client)")
    stray = sorted(s.name for s in p.glob("*.key_secret"))
    if not keys:
        raise CurveKeyError(f"{flag} {p} holds no client .key file, so no client could connect"
                            + (f" (found only secret keys: {', '.join(stray)}; give the public .key files instead)" if stray else ""))
    for name in stray:
        log.warning("%s %s also holds the secret key %s: only the public .key files are read; "
                    "a client's secret belongs with the client", flag, p, name)
    return p


def secure_server(ctx: zmq.Context, sockets: list[zmq.Socket], secret_key: str | Path | bytes,
                  allow_dir: str | Path | None) -> ThreadAuthenticator:
    """Make ``sockets`` CURVE servers; only clients whose public key is in ``allow_dir`` get in.

    ``secret_key`` is a ``.key_secret`` certificate file or a bare Z85 secret
    (bytes). Without ``allow_dir`` any client that knows the server key is
    accepted (encryption without client authentication). The returned
    authenticator runs a ZAP thread: ``stop()`` it when the sockets close.
    """
    if isinstance(secret_key, bytes):
        if not is_z85_key(secret_key):
            raise CurveKeyError("a bare CURVE secret must be a 40-character Z85 key")
        secret: bytes | None = secret_key
        public = zmq.curve_public(secret_key)
    else:
        public, secret = load_keypair(secret_key)
    if secret is None:
        raise CurveKeyError(f"{secret_key} holds no secret key; pass the .key_secret file")
    allow = check_allow_dir(allow_dir) if allow_dir is not None else None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    if allow is not None:
        auth.configure_curve(domain="*", location=str(allow))
    else:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    for s in sockets:
        s.curve_secretkey = secret
        s.curve_publickey = public
        s.curve_server = True
    return auth


def secure_client(sock: Any, server_key: bytes | str | Path, client_keys_: tuple[bytes, bytes] | str | Path | None) -> None:
    """Make ``sock`` a CURVE client of the server with public key ``server_key`` (see :func:`client_keys`)."""
    server, public, secret = client_keys(server_key, client_keys_)
    sock.curve_serverkey = server
    sock.curve_publickey = public
    sock.curve_secretkey = secret
