"""Gallery targets: the embedded folder and a scenery instance.

A target stores the files of an entry whose catalogue row is pending and says
whether the gallery accepted it. The ingester owns the catalogue transaction
around it, so every target gets the same exactly-once guarantees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..catalogue import Catalogue
    from ..validate import CheckedImage, Meta


class TargetError(Exception):
    """The gallery could not take the image now; the sender should retry later."""


@dataclass(frozen=True)
class Stored:
    """What the gallery said: ``added``, ``duplicate`` (it had it) or ``rejected``."""

    status: str
    gallery_id: int | None = None
    message: str | None = None


class Target(Protocol):
    name: str

    def recover(self, catalogue: "Catalogue") -> dict[str, int]:
        """Undo what a crash left half done; returns counts of what was cleaned."""

    def store(self, entry_id: int, image: "CheckedImage", meta: "Meta") -> Stored:
        """Put the image into the gallery durably; raise TargetError to retry later."""

    def discard(self, entry_id: int, ext: str) -> None:
        """Remove whatever ``store`` may have written for a pending entry."""

    def published(self, catalogue: "Catalogue", entry_id: int | None = None) -> None:
        """Called after the gallery changed (e.g. regenerate the page); ``entry_id``: that entry became complete."""

    def describe(self) -> dict[str, Any]:
        """For the ``info`` op."""

    def close(self) -> None:
        ...


def parse_target(spec: str) -> tuple[str, str]:
    """``folder:PATH`` or ``scenery:URL`` -> (kind, rest)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("folder", "scenery") or not rest:
        raise ValueError(f"target must be folder:PATH or scenery:URL, got {spec!r}")
    return kind, rest
