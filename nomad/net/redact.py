"""Credentials never reach a log line or an error message.

nomad puts API keys in query strings (flickr's ``api_key``), sends Client-IDs
and tokens in headers, and urllib3 logs every request line (path and query) at
DEBUG. One helper, :func:`redact`, cleans any text: URL query parameters with a
credential-like name and ``user:password@`` in URLs are replaced by
``REDACTED``, and so is every secret value registered with
:func:`register_secret` (the credentials nomad read from its environment, in
case a server echoes one in an error body). :class:`RedactingFilter` applies it
to every log record a handler emits, whichever library logged it.
"""
from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Mapping
from urllib.parse import quote, quote_plus

MASK = "REDACTED"

SENSITIVE_PARAMS = (
    "api_key", "apikey", "api-key", "key", "client_id", "client_secret", "token", "access_token",
    "refresh_token", "id_token", "password", "passwd", "secret", "sig", "signature", "auth",
    "authorization", "session", "oauth_token", "oauth_signature", "x-amz-signature", "x-amz-credential",
)
"""Query/form parameter names whose values are credentials (compared case-insensitively)."""

# name=value where name is a whole word (so "monkey=" is left alone) and value runs to the
# next separator of a query string, a quote, whitespace or a closing bracket.
_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_.-])(" + "|".join(re.escape(p) for p in sorted(SENSITIVE_PARAMS, key=len, reverse=True))
    + r")(=|%3D)([^&\s\"'<>#;,)\]}]+)"
)
# scheme://userinfo@ : everything between the scheme and an '@' before the host's end.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@?#\"'<>]+)@")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
MIN_SECRET = 6
"""Shorter values are not registered: masking every "abc" in every log line would hide more than it protects."""


def register_secret(*values: str | None) -> None:
    """Mask these values (and their URL-encoded forms) wherever :func:`redact` sees them."""
    with _secrets_lock:
        for v in values:
            if v and len(v) >= MIN_SECRET:
                _secrets.update({v, quote(v, safe=""), quote_plus(v)})


def redact(text: object) -> str:
    """``text`` (a URL, a message, anything ``str()``-able) with every credential masked."""
    s = str(text)
    s = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", s)
    s = _PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", s)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for value in secrets:
        if value in s:
            s = s.replace(value, MASK)
    return s


def redact_url(url: str | None) -> str | None:
    """A URL safe to log (None stays None)."""
    return None if url is None else redact(url)


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in the final message and in any traceback.

    It works on the formatted message, so it catches what ``%s`` arguments bring
    in (exceptions, URLs, urllib3's request lines). A traceback is formatted and
    masked here too, and carried in the message, because formatters would
    otherwise render ``exc_info`` afterwards, unmasked.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what logging would show, masked
            message = f"{record.msg} {record.args}"
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info = None
            record.exc_text = None
        if record.stack_info:
            message += "\n" + record.stack_info
            record.stack_info = None
        record.msg = redact(message)
        record.args = None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


_CREDENTIAL_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|APIKEY|CLIENT_ID)$")


def register_env_secrets(environ: Mapping[str, str]) -> None:
    """Register the credentials of an environment: ``*_SECRET``, ``*_TOKEN``, ``*_API_KEY``,
    ``*_CLIENT_ID``, ``*_PASSWORD`` values, and the contents of their ``*_FILE`` variants."""
    for name, value in environ.items():
        if name.endswith("_FILE") and _CREDENTIAL_NAME.search(name[: -len("_FILE")]):
            try:
                with open(value, encoding="utf-8") as fh:
                    register_secret(fh.read(4096).strip())
            except (OSError, UnicodeDecodeError):  # the reader of the secret reports this, not us
                pass
        elif _CREDENTIAL_NAME.search(name):
            register_secret(value.strip())
