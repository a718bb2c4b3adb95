"""The one configuration layer of every command: flags, environment variables and secret files, on argparse.

Each option is an ordinary argparse option whose default comes from an
environment variable (``PREFIX`` + the flag's name, e.g. ``--max-batch`` of
anti_sus is ``ANTI_SUS_MAX_BATCH``); a flag on the command line wins over the
variable, the variable over the built-in default. ``--help`` shows each
variable and the built-in default. The rules are the same in every service:

- an empty variable counts as unset;
- a bad value in a variable is one line naming the variable (:class:`UserError`,
  exit status 2); a bad value on the command line is argparse's own one-line error;
- booleans are strict: ``1/0, true/false, yes/no, on/off`` and nothing else;
- list options read a comma-separated variable, and flags given on the command
  line replace that list instead of adding to it;
- secrets are never flags (they would show in ``ps``): a secret comes from its
  variable or from the file that ``<VAR>_FILE`` names (docker secrets).

Usage::

    parser = Parser(prog="anti-sus")
    s = Settings(parser, "ANTI_SUS_")
    s.add("--max-batch", type=positive_int, default=32, help="most images per model call")
    s.add("--bind", type=bind_endpoint, default=["tcp://127.0.0.1:7777"], many=True, help="endpoint to bind")
    s.switch("--int8", help="use the int8-quantized CLIP")
    password = read_secret("ANTI_SUS_PASSWORD")
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

from .errors import UserError

__all__ = [
    "Parser", "Settings", "UserError", "parse_bool", "read_secret", "env_name",
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "finite_float", "probability",
    "port", "port_or_off", "byte_size", "endpoint", "bind_endpoint", "endpoint_problem", "host_port",
]

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (``prog: error: …``) and exit status 2, without the usage block.

    Subcommand parsers made by ``add_subparsers`` are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def env_name(prefix: str, flag: str) -> str:
    """``("NOMAD_", "--batch-size")`` -> ``NOMAD_BATCH_SIZE``."""
    return prefix + flag.lstrip("-").replace("-", "_").replace(".", "_").upper()


def parse_bool(text: str) -> bool:
    """A strict boolean: 1/0, true/false, yes/no, on/off (any case); anything else is a ``ValueError``."""
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"expected one of {'/'.join(TRUE)} or {'/'.join(FALSE)}, got {text!r}")


def read_secret(var: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret in ``var``, else the content of the file named by ``var_FILE`` (stripped); None when neither is set.

    An unreadable file is a :class:`UserError` naming the variable and the file.
    """
    env = os.environ if environ is None else environ
    value = env.get(var, "").strip()
    if value:
        return value
    path = env.get(var + "_FILE", "").strip()
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the secret file {var}_FILE={path}: {exc}") from None


def _type_error(kind: Callable[[str], Any], raw: str, exc: Exception) -> str:
    """The message of a failed conversion: the validator's own words, or argparse's 'invalid int value'."""
    if isinstance(exc, argparse.ArgumentTypeError):
        return str(exc)
    return f"invalid {getattr(kind, '__name__', 'value')} value: {raw!r}"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


