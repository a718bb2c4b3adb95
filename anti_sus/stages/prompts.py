"""Zero-shot prompt checks: each image's CLIP features against named lists of text prompts.

A check (``nsfw``, ``screenshot``, ``text-meme``, ``illustration``, or one added
with ``anti-sus prompts add``) is a set of *reject* prompts against a set of
*accept* prompts, encoded once with CLIP's text tower. An image's score for a
check is P(reject): a softmax over ``logit_scale`` × cosine to every prompt of
the check (CLIP's zero-shot classifier), summed over the reject prompts. The
image is rejected with verdict ``prompt:<name>`` when an enabled check's score is
>= its threshold. All checks are scored in one matrix product, so the stage costs
a few microseconds per image next to CLIP's tens of milliseconds.

``prompts.npz`` holds plain arrays only (``np.load(allow_pickle=False)``):

* ``format`` int64 scalar (1); ``logit_scale`` float64 scalar;
* ``names`` U[C], ``thresholds`` float64[C], ``enabled`` bool[C]: one row per check;
* ``embeddings`` float32[P, D] (unit rows), ``check`` int64[P] (row of ``names``),
  ``reject`` bool[P] (reject prompt vs accept prompt), ``texts`` U[P]: one row per prompt;
* ``feature_model_sha256`` U scalar: the ``clip`` (visual tower) whose space the
  text features share; ``text_model_sha256`` U scalar: the ``clip_text`` that encoded them.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .arrays import load_npz

FORMAT = 1
VERDICT_PREFIX = "prompt:"
"""Verdict of an image an enabled prompt check rejects: ``prompt:nsfw``, ``prompt:screenshot``, …"""
DEFAULT_LOGIT_SCALE = 100.0
"""CLIP's trained logit scale (exp(4.6052)); export writes the model's own value when it has one."""
MAX_CHECKS = 64
MAX_PROMPTS = 4096
MAX_DIM = 8192
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
KEYS = ("format", "logit_scale", "names", "thresholds", "enabled", "embeddings", "check", "reject", "texts",
        "feature_model_sha256", "text_model_sha256")


class PromptFileError(ValueError):
    """``prompts.npz`` is malformed or a check definition is invalid."""


@dataclass(frozen=True)
class CheckSpec:
    """One check as text: the prompts that mean "reject" and those that mean "keep"."""

    name: str
    reject: tuple[str, ...]
    accept: tuple[str, ...]
    threshold: float = 0.5
    enabled: bool = False


DEFAULT_CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("nsfw",
              ("a nude photo", "a pornographic photo", "an explicit sexual image", "a photo of naked people",
               "a photo of genitals"),
              ("a photo", "a landscape photo", "a photo of people wearing clothes", "a photo of an animal",
               "a photo of a city", "a photo of food"),
              threshold=0.6, enabled=True),
    CheckSpec("screenshot",
              ("a screenshot of a computer screen", "a screenshot of a phone app", "a screenshot of a website",
               "a screenshot of a chat conversation"),
              ("a photo", "a photo taken with a camera", "a landscape photo", "a photo of a person"),
              threshold=0.6),
    CheckSpec("text-meme",
              ("a meme with text", "an image macro with a caption", "a picture of text", "a poster with a lot of text"),
              ("a photo", "a photo taken with a camera", "a landscape photo", "a photo of a person"),
              threshold=0.6),
    CheckSpec("illustration",
              ("a drawing", "an illustration", "a cartoon", "a digital painting", "a 3d render", "anime art"),
              ("a photo", "a photo taken with a camera", "a landscape photo", "a photo of a person"),
              threshold=0.6),
)
"""The checks ``models.export_clip`` encodes: ``nsfw`` on (for a pretrained CLIP), the others present but off."""


def check_name(name: str) -> str:
    """``name`` when it is a valid check name (1-40 of a-z 0-9 - _), else PromptFileError."""
    if not isinstance(name, str) or not 1 <= len(name) <= 40 or not set(name) <= NAME_CHARS:
        raise PromptFileError(f"check name {name!r}: use 1-40 characters of a-z, 0-9, '-' and '_'")
    return name


@dataclass(frozen=True)
class PromptChecks:
    """Every check of a model directory with its prompt embeddings, ready to score features."""

    names: tuple[str, ...]
    thresholds: np.ndarray
    enabled: np.ndarray
    embeddings: np.ndarray
    check: np.ndarray
    reject: np.ndarray
    texts: tuple[str, ...]
    logit_scale: float = DEFAULT_LOGIT_SCALE
    feature_model_sha256: str = ""
    text_model_sha256: str = ""
    _cols: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False, compare=False)
    _ind: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    """(reject, accept) indicator matrices float64[P, C]: every check's sums in two matrix products."""

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        for n in names:
            check_name(n)
        if len(set(names)) != len(names) or not 0 <= len(names) <= MAX_CHECKS:
            raise PromptFileError(f"prompts: check names must be unique and at most {MAX_CHECKS}")
        c = len(names)
        thr = np.asarray(self.thresholds, dtype=np.float64).reshape(-1)
        on = np.asarray(self.enabled).reshape(-1)
        emb = np.asarray(self.embeddings)
        chk = np.asarray(self.check).reshape(-1)
        rej = np.asarray(self.reject).reshape(-1)
        texts = tuple(str(t) for t in self.texts)
        if thr.shape != (c,) or on.shape != (c,) or on.dtype != np.bool_:
            raise PromptFileError(f"prompts: thresholds and enabled need one entry per check ({c})")
        if not (np.isfinite(thr).all() and ((thr >= 0) & (thr <= 1)).all()):
            raise PromptFileError("prompts: thresholds must be within 0..1")
        if emb.ndim != 2 or emb.dtype.kind != "f" or not (len(texts) == emb.shape[0] <= MAX_PROMPTS) \
                or not 1 <= emb.shape[1] <= MAX_DIM:
            raise PromptFileError(f"prompts: embeddings must be float[P<={MAX_PROMPTS}, D<={MAX_DIM}] with one text per row")
        if chk.shape != (emb.shape[0],) or rej.shape != (emb.shape[0],) or chk.dtype.kind not in "iu" or rej.dtype != np.bool_:
            raise PromptFileError("prompts: check (int) and reject (bool) need one entry per prompt")
        if len(chk) and (chk.min() < 0 or chk.max() >= c):
            raise PromptFileError("prompts: a prompt names a check that does not exist")
        if not np.isfinite(emb).all() or not (np.isfinite(self.logit_scale) and 0 < self.logit_scale <= 1000):
            raise PromptFileError("prompts: embeddings or logit_scale are not finite (logit_scale within 0..1000)")
        cols = []
        for i, n in enumerate(names):
            r, a = np.flatnonzero((chk == i) & rej), np.flatnonzero((chk == i) & ~rej)
            if not len(r) or not len(a):
                raise PromptFileError(f"prompts: check {n!r} needs at least one reject and one accept prompt")
            cols.append((r, a))
        norms = np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
        for k, v in (("names", names), ("thresholds", thr), ("enabled", on), ("check", chk.astype(np.int64)),
                     ("reject", rej), ("texts", texts), ("logit_scale", float(self.logit_scale)),
                     ("embeddings", (emb / np.maximum(norms, 1e-12)).astype(np.float32)), ("_cols", cols),
                     ("_ind", (((chk[:, None] == np.arange(c)) & rej[:, None]).astype(np.float64),
                               ((chk[:, None] == np.arange(c)) & ~rej[:, None]).astype(np.float64)))):
            object.__setattr__(self, k, v)

    # -- building ----------------------------------------------------------------
    @classmethod
    def encode(cls, specs: Sequence[CheckSpec], encode: Callable[[list[str]], np.ndarray], *,
               logit_scale: float = DEFAULT_LOGIT_SCALE, feature_model_sha256: str = "",
               text_model_sha256: str = "") -> "PromptChecks":
        """Encode every spec's prompts with ``encode`` (strings -> unit features, e.g. ``TextEncoder.encode``)."""
        texts: list[str] = []
        check: list[int] = []
        reject: list[bool] = []
        for i, s in enumerate(specs):
            check_name(s.name)
            if not s.reject or not s.accept:
                raise PromptFileError(f"check {s.name!r}: give at least one reject and one accept prompt")
            for t in (*s.reject, *s.accept):
                if not isinstance(t, str) or not t.strip():
                    raise PromptFileError(f"check {s.name!r}: empty prompt")
            texts += [*s.reject, *s.accept]
            check += [i] * (len(s.reject) + len(s.accept))
            reject += [True] * len(s.reject) + [False] * len(s.accept)
        emb = np.asarray(encode(texts), dtype=np.float32) if texts else np.zeros((0, 1), np.float32)
        return cls(tuple(s.name for s in specs), np.array([s.threshold for s in specs], np.float64),
                   np.array([s.enabled for s in specs], bool), emb, np.array(check, np.int64), np.array(reject, bool),
                   tuple(texts), logit_scale, feature_model_sha256, text_model_sha256)

    def specs(self) -> list[CheckSpec]:
        """The checks as text (what ``prompts list`` shows and ``prompts add`` re-encodes)."""
        return [CheckSpec(n, tuple(self.texts[j] for j in r), tuple(self.texts[j] for j in a),
                          float(self.thresholds[i]), bool(self.enabled[i]))
                for i, (n, (r, a)) in enumerate(zip(self.names, self._cols))]

    # -- scoring -----------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def threshold_of(self) -> dict[str, float | None]:
        """Each check's stored threshold, None for a check that is off."""
        return {n: float(t) if on else None for n, t, on in zip(self.names, self.thresholds, self.enabled)}

    def scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """P(reject) per check and image (float64[N] each) for ``float[N, D]`` features."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"prompts: expected features [N, {self.dim}], got {list(x.shape)}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        logits = (x @ self.embeddings.T).astype(np.float64) * self.logit_scale  # one product for every check
        if 2 * self.logit_scale < 600 and self._ind is not None:
            # exp(logit - row max) >= exp(-2 * scale) stays a normal float64 here, so no check's sum underflows:
            # each check's reject and accept sums are then two products, however many checks there are.
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            rej, acc = e @ self._ind[0], e @ self._ind[1]
            p = rej / (rej + acc)
            return {n: p[:, i] for i, n in enumerate(self.names)}
        out = {}
        for n, (r, a) in zip(self.names, self._cols):
            lr = np.logaddexp.reduce(logits[:, r], axis=1)
            la = np.logaddexp.reduce(logits[:, a], axis=1)
            out[n] = np.exp(-np.logaddexp(0.0, la - lr))  # sigmoid(lr - la) = sum softmax over the reject prompts
        return out

    # -- editing (anti-sus prompts) ------------------------------------------------
    def replaced(self, specs: Sequence[CheckSpec], encode: Callable[[list[str]], np.ndarray] | None = None,
                 text_model_sha256: str | None = None, feature_model_sha256: str | None = None) -> "PromptChecks":
        """A copy with ``specs`` as its checks; prompts already encoded are reused, new ones go through ``encode``.

        A ``text_model_sha256`` other than the stored one (a re-exported text tower) re-encodes every prompt.
        """
        known: dict[str, np.ndarray] = {t: self.embeddings[i] for i, t in enumerate(self.texts)}
        fresh = sorted({t for s in specs for t in (*s.reject, *s.accept)} - set(known)) \
            if text_model_sha256 in (None, self.text_model_sha256) else sorted({t for s in specs for t in (*s.reject, *s.accept)})
        if fresh:
            if encode is None:
                raise PromptFileError("new prompts need a text encoder")
            known.update(zip(fresh, np.asarray(encode(fresh), dtype=np.float32)))
        return PromptChecks.encode(specs, lambda ts: np.stack([known[t] for t in ts]), logit_scale=self.logit_scale,
                                   feature_model_sha256=self.feature_model_sha256 if feature_model_sha256 is None
                                   else feature_model_sha256,
                                   text_model_sha256=self.text_model_sha256 if text_model_sha256 is None else text_model_sha256)

    # -- file --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The ``prompts.npz`` content: plain arrays, unicode as fixed-width ``U`` (no pickled objects)."""
        buf = io.BytesIO()
        np.savez(buf, format=np.int64(FORMAT), logit_scale=np.float64(self.logit_scale),
                 names=np.array(self.names, dtype="U40") if self.names else np.zeros(0, "U1"),
                 thresholds=self.thresholds, enabled=self.enabled, embeddings=self.embeddings, check=self.check,
                 reject=self.reject, texts=np.array(self.texts) if self.texts else np.zeros(0, "U1"),
                 feature_model_sha256=np.array(self.feature_model_sha256), text_model_sha256=np.array(self.text_model_sha256))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PromptChecks":
        """Read ``prompts.npz``; never unpickles; raises :class:`PromptFileError` naming what is wrong."""
        a = load_npz(path, KEYS, PromptFileError, "prompts file")
        if a["format"].shape != () or int(a["format"]) != FORMAT:
            raise PromptFileError(f"{path}: format {a['format']} is not {FORMAT}")
        for k in ("names", "texts", "feature_model_sha256", "text_model_sha256"):
            if a[k].dtype.kind != "U":
                raise PromptFileError(f"{path}: {k} must be unicode text")
        try:
            return cls(tuple(a["names"].tolist()), a["thresholds"], a["enabled"], a["embeddings"], a["check"], a["reject"],
                       tuple(a["texts"].tolist()), float(a["logit_scale"]), str(a["feature_model_sha256"][()]),
                       str(a["text_model_sha256"][()]))
        except PromptFileError as exc:
            raise PromptFileError(f"{path}: {exc}") from None


