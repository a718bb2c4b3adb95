"""photocore.sniff: formats from magic bytes, for nomad's downloads and gallery_bridge's ingest."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from photocore.sniff import IMAGE_FORMATS, looks_like_html, pillow_format, sniff_format


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("pil,name", [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")])
def test_real_files_are_recognised(pil: str, name: str) -> None:
    data = _encoded(pil)
    assert sniff_format(data) == name
    assert pillow_format(data) == (pil if name in IMAGE_FORMATS else None)


@pytest.mark.parametrize("data", [b"", b"RIFF", b"RIFF\0\0\0\0WAVE", b"<html>", b"\xff\xd8", b"BM\0\0"])
def test_other_bytes_are_not_images(data: bytes) -> None:
    assert sniff_format(data) is None and pillow_format(data) is None


def test_html_is_told_apart() -> None:
    assert looks_like_html(b"  \n<!DOCTYPE html><html>")
    assert looks_like_html(b"<?xml version='1.0'?>")
    assert not looks_like_html(_encoded("PNG"))