class _ReplaceList(argparse.Action):
    """A repeatable option: the first occurrence on the command line replaces the env/default list."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(ns, self.dest, None)
        # The namespace starts out holding the default object itself; never extend (or mutate) that.
        start = [] if current is None or current is self.default else list(current)
        setattr(ns, self.dest, [*start, values])


class Settings:
    """Adds options to ``parser`` (a parser or an argument group) whose defaults come from ``PREFIX…`` variables.

    ``environ`` defaults to ``os.environ``; tests pass a dict.
    """

    def __init__(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str,
                 environ: Mapping[str, str] | None = None) -> None:
        self.parser = parser
        self.prefix = prefix
        self.environ = os.environ if environ is None else environ

    def group(self, title: str, description: str | None = None) -> "Settings":
        """The same settings layer on a new argument group (``--help`` lists the group's options together)."""
        return Settings(self.parser.add_argument_group(title, description), self.prefix, self.environ)

    def env_name(self, flag: str) -> str:
        return env_name(self.prefix, flag)

    def _raw(self, var: str) -> str | None:
        raw = self.environ.get(var)
        return None if raw is None or raw.strip() == "" else raw

    def add(self, *flags: str, env: str | None = None, type: Callable[[str], Any] = str, default: Any = None, help: str,
            many: bool = False, sep: str | None = ",", shown: str | None = None, **kw: Any) -> argparse.Action:
        """Add an option; its default is the variable ``PREFIX + env`` (``env``: the first flag's name) when set.

        ``many``: a list option (repeatable flag; the variable is split on ``sep``, None: whitespace).
        ``shown``: how ``--help`` describes the default when the value alone says too little.
        """
        var = self.prefix + env if env else self.env_name(flags[0])
        raw = self._raw(var)
        value = default
        if raw is not None:
            items = [x.strip() for x in raw.split(sep) if x.strip()] if many else [raw]
            converted = []
            for item in items:
                try:
                    converted.append(type(item))
                except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                    raise UserError(f"environment variable {var}={raw!r} is invalid: {_type_error(type, item, exc)}") from None
                choices = kw.get("choices")
                if choices is not None and converted[-1] not in choices:
                    raise UserError(f"environment variable {var}={raw!r} is invalid: choose from "
                                    f"{', '.join(map(str, choices))}")
            value = converted if many else converted[0]
            kw["required"] = False  # the variable supplies a required option
        listed = ((", comma-separated" if sep == "," else ", space-separated" if sep is None else f", separated by {sep}")
                  if many else "")
        described = (shown if shown is not None else _shown(default)).replace("%", "%%")
        text = f"{help} [env {var}{listed}; default: {described}]"
        if many:
            return self.parser.add_argument(*flags, action=_ReplaceList, type=type, default=value, help=text, **kw)
        return self.parser.add_argument(*flags, type=type, default=value, help=text, **kw)

    def switch(self, flag: str, *, env: str | None = None, default: bool = False, help: str,
               negatable: bool = True) -> argparse.Action:
        """An on/off option: ``--flag/--no-flag`` (only ``--flag`` when not ``negatable``, e.g. for ``--no-watermark``).

        The variable must be a strict boolean (:func:`parse_bool`); anything else fails naming it.
        """
        var = self.prefix + env if env else self.env_name(flag)
        raw = self._raw(var)
        value = default
        if raw is not None:
            try:
                value = parse_bool(raw)
            except ValueError as exc:
                raise UserError(f"environment variable {var}={raw!r} is invalid: {exc}") from None
        text = f"{help} [env {var}=1|0; default: {_shown(default)}]"
        if negatable:
            return self.parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        # --no-x switches stay one flag; the variable can still turn them off again (=0).
        return self.parser.add_argument(flag, action="store_true", default=value, help=text)

    def secret(self, name: str, help: str) -> str:
        """Declare the secret ``PREFIX + name`` (never a flag): ``--help`` names it and its ``_FILE`` form.

        Returns the variable name for :func:`read_secret`.
        """
        var = self.prefix + name
        parser = self.parser if isinstance(self.parser, argparse.ArgumentParser) else None
        if parser is not None:
            note = f"secret {var} (or a file named by {var}_FILE): {help}".replace("%", "%%")
            parser.epilog = f"{parser.epilog}\n{note}" if parser.epilog else note
        return var

    def read_secret(self, name: str) -> str | None:
        """The secret ``PREFIX + name`` from this layer's environment (see :func:`read_secret`)."""
        return read_secret(self.prefix + name, self.environ)


# -- validators (argparse types: they raise ArgumentTypeError with a message that stands alone) -------------

def _number(kind: Callable[[str], Any], text: str, what: str) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    v = _number(int, text, "a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (0 usually means 'none' or 'off')."""
    v = _number(int, text, "a whole number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite."""
    v = _number(float, text, "a number")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (timeouts, intervals)."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (0: no wait)."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def probability(text: str) -> float:
    """A number within [0, 1]."""
    v = _number(float, text, "a number")
    if not 0.0 <= v <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {v}")
    return v


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    v = _number(int, text, "a port number")
    if not 0 < v < 65536:
        raise argparse.ArgumentTypeError(f"must be a port within 1-65535, got {v}")
    return v


def port_or_off(text: str) -> int:
    """A TCP port, or 0 for 'off' (metrics endpoints)."""
    v = _number(int, text, "a port number")
    if not 0 <= v < 65536:
        raise argparse.ArgumentTypeError(f"must be a port within 1-65535 (0: off), got {v}")
    return v


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def byte_size(text: str) -> int:
    """``1073741824``, ``512M``, ``1.5G``, ``2GiB`` -> bytes (K/M/G/T are powers of 1024); at least 1."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"must be a byte count like 1073741824, 512M or 2G, got {text!r}")
    v = int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte, got {text!r}")
    return v


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``."""
    host, sep, number = text.strip().rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port(number)


TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "tipc", "vmci", "udp", "ws", "wss")
_HOST_PORT = re.compile(r"[^\s/]+:(\d+|\*)")


def endpoint_problem(ep: str, binds: bool) -> str | None:
    """What is wrong with a ZeroMQ endpoint string, or None when it looks usable.

    Checked at start, so a typo is named instead of being answered by ZeroMQ's bare "Invalid argument".
    """
    if "://" not in ep:
        if _HOST_PORT.fullmatch(ep):
            return f"a ZeroMQ endpoint needs a transport: did you mean tcp://{ep}?"
        return "a ZeroMQ endpoint needs a transport, e.g. tcp://host:port"
    transport, _, address = ep.partition("://")
    if transport not in TRANSPORTS:
        return f"unknown transport {transport!r}; use tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    if not address:
        return f"no address after {transport}://"
    if transport == "tcp":
        host, sep, number = address.rpartition(":")
        if not sep or not host:
            return f"a tcp endpoint needs HOST:PORT, e.g. tcp://{address or '127.0.0.1'}:7777"
        if number == "*" and binds:
            return None
        if not number.isdigit() or not 0 < int(number) < 65536:
            return f"port {number!r} is not a number within 1-65535" + (" (or * for any free port)" if binds else "")
    return None


def _endpoint_type(binds: bool) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        problem = endpoint_problem(value, binds)
        if problem:
            raise argparse.ArgumentTypeError(f"{value}: {problem}")
        return value

    return parse


endpoint = _endpoint_type(False)
endpoint.__name__ = "endpoint"
endpoint.__doc__ = "A ZeroMQ endpoint to connect to (``tcp://host:port``, ``ipc://path``, ``inproc://name``)."
bind_endpoint = _endpoint_type(True)
bind_endpoint.__name__ = "bind_endpoint"
bind_endpoint.__doc__ = "A ZeroMQ endpoint to bind (``tcp://*:port`` and ``tcp://host:*`` allowed)."

