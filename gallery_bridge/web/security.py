"""The web app's guards: who may use it, forged requests, and what the browser may load.

- **Access.** Bound to a loopback address the app is open to this machine's
  users (as the gallery folder is). Bound anywhere else it refuses to start
  without a token (:func:`check_exposure`); then every request needs either
  the session cookie that ``/login`` sets after the token was typed, or an
  ``Authorization: Bearer TOKEN`` header (scripts).
- **CSRF.** Every POST carries the session's random token, in the
  ``X-CSRF-Token`` header (the page's JavaScript) or a ``csrf_token`` form
  field, compared in constant time. The session cookie is ``SameSite=Strict``
  and ``HttpOnly`` as a second line. A POST authenticated by the Bearer header
  alone carries no cookie a third-party page could ride on, so it needs none.
- **Headers.** A strict Content-Security-Policy (scripts and styles from this
  origin's static files only, no inline code, no frames), ``nosniff``, no referrer.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from typing import Any

from flask import Flask, Response, abort, jsonify, redirect, request, session, url_for

from photocore.errors import UserError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

OPEN_PATHS = {"/healthz", "/login"}
"""Reachable without the token: the health check (says nothing private) and the login form itself."""


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) only ever resolves to loopback addresses."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token (one line, exit 2)."""
    if token is None and not is_loopback(host):
        raise UserError(f"--bind {host} is not a loopback address: set a token in GALLERY_BRIDGE_WEB_TOKEN "
                        "(or a file named by GALLERY_BRIDGE_WEB_TOKEN_FILE) before exposing the gallery")


def csrf_token() -> str:
    """This session's CSRF token (made on first use)."""
    tok = session.get("csrf")
    if not isinstance(tok, str):
        tok = secrets.token_urlsafe(32)
        session["csrf"] = tok
    return tok


def _bearer_ok(token: str) -> bool:
    auth = request.headers.get("Authorization", "")
    return auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), token.encode())


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def install(app: Flask, token: str | None) -> None:
    """Hook the guards into ``app``; ``token`` None means open (loopback)."""
    app.config.update(SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_HTTPONLY=True, SECRET_KEY=secrets.token_bytes(32))

    @app.before_request
    def guard() -> Any:
        bearer = token is not None and _bearer_ok(token)
        if token is not None and not bearer and request.path not in OPEN_PATHS and not request.path.startswith("/static/"):
            if not session.get("auth"):
                if _wants_json():
                    return jsonify(error="unauthorized", message="log in at /login or send Authorization: Bearer TOKEN"), 401
                return redirect(url_for("login", next=request.full_path if request.query_string else request.path))
        if request.method == "POST" and not bearer:
            sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
            expected = session.get("csrf")
            if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
                if _wants_json():
                    return jsonify(error="csrf", message="missing or wrong CSRF token: reload the page"), 403
                abort(403, "missing or wrong CSRF token: reload the page")
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        return resp

    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["login_required"] = token is not None

    def check_login(typed: str) -> bool:
        return token is not None and hmac.compare_digest(typed.encode(), token.encode())

    app.extensions["gallery_web_check_login"] = check_login
