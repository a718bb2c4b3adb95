"""The watermark classifier stage: pixels -> P(watermark)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..preprocess import WATERMARK_SPEC, PreprocessSpec
from .onnx import DEFAULT_MEMORY_BUDGET, OnnxStage


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


class WatermarkStage(OnnxStage):
    """Runs ``watermark.onnx`` (input ``image`` float32[N,3,512,512] -> ``logit`` [N,1])."""

    OUTPUT = "logit"
    # tf_efficientnetv2_b0 at 512: a batch of 8 peaked ~29 MB of activations per image (9.5x its 3.1 MB input); with margin.
    ACTIVATION_FACTOR = 12.0

    def __init__(self, path: str | Path, spec: PreprocessSpec = WATERMARK_SPEC, threads: int = 0, max_batch: int = 32,
                 memory_budget: int | None = DEFAULT_MEMORY_BUDGET) -> None:
        super().__init__(path, spec, threads, max_batch, memory_budget)

    @classmethod
    def from_entry(cls, path: str | Path, entry: Mapping[str, Any], threads: int = 0, max_batch: int = 32,
                 memory_budget: int | None = DEFAULT_MEMORY_BUDGET) -> "WatermarkStage":
        """Build from a manifest entry (its ``preprocess`` spec)."""
        spec = PreprocessSpec.from_dict(entry["preprocess"]) if "preprocess" in entry else WATERMARK_SPEC
        return cls(path, spec, threads, max_batch, memory_budget)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32[N,3,S,S] -> float64[N] probabilities."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        return sigmoid(np.concatenate([part.reshape(-1) for part in self.run_chunks(x)]))
