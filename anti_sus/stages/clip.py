"""The CLIP visual tower stage: pixels -> L2-normalised features."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..preprocess import CLIP_SPEC, PreprocessSpec, model_input
from .onnx import open_session


class ClipStage:
    """Runs ``clip_visual.onnx`` (input ``image`` float32[N,3,S,S] -> ``features`` float32[N,D])."""

    def __init__(self, path: str | Path, spec: PreprocessSpec = CLIP_SPEC, threads: int = 0, max_batch: int = 32) -> None:
        self.path = Path(path)
        self.spec = spec
        self.max_batch = max(1, max_batch)
        self.session = open_session(path, threads)
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        self.input_name = inputs[0].name
        self.output_name = next((o.name for o in outputs if o.name == "features"), outputs[0].name)
        dim = outputs[0].shape[-1] if outputs else None
        self.dim: int | None = dim if isinstance(dim, int) else None

    @classmethod
    def from_entry(cls, path: str | Path, entry: Mapping[str, Any], threads: int = 0, max_batch: int = 32) -> "ClipStage":
        """Build from a manifest entry (its ``preprocess`` spec and ``output.dim``)."""
        spec = PreprocessSpec.from_dict(entry["preprocess"]) if "preprocess" in entry else CLIP_SPEC
        stage = cls(path, spec, threads, max_batch)
        dim = (entry.get("output") or {}).get("dim")
        if isinstance(dim, int):
            stage.dim = dim
        return stage

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """uint8[N,H,W,3] -> the model's float input (the shared contract)."""
        return model_input(batch, self.spec)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32[N,3,S,S] -> float32[N,D], in chunks of ``max_batch``."""
        if len(x) == 0:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        parts = [
            self.session.run([self.output_name], {self.input_name: x[i : i + self.max_batch]})[0]
            for i in range(0, len(x), self.max_batch)
        ]
        feats = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return np.ascontiguousarray(feats, dtype=np.float32)
