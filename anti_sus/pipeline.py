"""The filter pipeline: CLIP features -> GMM score -> probe (when learnt) -> prompt checks (when the model
directory has ``prompts.npz``) -> watermark on the survivors.

``Stages`` is the small interface the server needs (tests fake it); ``Pipeline``
is the real one built from a verified model directory. ``evaluate`` scores several
requests in one batch, each with its own thresholds, so requests from different
clients share one CLIP call.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from . import __version__
from .defaults import DEFAULT_MEMORY_BUDGET, DEFAULT_WATERMARK_THRESHOLD
from .modeldir import (DEFAULT_PIPELINE, STAGES, Artifact, ModelDirError, build_hint, int8_unusable, manifest_hash,
                       open_model_dir, pipeline_of, pipeline_required, read_manifest)

RUNNABLE = ("clip", "gmm", "probe", "prompts", "watermark")
"""Stages :func:`evaluate` knows how to run (a name registered in :data:`~anti_sus.modeldir.STAGES` but not here is refused at load)."""

log = logging.getLogger(__name__)

GOOD, OUTLIER, WATERMARK = "good", "outlier", "watermark"
PROBE = "probe"
"""Verdict of an image the learnt probe (``anti-sus learn``) scores below its threshold."""
PROMPT_PREFIX = "prompt:"
"""Verdicts ``prompt:<check>``: an enabled prompt check (:mod:`anti_sus.stages.prompts`) scored P(reject) >= its threshold."""


class Stages(Protocol):
    """What the server needs from a pipeline.

    Optional (read with ``getattr``, so older fakes keep working): ``has_probe``,
    ``probe_threshold`` and ``probe_prob(features) -> P(good)``; ``prompt_checks``
    (a :class:`~anti_sus.stages.prompts.PromptChecks` or None); ``order`` (the stage
    names in the order they judge, :func:`stage_order` gives the default).
    """

    gmm_threshold: float
    watermark_threshold: float
    has_watermark: bool

    def clip_input(self, batch: np.ndarray) -> np.ndarray: ...
    def embed(self, x: np.ndarray) -> np.ndarray: ...
    def gmm_score(self, features: np.ndarray) -> np.ndarray: ...
    def watermark_input(self, batch: np.ndarray) -> np.ndarray: ...
    def watermark_prob(self, x: np.ndarray) -> np.ndarray: ...
    def info(self) -> dict[str, Any]: ...


@dataclass
class Task:
    """One request's images and thresholds."""

    images: np.ndarray
    gmm_threshold: float
    watermark_threshold: float
    probe_threshold: float | None = None
    """None: the pipeline's own (the probe's stored threshold)."""
    prompt_thresholds: dict[str, float | None] | None = None
    """Per-check overrides of the prompt thresholds (a number turns a check on for this task, None off)."""


@dataclass
class Outcome:
    """Scores and verdicts for one task; ``watermark`` is NaN where the stage did not run."""

    gmm: np.ndarray
    watermark: np.ndarray
    verdicts: list[str]
    features: np.ndarray
    problem: str = ""
    """Non-empty when a stage gave a non-finite score for one of this task's images (the server answers an error)."""
    probe: np.ndarray | None = None
    """P(good) from the probe stage, NaN (or None) where there is no probe."""
    prompts: dict[str, np.ndarray] | None = None
    """P(reject) per prompt check (every check, on or off); None without prompt checks."""
    rejected_by: list[str | None] | None = None
    """Per image: the stage (its name in the pipeline's list) that rejected it, None for a good one."""

    @property
    def good(self) -> list[int]:
        return [i for i, v in enumerate(self.verdicts) if v == GOOD]

    def results(self) -> list[dict[str, Any]]:
        """Per-image result dicts as the wire protocol writes them."""
        return [
            {
                "index": i,
                "gmm": None if np.isnan(self.gmm[i]) else float(self.gmm[i]),  # None: the stage list omits the GMM
                "watermark": None if np.isnan(self.watermark[i]) else float(self.watermark[i]),
                "probe": None if self.probe is None or np.isnan(self.probe[i]) else float(self.probe[i]),
                "verdict": v,
                "rejected_by": None if self.rejected_by is None else self.rejected_by[i],
                **({} if self.prompts is None else {"prompts": {k: float(s[i]) for k, s in self.prompts.items()}}),
            }
            for i, v in enumerate(self.verdicts)
        ]