def merged_thresholds(base: Mapping[str, float | None], override: Mapping[str, float | None] | None) -> dict[str, float | None]:
    """The thresholds one request is judged by: ``override`` wins per check (a number turns a check on, None off)."""
    out = dict(base)
    for k, v in (override or {}).items():
        if k in out:
            out[k] = v
    return out


# -- a model directory's prompts.npz ------------------------------------------------
PROMPTS_FILE = "prompts.npz"


def directory_encoder(directory: str | os.PathLike[str]) -> tuple[Callable[[list[str]], np.ndarray], str, str]:
    """(encode, clip_text sha256, clip sha256) for a model directory, without torch (its ONNX text tower).

    fp32 even when an int8 text tower passed its gate: prompts are encoded once,
    so the exact features are worth the few milliseconds.
    """
    from ..modeldir import read_manifest
    from ..text.encoder import TextEncoder, text_entries

    text, _ = text_entries(directory)  # ModelDirError naming the build command when there is no text tower
    enc = TextEncoder.from_dir(directory, variant="fp32")
    clip = read_manifest(directory)["artifacts"].get("clip") or {}
    return enc.encode, str(text.get("sha256", "")), str(clip.get("sha256", ""))


def load_dir(directory: str | os.PathLike[str]) -> PromptChecks | None:
    """The directory's prompt checks (None when its manifest lists none); its file checked against the manifest."""
    from pathlib import Path

    from ..modeldir import ModelDirError, read_manifest, sha256_file

    entry = read_manifest(directory)["artifacts"].get("prompts")
    if not isinstance(entry, dict):
        return None
    path = Path(directory) / PROMPTS_FILE
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        raise ModelDirError(f"prompts: {path} is missing or does not match the manifest; re-export the prompts "
                            f"(python -m models.export_clip) or remove the manifest entry")
    return PromptChecks.load(path)


