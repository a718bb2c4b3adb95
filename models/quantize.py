"""The int8 gate: quantize an fp32 ONNX model several ways and keep the fastest variant that keeps parity.

    python -m models.quantize --models var/models --images ~/good-photos              # clip -> clip_int8
    python -m models.quantize --models var/models --images WM_SET --target watermark  # watermark -> watermark_int8

Candidates (``QUANTIZERS``): ``dynamic`` (``quantize_dynamic``, int8 weights,
activations quantized at run time) and ``static_qdq`` (``quantize_static``, QDQ
format, per-channel int8 weights, uint8 activations calibrated with a
``CalibrationDataReader`` over the calibration images). Each candidate is run
side by side with fp32 on the same HELD-OUT images (never used for calibration)
and passes when

- the cosine of its outputs to fp32's is >= ``MIN_COSINE`` (0.995) for every
  held-out image (a one-column output, the watermark logit, is compared as one
  column), and
- every decision function (:class:`Decision`: the GMM at its threshold today, a
  probe later) agrees with fp32's decision on >= ``MIN_AGREEMENT`` (99%) of
  the held-out images,
- a one-column output (the watermark logit) keeps its probability
  (sigmoid) within ``MAX_PROB_DIFF`` (0.05) of fp32's on every held-out image
  (the scores stay close, not only the decisions), and
- it runs at least ``MIN_SPEEDUP`` (1.0) times as fast as fp32 on a batch: an
  int8 graph that is slower than fp32 on this machine (measured for
  EfficientNetV2-B0 at 512² on a 2-core Xeon: depthwise convolutions and SiLU
  between the Q/DQ pairs) must not be served by default. The tiny test models
  pass ``min_speedup=0``: they exist to test the logic, and int8 is slower on
  models that small.

The fastest passing candidate is kept; the :class:`GateReport` (method chosen,
cosine min/median, agreement, speedup, every rejected candidate and why) goes
into the manifest entry of the int8 artifact. When none passes, no int8 file is
written and the server keeps fp32.

Over 400 lines on purpose: the report types, the calibration reader, the
candidates and the gate are one job (decide which int8 file is kept) and are
only ever used together; a third of the length is the report's text.
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from anti_sus.modeldir import ARTIFACTS, MANIFEST, ModelDirError, artifact_entry, read_manifest, write_manifest
from anti_sus.preprocess import PreprocessSpec, load_image, model_input, to_wire
from photocore.paths import DEFAULT_MODELS_DIR, models_dir

from ._cli import EnvParser, UserError, run_main, setup
from .onnx_export import ort_session, utc_now, versions

log = logging.getLogger(__name__)

MIN_COSINE = 0.995
MIN_AGREEMENT = 0.99
MAX_PROB_DIFF = 0.05
"""Largest |P_int8 - P_fp32| allowed on a one-column (logit) output: the watermark's scores stay close."""
MIN_SPEEDUP = 1.0
"""A candidate must be at least this many times as fast as fp32 in the gate's own timing."""
HOLD_OUT_EVERY = 3
"""Every third image (sorted by path) is held out for parity; the others are the calibration pool."""
MAX_CALIBRATION = 32
SPEED_BATCH = 8
SPEED_ROUNDS = 3
TARGETS = {"clip": "clip_int8", "watermark": "watermark_int8"}

CalibrationFactory = Callable[[], Any]
"""Makes a fresh ``onnxruntime.quantization.CalibrationDataReader`` (static quantization reads it once)."""
Quantizer = Callable[[Path, Path, CalibrationFactory], None]
"""``(fp32_path, int8_path, calibration)``: writes one int8 candidate."""
Timer = Callable[[Path, np.ndarray], float]
"""Median seconds of one model run on a batch; injectable so the selection rule can be tested exactly."""


