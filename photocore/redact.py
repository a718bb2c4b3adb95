"""Credentials never reach a log line, an error message or an ``info`` reply.

One filter for every service. What counts as a credential:

* anything in a URL's userinfo (``https://user:pass@host``);
* the value of a query/form parameter with a credential-like name
  (``api_key=…``, ``client_id=…``, ``token=…``; flickr puts its key in the query
  string and urllib3 logs every request line at DEBUG);
* every value registered with :func:`register_secret` (a password read from a
  secret file, the credentials of the environment via
  :func:`register_env_secrets`), also URL-encoded, in case a server echoes one.

:func:`redact` masks them in a text with ``***``; :class:`RedactingFilter` does it
for every record a log handler emits, at any level and from any library,
tracebacks and ``extra=`` fields included.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Mapping
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

MASK = "***"

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

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

MIN_ENV_SECRET = 6
"""Environment values shorter than this are not registered by :func:`register_env_secrets`:
masking every "abc" in every log line would hide more than it protects."""


def register_secret(*values: str | None) -> None:
    """Mask these values (and their URL-encoded and -decoded spellings) from now on; empty ones are ignored."""
    with _secrets_lock:
        for v in values:
            if v:
                _secrets.update({v, quote(v, safe=""), quote_plus(v), unquote(v)} - {""})


def redact(text: object) -> str:
    """``text`` (a URL, a message, anything ``str()``-able) with every credential masked."""
    s = str(text)
    s = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", s)
    s = _PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", s)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)  # longest first: a secret may contain another
    for value in secrets:
        if value in s:
            s = s.replace(value, MASK)
    return s


def redact_url(url: str | None) -> str | None:
    """A URL safe to log (None stays None)."""
    return None if url is None else redact(url)


def userinfo_secrets(url: str) -> list[str]:
    """The password in a URL's userinfo (to register it).

    The user name is not registered on its own (a name like "bot" would mask
    words all over the log); inside a URL the whole userinfo is masked anyway.
    """
    password = urlsplit(url).password
    return [unquote(password)] if password else []


def safe_url(url: str) -> str:
    """``url`` without its userinfo: what may be shown in ``info`` and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites each record with :func:`redact` applied.

    It works on the formatted message, so it catches what ``%s`` arguments bring
    in (exceptions, URLs, urllib3's request lines). A traceback is formatted and
    masked here, because formatters would otherwise render ``exc_info``
    afterwards, unmasked; string ``extra=`` fields are masked too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what logging would show, masked
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            # The text formatter prints exc_text; the JSON one emits extra
            # attributes, so the masked traceback travels as ``exc`` too.
            record.exc_info = None
            record.exc_text = redact(text)
            record.exc = record.exc_text  # type: ignore[attr-defined]
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RESERVED and isinstance(value, str):
                setattr(record, key, redact(value))
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
    values: list[str] = []
    for name, value in environ.items():
        if name.endswith("_FILE") and _CREDENTIAL_NAME.search(name[: -len("_FILE")]):
            try:
                with open(value, encoding="utf-8") as fh:
                    values.append(fh.read(4096).strip())
            except (OSError, UnicodeDecodeError):  # the reader of the secret reports this, not us
                pass
        elif _CREDENTIAL_NAME.search(name):
            values.append(value.strip())
    register_secret(*(v for v in values if len(v) >= MIN_ENV_SECRET))
