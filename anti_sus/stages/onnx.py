"""One way to open and run an ONNX model for serving: CPU, bounded threads, full graph optimisation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..preprocess import PreprocessSpec, model_input


def open_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """An ORT CPU session; ``threads`` caps intra-op threads (0 = ORT's default, all cores)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One model runs at a time in the server, so parallelism lives inside the operators.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # warnings about unused initialisers are noise for operators
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxStage:
    """A pipeline stage around one ONNX model: its session, its preprocessing spec, chunked runs.

    Subclasses name the output they prefer (``OUTPUT``; the first output when
    the model has none of that name) and turn the chunks into their result.
    """

    OUTPUT: str = ""

    def __init__(self, path: str | Path, spec: PreprocessSpec, threads: int = 0, max_batch: int = 32) -> None:
        self.path = Path(path)
        self.spec = spec
        self.max_batch = max(1, max_batch)
        self.session = open_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        self.output_name = next((o.name for o in outputs if o.name == self.OUTPUT), outputs[0].name)

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """uint8[N,H,W,3] -> the model's float input (the shared contract)."""
        return model_input(batch, self.spec)

    def run_chunks(self, x: np.ndarray) -> list[np.ndarray]:
        """The model's output for ``x``, run ``max_batch`` images at a time (bounds the activations' memory)."""
        return [self.session.run([self.output_name], {self.input_name: x[i : i + self.max_batch]})[0]
                for i in range(0, len(x), self.max_batch)]
