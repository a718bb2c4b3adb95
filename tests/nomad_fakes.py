"""Small test doubles for nomad's unit tests (the emulator tests use the real HTTP stack)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from nomad.http import HttpResponse, HttpStatusError

T = TypeVar("T")


def pillow_load_sizes(monkeypatch: Any, run: Callable[[], T]) -> tuple[list[tuple[int, int]], T]:
    """The sizes Pillow decodes at while ``run`` runs (a JPEG's draft size), and what ``run`` returned."""
    from PIL import ImageFile

    sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    try:
        out = run()
    finally:
        monkeypatch.setattr(ImageFile.ImageFile, "load", real_load)
    return sizes, out


@dataclass
class Reply:
    """One scripted answer; ``error`` (a FetchError) is raised instead, as if the site were unreachable."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    error: Exception | None = None


class Clock:
    """Injected monotonic time and sleep: sleeping advances the clock and is recorded, never real."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> bool:
        self.slept.append(s)
        self.t += s
        return False


class Cursors(dict):
    """An in-memory ``Cursors`` (the store's own is tested in test_nomad_store.py)."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name, default)

    def set(self, name: str, value: str) -> None:
        self[name] = value


class FakeHttp:
    """Answers requests from a script, in order, recording (method, url, kwargs).

    Like nomad.http.HttpClient, a status >= 400 raises HttpStatusError.
    """

    def __init__(self, script: list[Reply] | None = None, routes: dict[str, Reply] | None = None) -> None:
        self.script = list(script or [])
        self.routes = routes or {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kw: Any) -> HttpResponse:
        self.calls.append((method, url, kw))
        reply = None
        for prefix, r in self.routes.items():
            if url.startswith(prefix) or prefix in url:
                reply = r
                break
        if reply is None:
            if not self.script:
                raise AssertionError(f"unexpected request {method} {url}")
            reply = self.script.pop(0)
        if reply.error is not None:
            raise reply.error
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        if reply.status >= 400:
            ra = reply.headers.get("Retry-After")
            raise HttpStatusError(reply.status, reply.headers, url=url, retry_after=float(ra) if ra else None, body=body)
        return HttpResponse(reply.status, reply.headers, body, url, [])
