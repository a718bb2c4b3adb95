"""Magic-byte sniffing: trust the bytes, never the Content-Type or the file extension.

nomad checks each download with it, gallery_bridge each image it is sent.
"""
from __future__ import annotations

IMAGE_FORMATS = ("jpeg", "png", "webp")
"""The photo formats the services accept."""

PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
"""Sniffed name -> Pillow's format name (for ``Image.open(..., formats=[...])``)."""


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes: "jpeg", "png", "webp", "gif", or None.

    "gif" is recognised so callers can tell an animated/unsupported image from
    an HTML page; it is not one of :data:`IMAGE_FORMATS`.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def pillow_format(data: bytes) -> str | None:
    """The Pillow format name of an accepted photo format (``"JPEG"``, ``"PNG"``, ``"WEBP"``), else None."""
    fmt = sniff_format(data)
    return PILLOW_FORMATS.get(fmt) if fmt is not None else None


def looks_like_html(data: bytes) -> bool:
    """Whether a body starts like an HTML/XML document (a page served as an image)."""
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<"))
