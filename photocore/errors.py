"""The one error type every command turns into a one-line message and a non-zero exit."""
from __future__ import annotations

import sys


class UserError(Exception):
    """A failure the user can fix (a bad flag, a missing file, a wrong key): printed without a traceback.

    ``status`` is the exit code the command ends with (2, like argparse, unless
    the command documents another).
    """

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def report_failure(prog: str, exc: BaseException) -> int:
    """Print a command's failure as one line on stderr and return its exit status (never a traceback).

    :class:`UserError`: ``prog: error: …`` and its status; a service that did not
    answer (``photocore.client.Unavailable``): ``prog: …`` and 1; a service that
    answered with an error (``photocore.client.ServerError``): ``prog: server error …`` and 1.
    Anything else is re-raised.
    """
    from .client import ServerError, Unavailable  # here, so importing errors never loads ZeroMQ

    if isinstance(exc, UserError):
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.status
    if isinstance(exc, Unavailable):
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, ServerError):
        print(f"{prog}: server error {exc}", file=sys.stderr)
        return 1
    raise exc
