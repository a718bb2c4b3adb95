"""The embedded gallery: a folder of originals and thumbnails, a catalogue and a page.

Layout::

    GALLERY/images/<id>.<ext>   originals, byte for byte as received
    GALLERY/thumbs/<id>.jpg     750 px thumbnails
    GALLERY/catalogue.sqlite    the catalogue (see catalogue.py)
    GALLERY/index.html          contact sheet, newest first
    GALLERY/.tmp/               temp files; emptied at startup

Write order for one entry (the ingester does steps 1 and 4):

1. catalogue row inserted as *pending* and committed;
2. original written to .tmp, fsynced, renamed to images/<id>.<ext>, dir fsynced;
3. thumbnail the same way into thumbs/;
4. row marked *complete* and committed: from here on the entry exists;
5. index.html rewritten atomically; then the sender gets its reply.

fsyncs per added image: 4 here (each file, and each of the two directories
its rename went into) plus SQLite's two commits. The page is *not* fsynced:
it is derived data, rebuilt from the catalogue by :meth:`recover` at every
start, before the first request is served, so a power cut can at worst leave
a stale (or empty) index.html until that restart; the rename still keeps a
live reader from ever seeing half a page. On ingest only the new entry's
figure is rendered (the shown ones are kept in memory, see :meth:`published`),
so the page costs the same at 50 entries as at a million.

A crash before 4 leaves a pending row and maybe files: :meth:`recover` deletes
both, so redelivery starts clean. A crash after 4 leaves a complete entry, and
redelivery answers ``duplicate`` with its id. Files are named by catalogue id
only, so nothing from metadata ever reaches a path.
"""
from __future__ import annotations

import collections
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from .. import page
from ..catalogue import Catalogue
from photocore.atomic import atomic_write, fsync_dir, publish, write_temp
from ..thumbnails import make_thumbnail
from ..validate import CheckedImage, Meta
from . import Stored

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d+)\.(jpg|png|webp)$")


class FolderTarget:
    """Stores entries under one directory; the catalogue lives there too."""

    name = "folder"

    def __init__(self, root: Path, *, page_limit: int = 500, crash: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.thumbs = self.root / "thumbs"
        self.tmp = self.root / ".tmp"
        for d in (self.root, self.images, self.thumbs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.page_limit = page_limit
        self._crash = crash or (lambda point: None)
        self.title = self.root.resolve().name or "gallery"
        # The page as shown: (entry id, rendered figure as UTF-8), newest first, and
        # the number of complete entries; None until a full write_page fills it.
        self._figures: collections.deque[tuple[int, bytes]] | None = None
        self._total = 0
        self.page_writes = {"full": 0, "incremental": 0}
        """How often the page was rebuilt from the catalogue and how often by adding one figure (tests, bench)."""

    @property
    def catalogue_path(self) -> Path:
        return self.root / "catalogue.sqlite"

    def image_path(self, entry_id: int, ext: str) -> Path:
        return self.images / f"{int(entry_id)}.{ext}"

    def thumb_path(self, entry_id: int) -> Path:
        return self.thumbs / f"{int(entry_id)}.jpg"

    # ---- ingest ------------------------------------------------------------------
    def store(self, entry_id: int, image: CheckedImage, meta: Meta) -> Stored:
        tmp = self.tmp / f"{int(entry_id)}.{image.ext}.{os.getpid()}"
        write_temp(tmp, image.data)
        self._crash("image_tmp")
        publish(tmp, self.image_path(entry_id, image.ext))
        self._crash("image")
        self.write_thumbnail(entry_id, image)
        self._crash("thumb")
        return Stored("added", int(entry_id))

    def write_thumbnail(self, entry_id: int, image: CheckedImage) -> None:
        atomic_write(self.thumb_path(entry_id), make_thumbnail(image.upright), self.tmp)

    def discard(self, entry_id: int, ext: str) -> None:
        for path in (self.image_path(entry_id, ext), self.thumb_path(entry_id)):
            path.unlink(missing_ok=True)
        for stray in self.tmp.glob(f"{int(entry_id)}.*"):
            stray.unlink(missing_ok=True)
        fsync_dir(self.images)
        fsync_dir(self.thumbs)

    def published(self, catalogue: Catalogue, entry_id: int | None = None) -> None:
        """Rewrite the page after a change; ``entry_id``: the change was that entry becoming complete.

        A new entry (its id above every shown one: ids only grow, ingests are
        serialised and this process is the only writer, see WriterLock) is
        rendered alone and put in front of the kept figures. Anything else
        (a removal, an unknown state) rebuilds the page from the catalogue.
        """
        figures = self._figures
        if entry_id is not None and figures is not None and (not figures or entry_id > figures[0][0]):
            row = catalogue.get(entry_id)
            if row is not None and row["state"] == "complete":
                figures.appendleft((int(entry_id), page.figure(row).encode("utf-8")))  # maxlen drops the oldest
                self._total += 1
                self.page_writes["incremental"] += 1
                self._write_html()
                return
        self.write_page(catalogue)

    def write_page(self, catalogue: Catalogue) -> None:
        """Render the whole page from the catalogue (start, rebuild, removals) and keep its figures."""
        rows = catalogue.recent(self.page_limit)
        self._figures = collections.deque(((int(r["id"]), page.figure(r).encode("utf-8")) for r in rows),
                                          maxlen=self.page_limit)
        self._total = catalogue.count()
        self.page_writes["full"] += 1
        self._write_html()

    def _write_html(self) -> None:
        """Atomic (temp file + rename) but not fsynced: see the module docstring for why that is safe."""
        assert self._figures is not None
        head, tail = page.frame(len(self._figures), self._total, self.title)
        data = b"\n".join([head.encode("utf-8"), *(f for _, f in self._figures), tail.encode("utf-8")])
        atomic_write(self.root / "index.html", data, self.tmp, durable=False)

    # ---- crash recovery ----------------------------------------------------------
    def recover(self, catalogue: Catalogue) -> dict[str, int]:
        """Undo half-done entries and remove orphan files; then rewrite the page."""
        counts = {"temp_files": 0, "pending_entries": 0, "orphan_files": 0}
        for stray in self.tmp.iterdir():
            if stray.is_file():
                stray.unlink()
                counts["temp_files"] += 1
        for row in catalogue.pending():
            self.discard(row["id"], row["ext"])
            catalogue.delete(row["id"])
            counts["pending_entries"] += 1
        complete = catalogue.complete_ids()
        for folder in (self.images, self.thumbs):
            for path in folder.iterdir():
                m = _NAME.match(path.name)
                if m is None:
                    continue  # not a name we write: leave the owner's files alone
                if int(m.group(1)) not in complete:
                    path.unlink()
                    counts["orphan_files"] += 1
            fsync_dir(folder)
        if any(counts.values()):
            log.warning("recovered folder gallery %s: %s", self.root, counts)
        self.write_page(catalogue)
        return counts

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.root.resolve()), "page_limit": self.page_limit}

    def close(self) -> None:
        pass
