"""Defaults that anti_sus owns, in one place: the server, ``score``, ``tune`` and the pipeline read them here.

Kept free of heavy imports so that building the command line (``anti-sus ping``
in a health check) does not load numpy or ONNX Runtime.
"""
from __future__ import annotations

DEFAULT_WATERMARK_THRESHOLD = 0.5
"""Drop an image whose P(watermark) is >= this unless ``--watermark-threshold`` (or a request) says otherwise."""

DEFAULT_MEMORY_BUDGET = 192 << 20
"""Bytes of activations one model call may use (``--memory-budget``); each stage sizes its sub-batches by it.

192 MiB keeps a server with ViT-B/16 + tf_efficientnetv2_b0 (fp32) under 1 GB at batches of 32
(bench/anti_sus_memory.py)."""
