"""Serving the app with waitress, and the rules about where it may listen and with which token."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from photocore.errors import UserError
from photocore.redact import register_secret
from photocore.settings import read_secret

from .app import WebConfig, create_app
from .security import check_exposure

log = logging.getLogger("gallery_bridge.web")

TOKEN_VAR = "GALLERY_BRIDGE_WEB_TOKEN"
MIN_TOKEN = 16
"""Shortest token accepted: it is the only thing between the network and the gallery."""


def resolve_token(create: bool, environ: dict[str, str] | None = None) -> str | None:
    """The token from ``GALLERY_BRIDGE_WEB_TOKEN`` or the file ``GALLERY_BRIDGE_WEB_TOKEN_FILE`` names.

    With ``create`` a named file that does not exist yet is made (mode 0600) with
    a fresh random token, so a container starts protected without anyone
    choosing a password; the operator reads it from that file.
    """
    env = dict(os.environ if environ is None else environ)
    file_var = TOKEN_VAR + "_FILE"
    path = env.get(file_var, "").strip()
    if create and path and not env.get(TOKEN_VAR, "").strip() and not Path(path).exists():
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        except OSError as exc:
            raise UserError(f"cannot create the token file {file_var}={path}: {exc}") from None
        log.warning("wrote a new web token to %s (read it there to log in)", path)
    token = read_secret(TOKEN_VAR, env)
    if token is not None:
        if len(token) < MIN_TOKEN:
            raise UserError(f"{TOKEN_VAR} is {len(token)} characters: use at least {MIN_TOKEN} "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        register_secret(token)
    return token


def split_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``[::1]:8780`` for IPv6; port 0 picks a free one (printed at start)."""
    host, sep, number = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not number.isdigit() or int(number) > 65535:
        raise UserError(f"--bind {text!r}: must be HOST:PORT with a port within 0-65535, e.g. 127.0.0.1:8780")
    return host, int(number)


def run(cfg: WebConfig, bind: str, threads: int = 8) -> None:
    """Serve until interrupted; refuses a non-loopback address without a token."""
    from waitress import create_server

    host, port = split_bind(bind)
    check_exposure(host, cfg.token)
    if not cfg.gallery.is_dir():
        raise UserError(f"--gallery {cfg.gallery}: no such folder (the folder target of gallery-bridge serve)")
    app = create_app(cfg)
    try:
        server = create_server(app, host=host, port=port, threads=threads, ident="gallery-bridge",
                               # Bounds on what a client can make the server hold: bodies and headers.
                               max_request_body_size=cfg.max_upload_bytes + 64 * 1024,
                               max_request_header_size=64 * 1024)
    except OSError as exc:
        raise UserError(f"cannot listen on {bind}: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    log.info("gallery web app on http://%s:%s/ (gallery %s, labels via %s%s)", shown, server.effective_port,
             cfg.gallery, cfg.connect, ", token required" if cfg.token else "")
    print(f"gallery web app: http://{shown}:{server.effective_port}/", flush=True)
    try:
        server.run()
    finally:
        server.close()
