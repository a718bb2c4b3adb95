"""Numpy-only Gaussian-mixture scorer for the ``gmm.npz`` that ``models.fit_gmm`` writes.

The score is the per-sample log-likelihood, exactly what scikit-learn's
``GaussianMixture.score_samples`` returns (higher = more typical of the training
images). The server keeps an image when its score is >= the threshold from
``gmm.json``. scikit-learn is not needed at serve time.

``gmm.npz`` keys (loaded with ``allow_pickle=False``): ``weights`` [K],
``means`` [K, D], ``precisions_cholesky`` (shape by covariance type: full
[K, D, D], tied [D, D], diag [K, D], spherical [K]) and ``covariance_type`` (a
0-d unicode array).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class GmmScorer:
    """A fitted mixture's parameters and its log-likelihood function."""

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str

    def __post_init__(self) -> None:
        k, d = self.means.shape if self.means.ndim == 2 else (-1, -1)
        if k < 1 or self.weights.shape != (k,):
            raise ValueError(f"gmm: weights {self.weights.shape} and means {self.means.shape} do not match")
        expected = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}.get(self.covariance_type)
        if expected is None:
            raise ValueError(f"gmm: unknown covariance type {self.covariance_type!r}; expected one of {COVARIANCE_TYPES}")
        if self.precisions_cholesky.shape != expected:
            raise ValueError(
                f"gmm: precisions_cholesky has shape {self.precisions_cholesky.shape}, "
                f"expected {expected} for covariance type {self.covariance_type}"
            )
        # Constant per component: log mixing weight + log det of the precision Cholesky factor.
        pc = self.precisions_cholesky
        if self.covariance_type == "full":
            log_det = np.log(np.diagonal(pc, axis1=1, axis2=2)).sum(axis=1)
        elif self.covariance_type == "tied":
            log_det = np.full(k, np.log(np.diag(pc)).sum())
        elif self.covariance_type == "diag":
            log_det = np.log(pc).sum(axis=1)
        else:
            log_det = d * np.log(pc)
        with np.errstate(divide="ignore"):
            const = np.log(self.weights) + log_det - 0.5 * d * _LOG_2PI
        object.__setattr__(self, "_const", const)

    @classmethod
    def load(cls, npz_path: str | os.PathLike[str]) -> "GmmScorer":
        """Read ``gmm.npz``; never unpickles (``allow_pickle=False``)."""
        with np.load(npz_path, allow_pickle=False) as z:
            missing = {"weights", "means", "precisions_cholesky", "covariance_type"} - set(z.files)
            if missing:
                raise ValueError(f"{npz_path}: missing keys {sorted(missing)}")
            return cls(
                weights=np.asarray(z["weights"], dtype=np.float64),
                means=np.asarray(z["means"], dtype=np.float64),
                precisions_cholesky=np.asarray(z["precisions_cholesky"], dtype=np.float64),
                covariance_type=str(z["covariance_type"][()]),
            )

    def save(self, npz_path: str | os.PathLike[str]) -> None:
        """Write the parameters in the ``gmm.npz`` layout (no pickled objects)."""
        np.savez(
            npz_path,
            weights=self.weights,
            means=self.means,
            precisions_cholesky=self.precisions_cholesky,
            covariance_type=np.array(self.covariance_type),
        )

    @property
    def dim(self) -> int:
        """Feature dimension D the mixture was fitted on."""
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    def _mahalanobis(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of every row to every component: [N, K]."""
        mu, pc = self.means, self.precisions_cholesky
        if self.covariance_type == "full":
            out = np.empty((x.shape[0], mu.shape[0]))
            for k in range(mu.shape[0]):
                y = x @ pc[k] - mu[k] @ pc[k]
                out[:, k] = np.einsum("ij,ij->i", y, y)
            return out
        if self.covariance_type == "tied":
            y = x @ pc
            m = mu @ pc
            return (y * y).sum(1)[:, None] - 2.0 * y @ m.T + (m * m).sum(1)[None, :]
        if self.covariance_type == "diag":
            p = pc * pc
            return (x * x) @ p.T - 2.0 * x @ (mu * p).T + (mu * mu * p).sum(1)[None, :]
        p = pc * pc  # spherical
        sq = (x * x).sum(1)[:, None] - 2.0 * x @ mu.T + (mu * mu).sum(1)[None, :]
        return sq * p[None, :]

    def score(self, features: np.ndarray) -> np.ndarray:
        """Per-row log-likelihood, float64 [N] (sklearn's ``score_samples``)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"gmm: expected features [N, {self.dim}], got {list(x.shape)}")
        if x.shape[0] == 0:
            return np.empty(0)
        log_prob = -0.5 * self._mahalanobis(x) + self._const[None, :]  # type: ignore[attr-defined]
        top = log_prob.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(log_prob - top).sum(axis=1, keepdims=True)))[:, 0]
