"""The probe stage: a logistic-regression "is this a good image" score on CLIP features.

``anti-sus learn`` fits it from labelled images and writes ``probe.npz`` into the
model directory; the server loads it when the manifest lists a ``probe`` artifact
and rejects an image whose probability of being good is below the threshold
(verdict ``probe``). Scoring is one dot product per image: numpy only, no
scikit-learn at serve time.

``probe.npz`` keys (read with ``allow_pickle=False``; every value is a plain
number or unicode array):

- ``coef`` float64[D], ``intercept`` float64 (0-d): the logistic regression on
  L2-normalised features, P(good) = sigmoid(x/|x| · coef + intercept);
- ``threshold`` float64 (0-d): keep an image when P(good) >= threshold;
- ``dim`` int64 (0-d): D, the CLIP feature dimension it was fitted on;
- ``feature_model_sha256`` (0-d unicode): sha256 of the CLIP model whose
  features it was fitted on ("" when unknown);
- ``checksum`` (0-d unicode): sha256 of all the above in a fixed byte layout, so
  a file whose arrays were edited by hand (or half-written by another tool) is
  refused even when the manifest was re-hashed after it.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np

from .arrays import load_npz

KEYS = ("coef", "intercept", "threshold", "dim", "feature_model_sha256", "checksum")
MAX_DIM = 1 << 16
"""No CLIP has more features; a bigger ``dim`` is a broken or hostile file."""


class ProbeFileError(ValueError):
    """``probe.npz`` is malformed or its checksum does not match its arrays."""


def _checksum(coef: np.ndarray, intercept: float, threshold: float, feature_model_sha256: str) -> str:
    """sha256 of the probe's numbers in a fixed little-endian layout (independent of the npz container)."""
    h = hashlib.sha256(b"anti_sus.probe/1\0")
    h.update(np.int64(coef.shape[0]).astype("<i8").tobytes())
    h.update(np.ascontiguousarray(coef, dtype="<f8").tobytes())
    h.update(np.array([intercept, threshold], dtype="<f8").tobytes())
    h.update(feature_model_sha256.encode("utf-8"))
    return h.hexdigest()


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class ProbeStage:
    """A fitted probe: coefficients, intercept, threshold and the CLIP it belongs to."""

    coef: np.ndarray
    intercept: float
    threshold: float
    feature_model_sha256: str = ""

    def __post_init__(self) -> None:
        coef = np.asarray(self.coef, dtype=np.float64)
        if coef.ndim != 1 or not 1 <= coef.shape[0] <= MAX_DIM:
            raise ProbeFileError(f"probe: coef must be float[D] with 1 <= D <= {MAX_DIM}, got shape {list(coef.shape)}")
        if not (np.isfinite(coef).all() and np.isfinite(self.intercept)):
            raise ProbeFileError("probe: coef/intercept contain NaN or inf")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ProbeFileError(f"probe: threshold must be within 0..1, got {self.threshold}")
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "intercept", float(self.intercept))
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def dim(self) -> int:
        """Feature dimension D the probe was fitted on."""
        return int(self.coef.shape[0])

    @property
    def checksum(self) -> str:
        return _checksum(self.coef, self.intercept, self.threshold, self.feature_model_sha256)

    def prob(self, features: np.ndarray) -> np.ndarray:
        """P(good) per row of ``float[N, D]`` features, float64[N]."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"probe: expected features [N, {self.dim}], got {list(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        z = normalize(x) @ self.coef + self.intercept
        # sigmoid(z) = exp(-log(1 + exp(-z))): no overflow warning for large |z|.
        return np.exp(-np.logaddexp(0.0, -z))

    def with_threshold(self, threshold: float) -> "ProbeStage":
        return ProbeStage(self.coef, self.intercept, threshold, self.feature_model_sha256)

    def to_bytes(self) -> bytes:
        """The ``probe.npz`` file content (no pickled objects)."""
        buf = io.BytesIO()
        np.savez(buf, coef=self.coef, intercept=np.float64(self.intercept), threshold=np.float64(self.threshold),
                 dim=np.int64(self.dim), feature_model_sha256=np.array(self.feature_model_sha256),
                 checksum=np.array(self.checksum))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ProbeStage":
        """Read ``probe.npz``; never unpickles; raises :class:`ProbeFileError` naming what is wrong."""
        arrays = load_npz(path, KEYS, ProbeFileError, "probe file")
        for k in ("intercept", "threshold", "dim", "feature_model_sha256", "checksum"):
            if arrays[k].shape != ():
                raise ProbeFileError(f"{path}: {k} must be a single value, got shape {list(arrays[k].shape)}")
        if arrays["coef"].dtype.kind != "f" or arrays["feature_model_sha256"].dtype.kind != "U" \
                or arrays["checksum"].dtype.kind != "U":
            raise ProbeFileError(f"{path}: wrong array types (coef float, feature_model_sha256/checksum unicode)")
        probe = cls(arrays["coef"], float(arrays["intercept"]), float(arrays["threshold"]),
                    str(arrays["feature_model_sha256"][()]))
        if int(arrays["dim"]) != probe.dim:
            raise ProbeFileError(f"{path}: dim {int(arrays['dim'])} != {probe.dim} coefficients")
        if str(arrays["checksum"][()]) != probe.checksum:
            raise ProbeFileError(f"{path}: checksum does not match its arrays (edited or damaged); rerun anti-sus learn")
        return probe