@dataclass(frozen=True)
class Decision:
    """A decision the served model feeds (keep/drop), compared between fp32 and int8 outputs.

    ``decide`` maps a model's outputs ``[N, D]`` to ``bool[N]``; ``detail`` says
    what was checked (threshold, the sha256 of the GMM/probe) for the report.
    """

    name: str
    decide: Callable[[np.ndarray], np.ndarray]
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class CandidateResult:
    """One quantization method's parity and speed on the held-out images."""

    method: str
    passed: bool = False
    reason: str = ""
    cosine_min: float = float("nan")
    cosine_median: float = float("nan")
    agreement: dict[str, float] = field(default_factory=dict)
    seconds: float = float("nan")
    speedup: float = float("nan")
    prob_diff_max: float = float("nan")
    """Largest probability difference to fp32 (one-column logit outputs only; NaN otherwise)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cosine_min", "cosine_median", "speedup", "prob_diff_max"):
            d[k] = None if np.isnan(d[k]) else round(float(d[k]), 6)
        d["ms_per_batch"] = None if np.isnan(self.seconds) else round(self.seconds * 1000, 2)
        del d["seconds"]
        d["agreement"] = {k: round(v, 6) for k, v in self.agreement.items()}
        return d


@dataclass
class GateReport:
    """What the gate measured; ``chosen`` is None when no candidate passed."""

    chosen: str | None
    candidates: list[CandidateResult]
    fp32_seconds: float
    n_calibration: int
    n_held_out: int
    images: str
    decisions: list[dict[str, Any]]
    min_cosine: float = MIN_COSINE
    min_agreement: float = MIN_AGREEMENT
    speed_batch: int = SPEED_BATCH
    min_speedup: float = MIN_SPEEDUP
    max_prob_diff: float = MAX_PROB_DIFF

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    @property
    def best(self) -> CandidateResult | None:
        return next((c for c in self.candidates if c.method == self.chosen), None)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "passed": self.passed,
            "method": self.chosen,
            "cosine_min": best.to_dict()["cosine_min"] if best else None,
            "cosine_median": best.to_dict()["cosine_median"] if best else None,
            "agreement": best.to_dict()["agreement"] if best else {},
            "speedup": best.to_dict()["speedup"] if best else None,
            "prob_diff_max": best.to_dict()["prob_diff_max"] if best else None,
            "fp32_ms_per_batch": round(self.fp32_seconds * 1000, 2),
            "speed_batch": self.speed_batch,
            "rejected": [{"method": c.method, "reason": c.reason} for c in self.candidates if not c.passed],
            "candidates": [c.to_dict() for c in self.candidates],
            "n_calibration": self.n_calibration,
            "n_held_out": self.n_held_out,
            "images": self.images,
            "decisions": self.decisions,
            "decisions_checked": [d["name"] for d in self.decisions],
            "min_cosine": self.min_cosine,
            "min_agreement": self.min_agreement,
            "min_speedup": self.min_speedup,
            "max_prob_diff": self.max_prob_diff,
        }

    def summary(self) -> str:
        """One line per candidate, for the command's output."""
        lines = [f"fp32: {self.fp32_seconds * 1000:.1f} ms per batch of {self.speed_batch}; images: {self.images}"]
        for c in self.candidates:
            agree = ", ".join(f"{k} {v:.2%}" for k, v in c.agreement.items()) or "no decisions checked"
            lines.append(f"{c.method:11s} {'PASS' if c.passed else 'FAIL'} cosine min {c.cosine_min:.5f} median "
                         f"{c.cosine_median:.5f}; agreement {agree}; "
                         + ("" if np.isnan(c.prob_diff_max) else f"probability diff max {c.prob_diff_max:.4f}; ")
                         + f"{c.speedup:.2f}x fp32" + (f"; {c.reason}" if c.reason else ""))
        lines.append(f"kept: {self.chosen}" if self.chosen else "kept: none (no candidate passed; fp32 stays)")
        return "\n".join(lines)


# -- quantizers ------------------------------------------------------------------------

class ArrayReader:
    """``CalibrationDataReader`` over float32 model inputs, a few images per ``get_next``."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch: int = 4) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = (
            {input_name: np.ascontiguousarray(inputs[i:i + batch])} for i in range(0, len(inputs), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_dynamic_int8(fp32: Path, out: Path, _calibration: CalibrationFactory) -> None:
    """Int8 weights, activations quantized at run time (needs no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)


