"""One way to open an ONNX model for serving: CPU, bounded threads, full graph optimisation."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


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
