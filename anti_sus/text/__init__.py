"""CLIP's text side without torch: the BPE tokenizer (:mod:`.tokenizer`) and the ONNX text tower (:mod:`.encoder`).

Used by gallery_bridge's text search and by prompt stages; both read the
``clip_text`` and ``clip_vocab`` artifacts of a model directory (docs/models.md).
"""