def quantize_static_qdq(fp32: Path, out: Path, calibration: CalibrationFactory) -> None:
    """QDQ, per-channel int8 weights, uint8 activations with MinMax ranges from the calibration images.

    Only MatMul/Conv/Gemm are quantized: they carry the work; quantizing LayerNorm/
    Softmax/Add as well costs accuracy and adds Q/DQ pairs without making them faster.
    The graph goes through ONNX Runtime's quantization pre-processing first (shape
    inference, constant folding): timm's exported convolutions take their bias
    through Identity nodes, which the quantizer otherwise leaves in float, and the
    watermark model's static variant ran 2x slower without it (110 vs 55 ms/image).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(source))
    except Exception as exc:  # a graph the pre-processing cannot handle is quantized as exported
        log.info("int8 static_qdq: pre-processing skipped (%s: %s)", type(exc).__name__, str(exc)[:200])
        source = fp32
    quantize_static(str(source), str(out), calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Conv", "Gemm"], calibrate_method=CalibrationMethod.MinMax)
    if source != fp32:
        source.unlink(missing_ok=True)


QUANTIZERS: dict[str, Quantizer] = {"dynamic": quantize_dynamic_int8, "static_qdq": quantize_static_qdq}


# -- measuring -------------------------------------------------------------------------

def run_model(path: Path, x: np.ndarray, threads: int = 1, batch: int = 16) -> np.ndarray:
    """Outputs of ``path`` on ``x`` as float64 ``[N, D]``, in chunks (bounded memory)."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    parts = [np.asarray(sess.run(None, {name: x[i:i + batch]})[0], np.float64) for i in range(0, len(x), batch)]
    out = np.concatenate(parts)
    return out.reshape(len(out), -1)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine; a one-column output (a logit has no direction per row) is compared as one column."""
    a, b = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    if a.shape[1] == 1:
        a, b = a.T, b.T
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-300), 0.0)


def prob_diff(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest |sigmoid(candidate) - sigmoid(reference)| of a one-column logit output (NaN for other outputs)."""
    if reference.shape[1] != 1:
        return float("nan")
    from anti_sus.stages.watermark import sigmoid

    return float(np.abs(sigmoid(candidate[:, 0]) - sigmoid(reference[:, 0])).max()) if len(reference) else 0.0


