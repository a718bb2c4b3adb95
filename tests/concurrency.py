"""Thread plumbing the tests share: a server loop in the background, N clients at once."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def background(target: Callable[[], object], stop: Callable[[], object], *, join_timeout: float = 10.0,
               must_stop: bool = True) -> Iterator[threading.Thread]:
    """Run ``target`` in a daemon thread for the ``with`` block; then ``stop()`` and join it.

    ``must_stop``: fail when the thread is still alive after ``join_timeout`` (a loop that
    ignores its stop signal is a bug in the code under test, not a detail to hide).
    """
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop()
        thread.join(timeout=join_timeout)
        if must_stop:
            assert not thread.is_alive(), f"{target!r} did not stop within {join_timeout} s"


def at_once(fn: Callable[[], T], n: int, *, join_timeout: float = 30.0) -> tuple[list[T], list[BaseException]]:
    """Call ``fn`` from ``n`` threads at the same time; (results, errors) once all are done.

    Every thread is joined with ``join_timeout``; one still running afterwards is an error.
    """
    results: list[T] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - collected for the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    errors += [TimeoutError(f"{t.name} still running after {join_timeout} s") for t in threads if t.is_alive()]
    return results, errors