@dataclass
class Timings:
    """Seconds spent per stage in one ``evaluate`` call."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate model inputs, without copying the common single-request case (32 images at 512² is 100 MB)."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def evaluate(stages: Stages, tasks: Sequence[Task], *, watermark_all: bool = False, timings: Timings | None = None) -> list[Outcome]:
    """Score every task in one CLIP call and one watermark call.

    The probe (when the pipeline has one) scores every image's features (one dot
    product each); the watermark stage runs only on images whose GMM score and
    probe probability reach their task's thresholds (the expensive model sees only
    survivors), unless ``watermark_all`` (used by the tuning tools, which need
    every image's probability).
    """
    timings = timings if timings is not None else Timings()
    order = stage_order(stages)
    t0 = time.perf_counter()
    x = _join([stages.clip_input(t.images) for t in tasks])
    t1 = time.perf_counter()
    feats = stages.embed(x)
    t2 = time.perf_counter()
    has_gmm = "gmm" in order
    scores = np.asarray(stages.gmm_score(feats), dtype=np.float64) if has_gmm else np.full(len(feats), np.nan)
    t3 = time.perf_counter()
    timings.add("preprocess", t1 - t0)
    timings.add("clip", t2 - t1)
    if has_gmm:
        timings.add("gmm", t3 - t2)
    has_probe = bool(getattr(stages, "has_probe", False)) and "probe" in order
    probe = np.full(len(scores), np.nan)
    if has_probe:
        probe = np.asarray(stages.probe_prob(feats), dtype=np.float64)  # type: ignore[attr-defined]
        timings.add("probe", time.perf_counter() - t3)
    checks = getattr(stages, "prompt_checks", None) if "prompts" in order else None  # fakes may have none
    prompt_scores: dict[str, np.ndarray] | None = None
    if checks is not None:
        t4 = time.perf_counter()
        prompt_scores = {k: np.asarray(v, dtype=np.float64) for k, v in checks.scores(feats).items()}
        timings.add("prompts", time.perf_counter() - t4)

    bounds = np.cumsum([0] + [len(t.images) for t in tasks])
    gmm_keep = [scores[a:b] >= t.gmm_threshold if has_gmm else np.ones(b - a, bool) for t, a, b in zip(tasks, bounds[:-1], bounds[1:])]
    probe_keep = [probe[a:b] >= (stages.probe_threshold if t.probe_threshold is None else t.probe_threshold)  # type: ignore[attr-defined]
                  if has_probe else np.ones(b - a, bool) for t, a, b in zip(tasks, bounds[:-1], bounds[1:])]
    # Per image: the first enabled prompt check it fails ("" when none), checks in the manifest's order.
    prompt_fail = [np.full(b - a, "", dtype=object) for a, b in zip(bounds[:-1], bounds[1:])]
    if checks is not None and prompt_scores is not None:
        from .stages.prompts import merged_thresholds

        for t, a, b, fail in zip(tasks, bounds[:-1], bounds[1:], prompt_fail):
            for name, thr in merged_thresholds(checks.threshold_of(), t.prompt_thresholds).items():
                if thr is not None:
                    fail[(fail == "") & (prompt_scores[name][a:b] >= thr)] = PROMPT_PREFIX + name
    # The watermark model sees only images every stage listed before it keeps (stages after it judge all).
    has_wm = stages.has_watermark and "watermark" in order
    before = order[:order.index("watermark")] if has_wm else order
    keep = [(g if "gmm" in before else True) & (q if "probe" in before else True) & ((f == "") if "prompts" in before else True)
            & np.ones(len(g), bool) for g, q, f in zip(gmm_keep, probe_keep, prompt_fail)]
    probs = [np.full(len(t.images), np.nan) for t in tasks]
    ran_on = [np.zeros(len(t.images), bool) for t in tasks]
    if has_wm:
        picks = [np.ones(len(t.images), bool) if watermark_all else k for t, k in zip(tasks, keep)]
        ran_on = picks
        t4 = time.perf_counter()
        parts = [stages.watermark_input(t.images[p]) for t, p in zip(tasks, picks) if p.any()]
        t5 = time.perf_counter()
        if parts:
            flat = stages.watermark_prob(_join(parts))
            pos = 0
            for prob, p in zip(probs, picks):
                n = int(p.sum())
                prob[p] = flat[pos : pos + n]
                pos += n
        timings.add("preprocess", t5 - t4)
        timings.add("watermark", time.perf_counter() - t5)

    outcomes = []
    for t, a, b, g, q, f, p, ran in zip(tasks, bounds[:-1], bounds[1:], gmm_keep, probe_keep, prompt_fail, probs, ran_on):
        # The first stage in the pipeline's order that rejects an image names its verdict and ``rejected_by``.
        verdicts, rejected = [], []
        for g_ok, q_ok, f_name, pr, r in zip(g.tolist(), q.tolist(), f.tolist(), p.tolist(), ran.tolist()):
            fails = {"gmm": None if g_ok else OUTLIER, "probe": None if q_ok else PROBE, "prompts": f_name or None,
                     "watermark": WATERMARK if has_wm and r and pr >= t.watermark_threshold else None}
            by = next((s for s in order if fails.get(s)), None)
            verdicts.append(GOOD if by is None else str(fails[by]))
            rejected.append(by)
        mine = None if prompt_scores is None else {k: v[a:b] for k, v in prompt_scores.items()}
        outcomes.append(Outcome(scores[a:b], p, verdicts, feats[a:b],
                                _non_finite(scores[a:b] if has_gmm else np.zeros(b - a), p, ran, probe[a:b] if has_probe else None, mine),
                                probe[a:b] if has_probe else None, mine, rejected))
    return outcomes


def stage_order(stages: Any) -> list[str]:
    """The stages ``stages`` runs, in order: its ``order`` (the manifest's list), else the default order
    (clip, gmm, then probe, prompts and watermark when it has them; fakes without ``order`` get this)."""
    order = getattr(stages, "order", None)
    if order is not None:
        return list(order)
    return (["clip", "gmm"] + (["probe"] if getattr(stages, "has_probe", False) else [])
            + (["prompts"] if getattr(stages, "prompt_checks", None) is not None else [])
            + (["watermark"] if stages.has_watermark else []))


def _non_finite(gmm: np.ndarray, watermark: np.ndarray, ran: np.ndarray, probe: np.ndarray | None = None,
                prompts: dict[str, np.ndarray] | None = None) -> str:
    """Why these scores cannot be trusted, or "" when they are all finite.

    A NaN GMM score would silently compare as "outlier" and a NaN probability
    as "good", and neither is valid JSON: say which image and stage instead.
    """
    bad = np.flatnonzero(~np.isfinite(gmm))
    if len(bad):
        return f"model produced a non-finite GMM score ({gmm[bad[0]]}) for image {int(bad[0])}"
    bad = np.flatnonzero(ran & ~np.isfinite(watermark))  # NaN where the stage did not run means "not run"
    if len(bad):
        return f"model produced a non-finite watermark probability ({watermark[bad[0]]}) for image {int(bad[0])}"
    if probe is not None:
        bad = np.flatnonzero(~np.isfinite(probe))
        if len(bad):
            return f"probe produced a non-finite probability ({probe[bad[0]]}) for image {int(bad[0])}"
    for name, s in (prompts or {}).items():
        bad = np.flatnonzero(~np.isfinite(s))
        if len(bad):
            return f"prompt check {name} produced a non-finite score ({s[bad[0]]}) for image {int(bad[0])}"
    return ""


def _load(name: str, d: Path, make: Any) -> Any:
    """Build one stage; a file that verifies but cannot be loaded becomes a ModelDirError with the fix."""
    try:
        return make()
    except Exception as exc:  # ORT and numpy raise many types for a broken model file
        raise ModelDirError(f"{name} in {d} cannot be loaded ({type(exc).__name__}: {str(exc)[:300]}); "
                            f"rebuild it with: {build_hint(name, d)}") from None


def _choose_clip(d: Path, arts: dict[str, Artifact], int8: bool, fp32: bool) -> tuple[str, str]:
    """(artifact to serve, note for the log): int8 by default when its gate allows, fp32 when asked or not allowed."""
    if int8 and fp32:
        raise ModelDirError("--int8 (require the int8 CLIP) and --fp32 (refuse it) contradict each other; give one")
    if fp32:
        return "clip", ("fp32 CLIP served (--fp32)" if "clip_int8" in arts else "")
    why = int8_unusable(arts)
    if not why:
        return "clip_int8", ""
    if not int8:
        hint = build_hint("clip_int8", d)
        return "clip", ("" if "clip_int8" not in arts and why.startswith("no ") else
                        f"fp32 CLIP served: {why}; rerun the int8 gate: {hint}")
    if "clip_int8" not in arts:
        raise ModelDirError(f"--int8 asked for, but {d} has no clip_int8 artifact; build it with: {build_hint('clip_int8', d)}")
    fp32_sha = (arts["clip_int8"].entry.get("provenance") or {}).get("fp32_sha256")
    if fp32_sha is not None and fp32_sha != arts["clip"].sha256:
        raise ModelDirError(f"--int8 asked for, but {d}'s clip_int8 was quantized from another clip model; "
                            f"rebuild it with: {build_hint('clip_int8', d)}")
    return "clip_int8", (f"int8 CLIP served because --int8 requires it, although {why}; the GMM was fitted on fp32 "
                         "features: re-check the threshold with `anti-sus tune`")


def _choose_watermark(d: Path, arts: dict[str, Artifact], fp32: bool, threshold: float) -> tuple[str, str]:
    """(artifact to serve, note): ``watermark_int8`` when its gate passed for this watermark model, else fp32.

    ``--fp32`` refuses it as it refuses the int8 CLIP. A gate that checked another
    threshold than the one served is noted (the agreement was measured elsewhere) but
    does not block it: probabilities were also checked to stay within the gate's bound.
    """
    if "watermark_int8" not in arts:
        return "watermark", ""
    if fp32:
        return "watermark", "fp32 watermark model served (--fp32)"
    why = int8_unusable(arts, "watermark_int8", "watermark")
    if why:
        return "watermark", f"fp32 watermark model served: {why}; rerun the int8 gate: {build_hint('watermark_int8', d)}"
    gate = (arts["watermark_int8"].entry.get("provenance") or {}).get("gate") or {}
    checked = [x.get("threshold") for x in gate.get("decisions") or [] if isinstance(x, dict) and x.get("name") == "watermark"]
    if checked and checked[0] != threshold:
        return "watermark_int8", (f"int8 watermark model served; its gate checked decisions at {checked[0]}, "
                                  f"the server's threshold is {threshold}")
    return "watermark_int8", ""


def _gate_summary(arts: dict[str, Artifact], name: str) -> dict[str, object] | None:
    """The int8 gate's headline figures for ``info`` (None when fp32 is served)."""
    if not name.endswith("_int8"):
        return None
    gate = (arts[name].entry.get("provenance") or {}).get("gate") or {}
    return {k: gate.get(k) for k in ("method", "speedup", "cosine_min", "agreement", "n_held_out")}


class Pipeline:
    """The real stages, loaded from a model directory verified against its manifest."""

    def __init__(self, clip: Any, gmm: Any, watermark: Any | None, gmm_threshold: float,
                 watermark_threshold: float, details: dict[str, Any], probe: Any | None = None,
                 probe_threshold: float | None = None, prompt_checks: Any | None = None,
                 order: Sequence[str] | None = None) -> None:
        self.clip = clip
        self.gmm = gmm
        self.watermark = watermark
        self.has_watermark = watermark is not None
        self.gmm_threshold = float(gmm_threshold)
        self.watermark_threshold = float(watermark_threshold)
        self.details = details
        self.probe = probe
        self.has_probe = probe is not None
        self.probe_threshold = float(probe.threshold if probe_threshold is None else probe_threshold) if probe is not None else float("nan")
        self.prompt_checks = prompt_checks
        self.order = stage_order(self) if order is None else list(order)
        """The stages in the order they judge (``info`` lists them; :func:`evaluate` follows it)."""
        """:class:`~anti_sus.stages.prompts.PromptChecks` from ``prompts.npz``, or None."""

    @classmethod
    def load(cls, models: str | Path, *, int8: bool = False, fp32: bool = False, no_watermark: bool = False, threads: int = 0,
             max_batch: int = 32, gmm_threshold: float | None = None,
             watermark_threshold: float = DEFAULT_WATERMARK_THRESHOLD,
             memory_budget: int | None = DEFAULT_MEMORY_BUDGET, probe_threshold: float | None = None,
             prompt_thresholds: dict[str, float | None] | None = None) -> "Pipeline":
        """Verify ``models`` and load every stage; raises :class:`ModelDirError` with the fix.

        ``probe_threshold``: overrides the threshold stored with the probe (when the manifest lists one).
        ``prompt_thresholds``: overrides stored prompt-check thresholds (a number turns a check on, None off);
        a name the directory's ``prompts.npz`` lacks is a ModelDirError.

        ``memory_budget``: bytes of activations one model call may use; each stage runs
        its images in sub-batches that fit it (None: ``max_batch`` at a time).
        """
        from .stages.clip import ClipStage
        from .stages.gmm import GmmScorer
        from .stages.probe import ProbeStage
        from .stages.watermark import WatermarkStage

        d = Path(models)
        listed = pipeline_of(read_manifest(d), d)  # None: no "pipeline" list, the default order
        arts = open_model_dir(d, pipeline_required(listed))
        cannot = [s for s in listed or () if s not in RUNNABLE]
        if cannot:
            raise ModelDirError(f"{d}: this server cannot run pipeline stage(s) {', '.join(cannot)} (it runs: {', '.join(RUNNABLE)})")
        # Without a list: clip, the GMM, and each optional stage whose artifacts the directory has, in the default order.
        order = listed or [s for s in DEFAULT_PIPELINE if s in ("clip", "gmm") or all(a in arts for a in STAGES[s])]
        notes: list[str] = []
        clip_name, int8_note = _choose_clip(d, arts, int8, fp32)
        if int8_note:
            notes.append(int8_note)
        fitted_on = suggested = None
        if "gmm" in order:
            gmm_threshold, fitted_on, suggested = _gmm_meta(d, arts, gmm_threshold)
        else:
            gmm_threshold = float("nan")

        clip = _load(clip_name, d, lambda: ClipStage.from_entry(arts[clip_name].path, arts[clip_name].entry, threads, max_batch,
                                                                       memory_budget))
        gmm = _load("gmm", d, lambda: GmmScorer.load(arts["gmm"].path)) if "gmm" in order else None
        if gmm is not None and clip.dim is not None and int(gmm.dim) != clip.dim:
            raise ModelDirError(f"GMM dimension {gmm.dim} != CLIP feature dimension {clip.dim}; refit with: {build_hint('gmm', d)}")
        dim = int(gmm.dim) if gmm is not None else int(clip.dim or 0)
        probe = None
        if "probe" in order:  # learnt by `anti-sus learn`: judged after the GMM, before the watermark by default
            probe = _load("probe", d, lambda: ProbeStage.load(arts["probe"].path))
            _require_tied_to_clip("probe", "the probe", probe.dim, probe.feature_model_sha256, dim, arts, d)
        prompts = _load_prompts(d, arts if "prompts" in order else {}, dim, prompt_thresholds)
        watermark = None
        if no_watermark:
            notes.append("watermark stage disabled by --no-watermark")
        elif "watermark" not in order and "watermark" in arts:
            notes.append(f"the pipeline list of {d} leaves out the watermark stage")
        elif "watermark" not in arts:
            notes.append(f"no watermark model in {d}: the watermark stage is off; build it with: {build_hint('watermark', d)}")
        else:
            wm_name, wm_note = _choose_watermark(d, arts, fp32, watermark_threshold)
            if wm_note:
                notes.append(wm_note)
            watermark = _load(wm_name, d, lambda: WatermarkStage.from_entry(arts[wm_name].path, arts[wm_name].entry,
                                                                             threads, max_batch, memory_budget))
        details = {
            "models_dir": str(d.resolve()),
            "manifest_sha256": manifest_hash(d),  # what ``info`` shows so a client can see a reload swap
            "clip": {"artifact": clip_name, "variant": "int8" if clip_name == "clip_int8" else "fp32",
                     "int8_gate": _gate_summary(arts, clip_name), "file": arts[clip_name].path.name, "sha256": arts[clip_name].sha256,
                     "dim": clip.dim, "input_size": clip.spec.size, "memory": clip.memory_info()},
            "gmm": None if gmm is None else {"file": arts["gmm"].path.name, "sha256": arts["gmm"].sha256, "dim": int(gmm.dim),
                                             "fitted_on_clip_sha256": fitted_on, "suggested_threshold": suggested},
            "pipeline_list": listed is not None,  # False: the default order (the manifest names none)
            "watermark": None if watermark is None else {"artifact": wm_name, "variant": "int8" if wm_name.endswith("_int8") else "fp32",
                                                         "int8_gate": _gate_summary(arts, wm_name), "file": arts[wm_name].path.name,
                                                         "sha256": arts[wm_name].sha256, "input_size": watermark.spec.size,
                                                         "memory": watermark.memory_info()},
            "probe": None if probe is None else {"file": arts["probe"].path.name, "sha256": arts["probe"].sha256,
                                                 "dim": probe.dim, "stored_threshold": probe.threshold,
                                                 "checksum": probe.checksum},
            "prompts": None if prompts is None else {"file": arts["prompts"].path.name, "sha256": arts["prompts"].sha256,
                                                     "logit_scale": prompts.logit_scale, "checks": _describe_checks(prompts)},
            "notes": notes,
        }
        for note in notes:
            log.warning(note)
        order = [s for s in order if s != "watermark" or watermark is not None]
        return cls(clip, gmm, watermark, gmm_threshold, watermark_threshold, details, probe, probe_threshold, prompts, order)

    def clip_input(self, batch: np.ndarray) -> np.ndarray:
        return self.clip.preprocess(batch)

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.clip.run(x)

    def gmm_score(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self.gmm.score(features), dtype=np.float64)

    def probe_prob(self, features: np.ndarray) -> np.ndarray:
        """P(good) per image from the learnt probe."""
        assert self.probe is not None
        return self.probe.prob(features)

    def watermark_input(self, batch: np.ndarray) -> np.ndarray:
        assert self.watermark is not None
        return self.watermark.preprocess(batch)

    def watermark_prob(self, x: np.ndarray) -> np.ndarray:
        assert self.watermark is not None
        return self.watermark.run(x)

    def info(self) -> dict[str, Any]:
        thresholds: dict[str, Any] = {"gmm": self.gmm_threshold, "watermark": self.watermark_threshold}
        if self.gmm is None:  # the stage list leaves the GMM out: no threshold (NaN is not JSON)
            del thresholds["gmm"]
        if self.has_probe:
            thresholds["probe"] = self.probe_threshold
        out = {"version": __version__, "models": self.details, "thresholds": thresholds,
               "watermark_stage": self.has_watermark, "probe_stage": self.has_probe,
               "prompt_stage": self.prompt_checks is not None}
        if self.prompt_checks is not None:
            # Every check, on or off, with the threshold it is judged by (None: off unless a request sets one).
            thresholds["prompts"] = self.prompt_checks.threshold_of()
            out["prompt_checks"] = _describe_checks(self.prompt_checks)
        # The stages in the order they judge, each with the threshold it judges by (prompts: one per check).
        out["stages"] = [{"name": s, "threshold": thresholds.get(s)} for s in self.order]
        return out


def _describe_checks(checks: Any) -> list[dict[str, Any]]:
    """``info``'s view of the prompt checks: name, on/off, threshold, prompt counts."""
    return [{"name": s.name, "enabled": s.enabled, "threshold": s.threshold, "reject_prompts": len(s.reject),
             "accept_prompts": len(s.accept), "verdict": PROMPT_PREFIX + s.name} for s in checks.specs()]


def _gmm_meta(d: Path, arts: dict[str, Artifact], gmm_threshold: float | None) -> tuple[float, Any, Any]:
    """(threshold to serve, CLIP sha256 the GMM was fitted on, suggested threshold), checked against this directory."""
    try:
        meta = json.loads(arts["gmm_meta"].path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{arts['gmm_meta'].path} is not readable JSON ({exc}); rebuild it with: {build_hint('gmm', d)}") from None
    fitted_on = meta.get("feature_model_sha256") if isinstance(meta, dict) else None
    if fitted_on != arts["clip"].sha256:
        raise ModelDirError(
            f"the GMM in {d} was fitted on features of another CLIP model (sha256 {str(fitted_on)[:12]}…, "
            f"this directory's clip is {arts['clip'].sha256[:12]}…); refit it with: {build_hint('gmm', d)}"
        )
    suggested = meta.get("suggested_threshold")
    if gmm_threshold is None:
        if not isinstance(suggested, (int, float)) or isinstance(suggested, bool):
            raise ModelDirError(f"{arts['gmm_meta'].path} has no suggested_threshold; pass --gmm-threshold or refit with: {build_hint('gmm', d)}")
        gmm_threshold = float(suggested)
    return float(gmm_threshold), fitted_on, suggested


def _require_tied_to_clip(name: str, what: str, found_dim: int, found_sha: str, dim: int,
                          arts: dict[str, Artifact], d: Path) -> None:
    """A stage built on CLIP features (probe, prompt checks) must match the served CLIP's dimension and weights."""
    if found_dim != dim:
        raise ModelDirError(f"{what} in {d} have {found_dim}-d features, the CLIP features are {dim}-d; "
                            f"rebuild with: {build_hint(name, d)}")
    if found_sha and found_sha != arts["clip"].sha256:
        raise ModelDirError(f"{what} in {d} were made from features of another CLIP model; "
                            f"rebuild with: {build_hint(name, d)}")


def _load_prompts(d: Path, arts: dict[str, Artifact], dim: int,
                  overrides: dict[str, float | None] | None) -> Any | None:
    """The directory's prompt checks (None without ``prompts``), checked against its CLIP; overrides applied."""
    from .stages.prompts import PromptChecks

    if "prompts" not in arts:
        if overrides:
            raise ModelDirError(f"prompt thresholds given, but {d} has no prompt checks; add one with: {build_hint('prompts', d)}")
        return None
    checks = _load("prompts", d, lambda: PromptChecks.load(arts["prompts"].path))
    _require_tied_to_clip("prompts", "the prompt checks", checks.dim, checks.feature_model_sha256, dim, arts, d)
    unknown = sorted(set(overrides or {}) - set(checks.names))
    if unknown:
        raise ModelDirError(f"unknown prompt check(s) {', '.join(unknown)}; {d} has: {', '.join(checks.names) or 'none'}")
    if overrides:
        thr = checks.thresholds.copy()
        on = checks.enabled.copy()
        for i, n in enumerate(checks.names):
            if n in overrides:
                on[i] = overrides[n] is not None
                thr[i] = thr[i] if overrides[n] is None else float(overrides[n])  # type: ignore[arg-type]
        checks = PromptChecks(checks.names, thr, on, checks.embeddings, checks.check, checks.reject, checks.texts,
                              checks.logit_scale, checks.feature_model_sha256, checks.text_model_sha256)
    return checks
