"""Defaults that anti_sus owns, in one place: the server, ``score``, ``tune`` and the pipeline read them here.

Kept free of heavy imports so that building the command line (``anti-sus ping``
in a health check) does not load numpy or ONNX Runtime.
"""
from __future__ import annotations

DEFAULT_WATERMARK_THRESHOLD = 0.5
"""Drop an image whose P(watermark) is >= this unless ``--watermark-threshold`` (or a request) says otherwise."""