def save_dir(directory: str | os.PathLike[str], checks: PromptChecks, tool: str) -> dict[str, object]:
    """Write ``prompts.npz`` and its manifest entry, each atomically; returns the entry."""
    from pathlib import Path

    from photocore.atomic import atomic_write

    from ..modeldir import artifact_entry, write_manifest

    d = Path(directory)
    atomic_write(d / PROMPTS_FILE, checks.to_bytes(), mode=0o644)
    entry = artifact_entry(d, PROMPTS_FILE, kind="prompts", output={"dim": checks.dim, "checks": list(checks.names)},
                           provenance={"tool": tool, "feature_model_sha256": checks.feature_model_sha256,
                                       "text_model_sha256": checks.text_model_sha256,
                                       "enabled": [n for n, on in zip(checks.names, checks.enabled) if on]})
    write_manifest(d, {"prompts": entry})
    return entry


def write_defaults(directory: str | os.PathLike[str], *, enable: bool, logit_scale: float = DEFAULT_LOGIT_SCALE,
                   tool: str = "models.export_clip") -> dict[str, object]:
    """Encode :data:`DEFAULT_CHECKS` (and every check already in the directory) with its text tower; save them.

    Checks already there keep their prompts, thresholds and on/off but are
    re-encoded with the current towers; defaults missing are added, on only
    when ``enable`` (a random-weight CLIP gives meaningless scores: all off).
    """
    encode, text_sha, clip_sha = directory_encoder(directory)
    try:
        old = load_dir(directory)
    except Exception:  # noqa: BLE001 - an unreadable old file is replaced by the defaults, not a reason to fail export
        old = None
    specs = old.specs() if old is not None else []
    have = {s.name for s in specs}
    specs += [s if enable else CheckSpec(s.name, s.reject, s.accept, s.threshold, False)
              for s in DEFAULT_CHECKS if s.name not in have]
    checks = PromptChecks.encode(specs, encode, logit_scale=logit_scale, feature_model_sha256=clip_sha,
                                 text_model_sha256=text_sha)
    return save_dir(directory, checks, tool)
