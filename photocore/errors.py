"""The one error type every command turns into a one-line message and a non-zero exit."""
from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix (a bad flag, a missing file, a wrong key): printed without a traceback.

    ``status`` is the exit code the command ends with (2, like argparse, unless
    the command documents another).
    """

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
