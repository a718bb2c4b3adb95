"""The watermark classifier stage: pixels -> P(watermark)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..preprocess import WATERMARK_SPEC, PreprocessSpec, model_input
from .onnx import open_session


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


class WatermarkStage:
    """Runs ``watermark.onnx`` (input ``image`` float32[N,3,512,512] -> ``logit`` [N,1])."""

    def __init__(self, path: str | Path, spec: PreprocessSpec = WATERMARK_SPEC, threads: int = 0, max_batch: int = 32) -> None:
        self.path = Path(path)
        self.spec = spec
        self.max_batch = max(1, max_batch)
        self.session = open_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        self.output_name = next((o.name for o in outputs if o.name == "logit"), outputs[0].name)

    @classmethod
    def from_entry(cls, path: str | Path, entry: Mapping[str, Any], threads: int = 0, max_batch: int = 32) -> "WatermarkStage":
        spec = PreprocessSpec.from_dict(entry["preprocess"]) if "preprocess" in entry else WATERMARK_SPEC
        return cls(path, spec, threads, max_batch)

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        return model_input(batch, self.spec)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32[N,3,S,S] -> float64[N] probabilities."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        parts = [
            self.session.run([self.output_name], {self.input_name: x[i : i + self.max_batch]})[0].reshape(-1)
            for i in range(0, len(x), self.max_batch)
        ]
        return sigmoid(np.concatenate(parts))
