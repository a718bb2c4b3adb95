"""What the web app needs from other parts of gallery_bridge, each of which may be missing.

Search (:mod:`gallery_bridge.search`), the review queue
(:mod:`gallery_bridge.reviews`) and labels (:mod:`gallery_bridge.labels`, the
``label`` op of a running ``serve``) are optional here: an install without one
of them, a model directory without a text tower, or an older ``serve`` that
answers ``unknown_op`` turns into :class:`Unavailable`, which the routes
answer with a 503 and one line saying what is missing; the rest of the app
keeps working.
"""
from __future__ import annotations

import importlib
import logging
import sqlite3
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("gallery_bridge.web")


class Unavailable(Exception):
    """A feature that cannot answer now; the message says why and what to do."""


class BadQuery(ValueError):
    """The search query itself is unusable (empty, too long, not an image): a 400, not a 503."""


def optional(name: str) -> ModuleType | None:
    """``gallery_bridge.<name>`` or None when this install does not have it (a real import error still raises)."""
    full = f"gallery_bridge.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None
        raise


class Search:
    """One shared :class:`gallery_bridge.search.Searcher`, made on first use and refreshed before each query."""

    def __init__(self, catalogue: Path, models: Path | None) -> None:
        self.catalogue = catalogue
        self.models = models
        self._lock = threading.Lock()
        self._searcher: Any = None

    def _get(self) -> Any:
        mod = optional("search")
        if mod is None:
            raise Unavailable("search is not part of this install (gallery_bridge.search is missing)")
        if not self.catalogue.is_file():
            raise Unavailable("the gallery is empty: nothing to search yet")
        if self._searcher is None:
            try:
                self._searcher = mod.Searcher(self.catalogue, self.models)
            except mod.SearchUnavailable as exc:
                raise Unavailable(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - as in _run
                log.exception("search could not start")
                raise Unavailable(f"search could not start: {type(exc).__name__}: {exc}") from None
        return self._searcher

    def _run(self, method: str, *args: Any) -> list[tuple[int, float]]:
        mod = optional("search")
        # One query at a time: the index is refreshed in place and the ONNX sessions are shared.
        with self._lock:
            searcher = self._get()
            try:
                searcher.refresh()
                return [(int(i), float(s)) for i, s in getattr(searcher, method)(*args)]
            except getattr(mod, "BadQuery", ()) as exc:
                raise BadQuery(str(exc)) from None
            except mod.SearchUnavailable as exc:  # type: ignore[union-attr]
                raise Unavailable(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - a failing search must not take the pages down with it
                log.exception("search failed")
                raise Unavailable(f"search failed: {type(exc).__name__}: {exc}") from None

    def text_available(self) -> bool:
        try:
            with self._lock:
                return bool(self._get().text_available())
        except Unavailable:
            return False

    def by_text(self, q: str, limit: int) -> list[tuple[int, float]]:
        return self._run("by_text", q, limit)

    def by_entry(self, entry_id: int, limit: int) -> list[tuple[int, float]]:
        return self._run("by_entry", entry_id, limit)

    def by_image(self, data: bytes, limit: int) -> list[tuple[int, float]]:
        return self._run("by_image", data, limit)


def reviews() -> ModuleType:
    mod = optional("reviews")
    if mod is None:
        raise Unavailable("the review queue is not part of this install (gallery_bridge.reviews is missing)")
    return mod


def review_page(conn: sqlite3.Connection | None, limit: int, before: int | None) -> tuple[list[dict[str, Any]], int]:
    """Review items newest first and how many there are; none when the catalogue has no review table yet."""
    mod = reviews()
    if conn is None:
        return [], 0
    try:
        return [dict(i) for i in mod.list_items(conn, limit, before)], int(mod.count(conn))
    except sqlite3.OperationalError as exc:
        # A catalogue written by a serve that predates the review queue: nothing to review.
        log.debug("no review items: %s", exc)
        return [], 0


def review_item(conn: sqlite3.Connection | None, review_id: int) -> dict[str, Any] | None:
    mod = reviews()
    if conn is None:
        return None
    try:
        item = mod.get_item(conn, review_id)
    except sqlite3.OperationalError:
        return None
    return None if item is None else dict(item)


def review_image(gallery: Path, item: dict[str, Any]) -> Path:
    return Path(reviews().image_path(gallery, item))


def label_of(conn: sqlite3.Connection | None, item: str) -> str | None:
    """The item's current label ("good"/"bad") or None; None too when labels are not part of this install."""
    mod = optional("labels")
    if mod is None or conn is None:
        return None
    try:
        return mod.label_of(conn, item)
    except sqlite3.OperationalError:
        return None


def send_label(connect: str, item: str, label: str, timeout: float, context: Any) -> dict[str, Any]:
    """Ask the running ``serve`` to label ``item`` (the only writer); :class:`Unavailable` when it cannot."""
    from .. import client as gclient

    if not hasattr(gclient.IngestClient, "label"):
        raise Unavailable("labels are not part of this install (IngestClient.label is missing)")
    try:
        with gclient.IngestClient(connect, timeout=timeout, retries=1, context=context) as c:
            return dict(c.label(item, label))
    except gclient.GalleryUnavailable:
        raise Unavailable(f"gallery-bridge serve does not answer at {connect}: start it (labels are written by it)") from None
    except gclient.IngestError as exc:
        if exc.code == "unknown_op":
            raise Unavailable(f"the gallery-bridge serve at {connect} does not know the label op: update and restart it") from None
        raise
