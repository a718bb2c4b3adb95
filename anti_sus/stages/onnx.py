"""One way to open and run an ONNX model for serving: CPU (or CUDA, :func:`use_provider`), bounded threads,
full graph optimisation, and runs split into sub-batches that fit a memory budget.

Memory: a model's activations grow with the images in one ``session.run``. A
stage runs at most :attr:`OnnxStage.sub_batch` images at a time, sized from the
``memory_budget`` (bytes of activations per call) and the stage's per-image
estimate (input bytes x ``ACTIVATION_FACTOR``, calibrated per architecture with
``bench/anti_sus_memory.py``), never from the request size. The sub-batches
give the same scores as one big call (each image is computed independently).
After each call ONNX Runtime shrinks its CPU arena (:data:`SHRINK_ARENA`), so
the buffers of a call go back to the system instead of being kept for the
process's life.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..defaults import DEFAULT_MEMORY_BUDGET
from ..preprocess import PreprocessSpec, model_input


def shrink_arena() -> ort.RunOptions:
    """Run options that hand the CPU arena's unused chunks back to the system at the end of each run."""
    opts = ort.RunOptions()
    opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return opts


SHRINK_ARENA: ort.RunOptions | None = shrink_arena()
"""Passed to every run (read-only, so one object serves all sessions); the benchmark sets it to None to
measure the old behaviour, an arena that keeps its peak."""


log = logging.getLogger(__name__)

PROVIDERS: dict[str, list[str]] = {"cpu": ["CPUExecutionProvider"],
                                   "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
"""``--provider`` name -> ONNX Runtime execution providers, in order of preference."""
_provider = "cpu"
_fallback_warned = False


def use_provider(name: str) -> None:
    """Run the sessions opened from now on with ``name`` ("cpu" or "cuda"): one device per process."""
    global _provider
    if name not in PROVIDERS:
        raise ValueError(f"unknown execution provider {name!r} (choose from {', '.join(PROVIDERS)})")
    _provider = name


def _warn_fallback(why: str) -> None:
    """One warning per process, however many models fall back."""
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        log.warning("--provider cuda: %s; running on the CPU instead", why)


def session_providers(name: str | None = None) -> list[str]:
    """The providers to ask for: CUDA's only when this onnxruntime build has it (else CPU, with the warning)."""
    wanted = PROVIDERS[name or _provider]
    available = set(ort.get_available_providers())
    usable = [p for p in wanted if p in available]
    if usable != wanted:
        _warn_fallback("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return usable or ["CPUExecutionProvider"]


ALLOW_SPINNING = False
"""Whether ORT's intra-op threads spin while waiting for work (ORT's default is to spin). Off: measured side by
side in one process on the benchmark models (int8 CLIP + fp32 EfficientNetV2-B0, batches of 32, 2-core shared
Xeon), spinning cost 287 vs 205 CPU-ms per image for the same work (wall 3.41 vs 3.75 img/s), and the CPU it
burns is taken from the server's own I/O thread and from nomad and gallery_bridge on the same machine."""


def open_session(path: str | Path, threads: int = 0, provider: str | None = None,
                 spin: bool | None = None) -> ort.InferenceSession:
    """An ORT session on ``provider`` (None: :func:`use_provider`'s choice, CPU by default); ``threads`` caps
    intra-op threads (0 = ORT's default, all cores); ``spin`` None: :data:`ALLOW_SPINNING`."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One model runs at a time in the server, so parallelism lives inside the operators.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    # The CPU arena stays on, but every run shrinks it back (SHRINK_ARENA): measured with
    # bench/anti_sus_memory.py, the arena alone kept the largest batch's activations for good
    # (2.97 GB RSS after 32 images at 512²) and no arena left glibc holding them instead.
    if threads > 0:
        opts.intra_op_num_threads = threads
    spinning = ALLOW_SPINNING if spin is None else spin
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3  # warnings about unused initialisers are noise for operators
    providers = session_providers(provider)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != "CUDAExecutionProvider":
        # The provider is built in but could not start (no GPU, no driver, CUDA/cuDNN libraries missing).
        _warn_fallback("the CUDA provider did not start (no GPU or CUDA libraries?)")
    return session


def sub_batch_size(memory_budget: int | None, per_image: int, max_batch: int) -> int:
    """Images per model call: as many as fit ``memory_budget`` (None: no budget), 1..``max_batch``."""
    if memory_budget is None:
        return max(1, max_batch)
    return max(1, min(max_batch, memory_budget // max(1, per_image)))


class OnnxStage:
    """A pipeline stage around one ONNX model: its session, its preprocessing spec, budgeted runs.

    Subclasses name the output they prefer (``OUTPUT``; the first output when
    the model has none of that name), their ``ACTIVATION_FACTOR`` and turn the
    chunks into their result.
    """

    OUTPUT: str = ""
    ACTIVATION_FACTOR: float = 32.0
    """Peak activation bytes per image / float32 input bytes per image (a conservative default)."""

    def __init__(self, path: str | Path, spec: PreprocessSpec, threads: int = 0, max_batch: int = 32,
                 memory_budget: int | None = DEFAULT_MEMORY_BUDGET) -> None:
        self.path = Path(path)
        self.spec = spec
        self.max_batch = max(1, max_batch)
        self.memory_budget = memory_budget
        self.session = open_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        self.output_name = next((o.name for o in outputs if o.name == self.OUTPUT), outputs[0].name)
        self.activation_bytes = int(3 * spec.size * spec.size * 4 * self.ACTIVATION_FACTOR)
        """Estimated activation bytes of one image in one call (from the input size and the factor)."""
        self.sub_batch = sub_batch_size(memory_budget, self.activation_bytes, self.max_batch)

    def memory_info(self) -> dict[str, int | None]:
        """What the server reports about this stage's memory sizing."""
        return {"sub_batch": self.sub_batch, "activation_bytes_per_image": self.activation_bytes,
                "memory_budget": self.memory_budget}

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """uint8[N,H,W,3] -> the model's float input (the shared contract)."""
        return model_input(batch, self.spec)

    def run_chunks(self, x: np.ndarray) -> list[np.ndarray]:
        """The model's output for ``x``, ``sub_batch`` images per call (bounds the activations' memory)."""
        step = self.sub_batch
        return [self.session.run([self.output_name], {self.input_name: x[i : i + step]}, SHRINK_ARENA)[0]
                for i in range(0, len(x), step)]
