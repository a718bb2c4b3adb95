"""CLIP's text tower with ONNX Runtime: strings -> L2-normalised features in the visual tower's space.

    enc = TextEncoder.from_dir(Path("var/models"))
    feats = enc.encode(["a mountain lake at sunset"])   # float32[1, D], unit norm

Reads the model directory's ``clip_text`` (``clip_text.onnx``, written by
``models.export_clip`` or ``models.tiny_onnx``) and ``clip_vocab`` (the BPE
vocabulary for :class:`~anti_sus.text.tokenizer.Tokenizer`) artifacts, checks
both files against the manifest's sha256, and never imports torch. Ids are cut
after the batch's last end-of-text token when the graph allows it (the
manifest's ``tokenizer.cut_after_eot``): attention is causal, so the features
are the same and a short query costs a few positions instead of 77.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..modeldir import ModelDirError, build_hint, read_manifest, sha256_file
from .tokenizer import Tokenizer, VocabError

TEXT, VOCAB, TEXT_INT8 = "clip_text", "clip_vocab", "clip_text_int8"


def int8_usable(arts: Mapping[str, Any]) -> bool:
    """Whether ``clip_text_int8`` passed its gate and was quantized from the ``clip_text`` now in the directory."""
    e = arts.get(TEXT_INT8)
    prov = (e or {}).get("provenance") or {} if isinstance(e, dict) else {}
    gate = prov.get("gate") if isinstance(prov.get("gate"), dict) else {}
    return bool(gate.get("passed") is True and prov.get("fp32_sha256") == (arts.get(TEXT) or {}).get("sha256"))


def text_entries(directory: str | os.PathLike[str]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The manifest entries of the text tower and its vocabulary; ModelDirError naming what to run if absent."""
    d = Path(directory)
    arts = read_manifest(d)["artifacts"]
    missing = [n for n in (TEXT, VOCAB) if not isinstance(arts.get(n), dict)]
    if missing:
        raise ModelDirError(f"model directory {d} has no CLIP text tower ({', '.join(missing)} missing from its "
                            f"manifest); build it with: {build_hint(TEXT, d)}")
    return arts[TEXT], arts[VOCAB]


def _checked_file(directory: Path, name: str, entry: Mapping[str, Any]) -> Path:
    file = entry.get("file")
    if not isinstance(file, str) or not file or os.path.isabs(file) or ".." in Path(file).parts:
        raise ModelDirError(f"{name}: unsafe file name {file!r} in the manifest")
    path = directory / file
    if not path.is_file():
        raise ModelDirError(f"{name}: file {path} is missing; build it with: {build_hint(name, directory)}")
    if sha256_file(path) != entry.get("sha256"):
        raise ModelDirError(f"{name}: file {path} does not match the manifest (tampered or rebuilt without "
                            f"updating it); rebuild it with: {build_hint(name, directory)}")
    return path


class TextEncoder:
    """A tokenizer and an ONNX Runtime session over one text tower; thread-safe (ORT runs concurrently)."""

    def __init__(self, model_path: str | os.PathLike[str], vocab_path: str | os.PathLike[str], *,
                 context_length: int = 77, cut_after_eot: bool = True, threads: int = 1) -> None:
        from ..stages.onnx import open_session

        try:
            self.tokenizer = Tokenizer(vocab_path, context_length)
        except VocabError as exc:
            raise ModelDirError(str(exc)) from None
        self.session = open_session(model_path, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        rows = self.session.get_outputs()[0].shape
        self.dim = int(rows[1]) if len(rows) == 2 and isinstance(rows[1], int) else None
        # A graph whose sequence axis is fixed takes the full context; a symbolic one may be cut.
        self.cut = cut_after_eot and len(inp.shape) == 2 and not isinstance(inp.shape[1], int)
        self._lock = threading.Lock()  # the tokenizer's cache is a plain dict
        self.variant = TEXT

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], threads: int = 1, variant: str = "auto") -> "TextEncoder":
        """The text tower of a model directory, its files checked against the manifest.

        ``variant``: ``auto`` runs ``clip_text_int8`` when it passed its gate
        against the ``clip_text`` in the directory (about 5x faster for a short
        query, cosine >= 0.99 to fp32), else fp32; ``fp32``/``int8`` insist.
        """
        d = Path(directory)
        text, vocab = text_entries(d)
        arts = read_manifest(d)["artifacts"]
        use_int8 = variant == "int8" or (variant == "auto" and int8_usable(arts))
        if variant == "int8" and not int8_usable(arts):
            raise ModelDirError(f"{TEXT_INT8}: none in {d} that passed its gate against the current {TEXT}; "
                                f"build it with: {build_hint(TEXT_INT8, d)}")
        name, entry = (TEXT_INT8, arts[TEXT_INT8]) if use_int8 else (TEXT, text)
        tok = text.get("tokenizer") or {}
        enc = cls(_checked_file(d, name, entry), _checked_file(d, VOCAB, vocab),
                  context_length=int(tok.get("context_length", 77)), cut_after_eot=bool(tok.get("cut_after_eot", False)),
                  threads=threads)
        enc.variant = name
        want = (text.get("output") or {}).get("dim")
        if enc.dim is not None and want is not None and int(want) != enc.dim:
            raise ModelDirError(f"{TEXT}: the graph gives {enc.dim} features, the manifest says {want}")
        return enc

    def tokens(self, texts: str | Iterable[str]) -> np.ndarray:
        """int64 ids as the graph takes them: the full context, or cut after the last end-of-text token."""
        with self._lock:
            ids = self.tokenizer(texts)
        if self.cut and len(ids):
            # Every row holds an EOT (truncation keeps it last), so argmax finds its position.
            ids = np.ascontiguousarray(ids[:, : int((ids == self.tokenizer.eot_id).argmax(axis=1).max()) + 1])
        return ids

    def encode(self, texts: str | Iterable[str]) -> np.ndarray:
        """float32[N, D] unit-norm features of ``texts`` (one row per string)."""
        ids = self.tokens(texts)
        if not len(ids):
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        feats = np.asarray(self.session.run(None, {self.input_name: ids})[0], dtype=np.float32)
        # The exported graphs normalise already; doing it again costs nothing and guards other graphs.
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