def agreement(decision: Decision, reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of images on which ``decision`` says the same for both outputs."""
    a = np.asarray(decision.decide(reference), bool)
    b = np.asarray(decision.decide(candidate), bool)
    return float((a == b).mean()) if len(a) else 1.0


def session_timer(threads: int = 1, rounds: int = SPEED_ROUNDS) -> Timer:
    """A timer running each model on the same batch: one warm-up, then the median of ``rounds``."""
    def measure(path: Path, x: np.ndarray) -> float:
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        sess.run(None, {name: x})  # warm-up: the first run allocates the arena
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return measure


def _interleaved(paths: Sequence[Path], x: np.ndarray, timer: Timer, rounds: int) -> list[float]:
    """Median time per model, measured in alternating rounds so load from other jobs hits every model alike."""
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, p in enumerate(paths):
            times[i].append(timer(p, x))
    return [statistics.median(t) for t in times]


# -- the gate --------------------------------------------------------------------------

def gate(fp32: Path, out: Path, calibration: np.ndarray, held_out: np.ndarray, decisions: Sequence[Decision] = (), *,
         quantizers: Mapping[str, Quantizer] | None = None, timer: Timer | None = None, threads: int = 1,
         min_cosine: float = MIN_COSINE, min_agreement: float = MIN_AGREEMENT, speed_batch: int = SPEED_BATCH,
         rounds: int = 1, images: str = "", min_speedup: float | None = None,
         max_prob_diff: float = MAX_PROB_DIFF) -> GateReport:
    """Quantize ``fp32`` with every quantizer, check each on ``held_out``, keep the fastest passing one at ``out``.

    ``calibration`` and ``held_out`` are model inputs (float32 ``[N, …]``); they must
    not overlap (a variant calibrated on the images it is judged on would look better
    than it is). ``out`` is removed when no candidate passes. ``min_speedup`` None reads
    :data:`MIN_SPEEDUP` at call time.
    """
    min_speedup = MIN_SPEEDUP if min_speedup is None else min_speedup
    if len(held_out) == 0:
        raise UserError("the int8 gate needs held-out images to compare against fp32")
    quantizers = dict(QUANTIZERS if quantizers is None else quantizers)
    timer = timer or session_timer(threads)
    input_name = ort_session(fp32, threads).get_inputs()[0].name
    reference = run_model(fp32, held_out, threads)
    results: list[CandidateResult] = []
    with tempfile.TemporaryDirectory(prefix="int8-gate-", dir=out.parent) as tmp:
        paths: dict[str, Path] = {}
        for method, quantize in quantizers.items():
            res = CandidateResult(method)
            results.append(res)
            path = Path(tmp) / f"{method}.onnx"
            try:
                quantize(fp32, path, lambda: ArrayReader(input_name, calibration))
                got = run_model(path, held_out, threads)
            except Exception as exc:  # a quantizer that cannot handle this graph is a rejected candidate, not a crash
                res.reason = f"quantization failed: {type(exc).__name__}: {str(exc)[:200]}"
                log.warning("int8 %s: %s", method, res.reason)
                continue
            cos = cosines(reference, got)
            res.cosine_min, res.cosine_median = float(cos.min()), float(np.median(cos))
            res.agreement = {d.name: agreement(d, reference, got) for d in decisions}
            res.prob_diff_max = prob_diff(reference, got)
            why = []
            if not res.cosine_min >= min_cosine:  # NaN fails too
                why.append(f"cosine {res.cosine_min:.5f} < {min_cosine}")
            if reference.shape[1] == 1 and not res.prob_diff_max <= max_prob_diff:
                why.append(f"probability differs by {res.prob_diff_max:.4f} > {max_prob_diff}")
            why += [f"{k} agreement {v:.2%} < {min_agreement:.0%}" for k, v in res.agreement.items() if v < min_agreement]
            res.passed, res.reason = not why, "; ".join(why)
            paths[method] = path
        batch = held_out[:speed_batch]
        timed = _interleaved([fp32, *paths.values()], batch, timer, rounds)
        fp32_s = timed[0]
        for (method, _), secs in zip(paths.items(), timed[1:]):
            res = next(r for r in results if r.method == method)
            res.seconds, res.speedup = secs, fp32_s / secs if secs > 0 else float("inf")
            if res.passed and not res.speedup >= min_speedup:
                res.passed, res.reason = False, f"not faster than fp32: {res.speedup:.2f}x < {min_speedup}x"
        passing = [r for r in results if r.passed]
        chosen = min(passing, key=lambda r: r.seconds).method if passing else None
        if chosen:
            shutil.move(str(paths[chosen]), out)
        elif out.exists():
            out.unlink()  # a stale variant from an earlier gate must not outlive a failed one
    report = GateReport(chosen, results, fp32_s, len(calibration), len(held_out), images,
                        [{"name": d.name, **dict(d.detail)} for d in decisions], min_cosine, min_agreement, len(batch),
                        min_speedup, max_prob_diff)
    log.info("int8 gate for %s:\n%s", fp32.name, report.summary())
    return report


def split(items: Sequence[Any], every: int = HOLD_OUT_EVERY, max_calibration: int = MAX_CALIBRATION) -> tuple[list[Any], list[Any]]:
    """(calibration, held-out): every ``every``-th item is held out; calibration is capped at ``max_calibration``."""
    held = [x for i, x in enumerate(items) if i % every == every - 1]
    calib = [x for i, x in enumerate(items) if i % every != every - 1][:max_calibration]
    return calib, held


# -- decisions from a model directory --------------------------------------------------

def gmm_decision(models: Path, threshold: float | None = None) -> Decision | None:
    """The GMM keep/drop decision at ``threshold`` (None: gmm.json's suggested one), if a GMM fitted on this clip exists."""
    from anti_sus.stages.gmm import GmmScorer

    try:
        arts = read_manifest(models)["artifacts"]
        meta = json.loads((models / arts["gmm_meta"]["file"]).read_text("utf-8"))
        if meta.get("feature_model_sha256") != arts["clip"]["sha256"]:
            return None
        scorer = GmmScorer.load(models / arts["gmm"]["file"])
        t = float(meta["suggested_threshold"] if threshold is None else threshold)
    except (ModelDirError, KeyError, OSError, ValueError, TypeError):
        return None
    return Decision("gmm", lambda f: scorer.score(f) >= t,
                    {"threshold": t, "gmm_sha256": arts["gmm"]["sha256"]})


def watermark_decision(threshold: float) -> Decision:
    """The watermark stage's decision: P(watermark) = sigmoid(logit) >= ``threshold``."""
    logit = float(np.log(threshold / (1 - threshold)))
    return Decision("watermark", lambda out: out[:, 0] >= logit, {"threshold": threshold})


def load_inputs(paths: Sequence[Path], spec: PreprocessSpec) -> np.ndarray:
    """Image files -> the model's float input through the serving contract; unreadable files are skipped."""
    rows = []
    for p in paths:
        try:
            rows.append(to_wire(load_image(str(p))))
        except Exception as exc:  # any decoder error: skip it, as fit_gmm does
            log.warning("int8 gate: skipping unreadable image %s: %s", p, exc)
    if not rows:
        return np.zeros((0, 3, spec.size, spec.size), np.float32)
    return np.concatenate([model_input(np.stack(rows[i:i + 16]), spec) for i in range(0, len(rows), 16)])


def build_int8(models: Path, target: str, calibration: np.ndarray, held_out: np.ndarray, decisions: Sequence[Decision], *,
               images: str, threads: int = 1, write: bool = True, **gate_kw: Any) -> tuple[GateReport, dict[str, Any] | None]:
    """Gate ``target``'s fp32 artifact and (with ``write``) record ``<target>_int8`` in the manifest, or drop it.

    Returns the report and the manifest entry (None when nothing passed).
    """
    name = TARGETS[target]
    try:
        arts = read_manifest(models)["artifacts"]
    except ModelDirError as exc:
        raise UserError(str(exc)) from None
    if target not in arts:
        raise UserError(f"{models / MANIFEST} has no {target!r} artifact to quantize")
    fp32_entry = arts[target]
    out = models / ARTIFACTS[name][0]
    report = gate(models / fp32_entry["file"], out, calibration, held_out, decisions, threads=threads, images=images, **gate_kw)
    if not report.passed:
        if write and name in arts:
            write_manifest(models, {k: v for k, v in arts.items() if k != name}, merge=False)
        return report, None
    fields = {k: v for k, v in fp32_entry.items() if k not in ("file", "sha256", "bytes", "provenance")}
    prov = {"tool": "models.quantize", "quantized_from": fp32_entry["file"], "fp32_sha256": fp32_entry["sha256"],
            "versions": versions(), "created": utc_now(), "gate": report.to_dict(),
            "fp32_provenance": fp32_entry.get("provenance", {})}
    entry = artifact_entry(models, out.name, **fields, provenance=prov)
    if write:
        write_manifest(models, {name: entry})
    return report, entry


def build_int8_from_images(models: Path, images: Sequence[Any], source: str, threads: int = 1,
                           **gate_kw: Any) -> tuple[GateReport, dict[str, Any] | None]:
    """``clip_int8`` through the gate on in-memory images (PIL or uint8 arrays; the GMM's own), split as :func:`split`."""
    from anti_sus.preprocess import stack_wire

    spec = PreprocessSpec.from_dict(read_manifest(models)["artifacts"]["clip"]["preprocess"])
    calib, held = split(list(images))
    decision = gmm_decision(models)
    return build_int8(models, "clip", model_input(stack_wire(calib), spec), model_input(stack_wire(held), spec),
                      [decision] if decision else [], images=f"{len(held)} held out / {len(calib)} calibration {source}",
                      threads=threads, **gate_kw)


def parser() -> EnvParser:
    p = EnvParser("quantize", description=__doc__.split("\n\n")[0])
    p.add_env("--models", type=Path, default=Path(DEFAULT_MODELS_DIR), help="model directory (gets <target>_int8)")
    p.add_env("--images", type=Path, required=True,
              help="real images: the GMM's taste/good images for clip; every third is held out for parity, the rest calibrate")
    p.add_env("--target", choices=sorted(TARGETS), default="clip", help="which fp32 artifact to quantize")
    p.add_env("--gmm-threshold", type=float, default=None, help="GMM threshold of the agreement check (none: gmm.json's suggestion)")
    p.add_env("--watermark-threshold", type=float, default=0.5, help="P(watermark) threshold of the agreement check (--target watermark)")
    p.add_env("--max-images", type=int, default=300, help="most images read from --images")
    p.add_common()
    return p


def run_target(models: Path, target: str, folder: Path, *, threads: int = 1, max_images: int = 300,
               gmm_threshold: float | None = None, watermark_threshold: float = 0.5,
               **gate_kw: Any) -> tuple[GateReport, dict[str, Any] | None]:
    """The whole step for one target: read images, split them, pick the decisions, gate, record."""
    from .fit_gmm import find_images

    try:
        entry = read_manifest(models)["artifacts"][target]
    except (ModelDirError, KeyError):
        raise UserError(f"{models} has no {target!r} artifact to quantize") from None
    spec = PreprocessSpec.from_dict(entry["preprocess"])
    calib_paths, held_paths = split(find_images(folder)[:max_images])
    decisions: list[Decision] = []
    if target == "clip":
        d = gmm_decision(models, gmm_threshold)
        if d is None:
            log.warning("no GMM fitted on this CLIP in %s: the int8 gate checks cosine only; rerun after fitting the GMM", models)
        else:
            decisions.append(d)
    else:
        decisions.append(watermark_decision(watermark_threshold))
    return build_int8(models, target, load_inputs(calib_paths, spec), load_inputs(held_paths, spec), decisions,
                      images=f"{len(held_paths)} held out / {len(calib_paths)} calibration of the images under {folder}",
                      threads=threads, **gate_kw)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args, torch_threads=False)
    models = models_dir(args.models)
    report, entry = run_target(models, args.target, args.images, threads=args.threads, max_images=args.max_images,
                               gmm_threshold=args.gmm_threshold, watermark_threshold=args.watermark_threshold)
    print(report.summary())
    if entry is None:
        print(f"no int8 variant kept for {args.target}: the server keeps fp32")
        return 1
    print(f"wrote {models / entry['file']} ({TARGETS[args.target]}) and its gate report into {models / MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
