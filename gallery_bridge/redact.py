"""Keep credentials out of logs, error messages and ``info``.

Two things count as credentials here: the scenery password
(``import_images_bot_password``) and anything in a URL's userinfo
(``https://user:pass@host``). Secrets are registered once when they are read;
:func:`redact` masks them (and any userinfo) in a text, and
:class:`RedactingFilter` does it for every record a log handler emits, at any
level and from any library (urllib3's DEBUG lines included), exception
tracebacks and ``extra=`` fields too.
"""
from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

MASK = "***"

_lock = threading.Lock()
_secrets: set[str] = set()

# scheme://userinfo@ — the userinfo is whatever sits between "//" and "@" without a "/".
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@]+@")

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def register_secret(value: str | None) -> None:
    """Mask ``value`` (and its URL-encoded spellings) from now on; empty values are ignored."""
    if not value:
        return
    with _lock:
        _secrets.update({value, quote(value, safe=""), quote_plus(value), unquote(value)} - {""})


def redact(text: str) -> str:
    """``text`` with URL userinfo and every registered secret replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)  # longest first: a secret may contain another
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


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
    """A handler filter that rewrites each record with :func:`redact` applied."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = redact(message), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            # The text formatter prints exc_text; the JSON one emits extra
            # attributes, so the redacted traceback travels as ``exc`` too.
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
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (the root by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
