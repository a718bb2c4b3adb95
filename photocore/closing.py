"""``with obj:`` for every object that owns sockets, threads or files and has a ``close()``."""
from __future__ import annotations

from typing import Self

__all__ = ["Closeable"]


class Closeable:
    """A base for owners of resources: ``with X(...) as x:`` returns ``x`` and calls ``x.close()`` at the end.

    Subclasses implement :meth:`close`; it should be safe to call twice.
    """

    def close(self) -> None:
        """Release what the object holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
