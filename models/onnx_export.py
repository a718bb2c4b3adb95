"""torch -> ONNX export with a parity gate; shared by export_clip, export_watermark and tiny.

We use the TorchScript exporter (``dynamo=False``): with ``dynamic_axes`` it gives
a plain graph with a symbolic batch axis that ONNX Runtime optimises well, and it
is what the parity gate has been measured against. The graph is traced at batch
2 (a batch of 1 lets the tracer specialise shapes) and checked at a *different*
batch size, so a batch axis baked in by the tracer fails the gate.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
MIN_COSINE = 0.9999
MAX_ABS = 1e-3
TRACE_BATCH = 2
CHECK_BATCH = 3


class ParityError(Exception):
    """The exported graph does not reproduce torch on the same input; message has the figures."""

    def __init__(self, message: str, parity: "Parity") -> None:
        super().__init__(message)
        self.parity = parity


@dataclass(frozen=True)
class Parity:
    """How close the ONNX graph is to torch on the same tensors."""

    cosine: float  # lowest per-row cosine (for one-column outputs: cosine of the whole column)
    max_abs: float
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return {"cosine": round(self.cosine, 8), "max_abs": float(f"{self.max_abs:.3g}"), "batch": self.batch}

    def ok(self, min_cosine: float = MIN_COSINE, max_abs: float = MAX_ABS) -> bool:
        return self.cosine >= min_cosine and self.max_abs <= max_abs


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(min cosine, max abs difference) between two outputs of the same shape.

    Rows are compared one by one; a one-column output (a logit) has no direction
    per row, so its whole column is compared as one vector.
    """
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    if a.shape[1] == 1:
        a, b = a.T, b.T
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two zero vectors are identical; one zero vector against another is not.
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0))
    return float(cos.min()), float(np.abs(a - b).max())


def ort_session(path: str | Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with a fixed thread count (reproducible timings, shared hosts)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: x})[0])


def example_input(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """A normalised-looking input: standard normal pixels, fixed seed."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, size, size), dtype=np.float32)


def check_parity(module: Any, onnx_path: str | Path, size: int, batch: int = CHECK_BATCH, threads: int = 1) -> Parity:
    """Run torch and ONNX Runtime on the same tensors and compare."""
    import torch

    x = example_input(batch, size, seed=1)
    with torch.inference_mode():
        ref = module(torch.from_numpy(x)).float().numpy()
    got = run_onnx(onnx_path, x, threads)
    cos, mad = compare(ref, got)
    return Parity(cos, mad, batch)


def export_onnx(
    module: Any,
    out_path: str | Path,
    *,
    size: int,
    input_name: str = "image",
    output_name: str,
    opset: int = OPSET,
    min_cosine: float = MIN_COSINE,
    max_abs: float = MAX_ABS,
    threads: int = 1,
) -> Parity:
    """Export ``module`` (eval mode, float32 NCHW input) with a dynamic batch axis, then gate on parity.

    Raises :class:`ParityError` with the figures if the gate fails; the file is
    removed then so a bad graph never sits in a model directory.
    """
    import torch

    if opset < 14:
        raise ValueError(f"opset {opset} < 14 is not supported")
    module = module.eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.from_numpy(example_input(TRACE_BATCH, size, seed=0))
    tmp = out_path.with_name(out_path.name + ".tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings are noise here:
        # the parity gate below is what decides whether the graph is right.
        warnings.simplefilter("ignore")
        # nn.MultiheadAttention's eval fast path is a fused op the exporter cannot
        # translate; the composite path it replaces computes the same thing.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    (dummy,),
                    str(tmp),
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    import onnx

    onnx.checker.check_model(str(tmp))
    parity = check_parity(module, tmp, size, threads=threads)
    if not parity.ok(min_cosine, max_abs):
        tmp.unlink(missing_ok=True)
        raise ParityError(
            f"parity gate failed for {out_path.name}: cosine {parity.cosine:.6f} (need >= {min_cosine}), "
            f"max-abs {parity.max_abs:.3g} (need <= {max_abs}) at batch {parity.batch}",
            parity,
        )
    tmp.replace(out_path)
    log.info("exported %s: cosine %.6f, max-abs %.3g at batch %d", out_path, parity.cosine, parity.max_abs, parity.batch)
    return parity


def versions() -> dict[str, str]:
    """Library versions for provenance."""
    out: dict[str, str] = {}
    for mod in ("torch", "onnx", "onnxruntime", "open_clip", "timm"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:  # an optional library missing is not an error for provenance
            continue
    return out


def utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
