"""The numpy GMM scorer reproduces scikit-learn's score_samples for every covariance type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from anti_sus.stages.gmm import GmmScorer
from models.fit_gmm import scorer_of


def _data(seed: int = 0, n: int = 400, d: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (4, d))
    x = centres[rng.integers(0, 4, n)] + rng.normal(0, 1, (n, d)) * rng.uniform(0.3, 2, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors, like CLIP features


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_scorer_matches_sklearn(cov: str, tmp_path: Path) -> None:
    x = _data()
    gm = GaussianMixture(n_components=5, covariance_type=cov, random_state=0, reg_covar=1e-4).fit(x)
    path = tmp_path / "gmm.npz"
    scorer_of(gm).save(path)
    scorer = GmmScorer.load(path)
    assert scorer.dim == x.shape[1] and scorer.n_components == 5 and scorer.covariance_type == cov
    # Held-out points too, including far outliers (large negative log-likelihoods).
    probe = np.vstack([x[:50], _data(seed=1, n=50), np.random.default_rng(2).normal(0, 5, (10, x.shape[1]))])
    want = gm.score_samples(probe)
    got = scorer.score(probe.astype(np.float32))
    assert got.dtype == np.float64 and got.shape == (len(probe),)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_npz_has_no_objects_and_loads_without_pickle(tmp_path: Path) -> None:
    gm = GaussianMixture(n_components=2, random_state=0).fit(_data(n=100, d=4))
    path = tmp_path / "gmm.npz"
    scorer_of(gm).save(path)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["covariance_type", "means", "precisions_cholesky", "weights"]
        assert z["covariance_type"].shape == () and z["covariance_type"].dtype.kind == "U"
        assert all(z[k].dtype != object for k in z.files)


def test_scorer_rejects_wrong_dimension_and_bad_shapes(tmp_path: Path) -> None:
    gm = GaussianMixture(n_components=2, random_state=0).fit(_data(n=100, d=4))
    scorer = scorer_of(gm)
    with pytest.raises(ValueError, match=r"expected features \[N, 4\]"):
        scorer.score(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="precisions_cholesky"):
        GmmScorer(scorer.weights, scorer.means, scorer.precisions_cholesky[0], "full")
    with pytest.raises(ValueError, match="unknown covariance type"):
        GmmScorer(scorer.weights, scorer.means, scorer.precisions_cholesky, "banana")
    assert scorer.score(np.zeros((0, 4))).shape == (0,)
