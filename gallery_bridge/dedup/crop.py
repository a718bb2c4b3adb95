"""Crop maths: is one 96x96 grey signature a border crop of the other?

The 576-bit pHash moves ~40 bits per 1 % of border cut off (measured 35-65), so
a 2-3 % crop is out of its reach. This module verifies a candidate pair
explicitly: a 24x24 correlation gate (:func:`coarse_correlation`) drops
unrelated ones cheaply; :func:`crop_correlation` aligns the two signatures over
a grid of border crops (of either image, up to ``max_crop`` per axis) and
returns the best normalised correlation of their band-pass (edge) images.
Different photos of one scene (another viewpoint, a subject that moved) do not
line up under any border crop, so they stay apart.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import numpy as np

from .fingerprint import SIG_SIDE

_VERIFY_SIDE = 48


def _crop_pairs(max_crop: float, step: float) -> list[tuple[float, float]]:
    """(cut at start, cut at end) fractions of one axis whose sum is at most max_crop."""
    n = int(round(max_crop / step))
    return [(a * step, b * step) for a in range(n + 1) for b in range(n + 1 - a)]


def _resample_matrix(n_in: int, n_out: int, start: float, end: float) -> np.ndarray:
    """Linear (triangle-filter) resampling of the window [start, end) of n_in samples to n_out.

    The same filter Pillow's BILINEAR resize uses, as a matrix, so that hundreds of
    crop windows can be resampled by a few batched matrix products.
    """
    scale = (end - start) / n_out
    support = max(scale, 1.0)
    centres = start + (np.arange(n_out) + 0.5) * scale
    pos = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centres[:, None]) / support, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row zero-mean and unit-norm, so that a dot product is a correlation."""
    x = x - x.mean(axis=-1, keepdims=True)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-6)


def _blur_matrix(n: int) -> np.ndarray:
    """[1, 2, 1]/4 blur along one axis as an n x n matrix (edges replicated)."""
    b = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        for j, w in ((i - 1, 0.25), (i, 0.5), (i + 1, 0.25)):
            b[i, min(max(j, 0), n - 1)] += w
    return b


_MATRIX_CACHE: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}


def _windows(pairs: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per crop pair, the resampling matrix with the band-pass folded in: two terms.

    The band-pass is a difference of Gaussians, ``G1 - G3`` with ``G1`` the
    [1, 2, 1] blur and ``G3`` that blur applied three times. Both are
    separable, so a band-passed window of ``S`` is ``(B R) S (B R)^T -
    (B^3 R) S (B^3 R)^T`` for the window's resampling matrix ``R``: everything
    becomes batched matrix products, no per-window filtering.

    Raw correlation is dominated by smooth shading (sky, gradients), which two
    photos of one scene share even from another viewpoint; the band-pass
    image is what moves under parallax or a moved subject, and what a copy
    keeps. Measured on the test cases: copies >= 0.986, other photos <= 0.88.
    """
    key = (pairs[-1][0], len(pairs))
    if key not in _MATRIX_CACHE:
        side = float(SIG_SIDE)
        r = np.stack([_resample_matrix(SIG_SIDE, _VERIFY_SIDE, a * side, side - b * side) for a, b in pairs])
        blur = _blur_matrix(_VERIFY_SIDE)
        blur3 = blur @ blur @ blur
        _MATRIX_CACHE[key] = (blur @ r, blur3 @ r)
    return _MATRIX_CACHE[key]


def _band_passed(m1: np.ndarray, m3: np.ndarray, img: np.ndarray) -> np.ndarray:
    """All crop windows of ``img``, band-passed, materialised: (P*P, V*V).

    The direct computation; :func:`_window_correlations` gets the same
    correlations without building the windows (tests compare the two).
    """
    p, v, side = m1.shape
    out = np.zeros((p * v, p * v), dtype=np.float32)
    for m, sign in ((m1, 1.0), (m3, -1.0)):
        flat = m.reshape(p * v, side)
        out += sign * ((flat @ img) @ flat.T)
    return out.reshape(p, v, p, v).transpose(0, 2, 1, 3).reshape(p * p, v * v)


def _window_correlations(m1: np.ndarray, m3: np.ndarray, big: np.ndarray, small_unit: np.ndarray) -> np.ndarray:
    """Correlation of every band-passed crop window of ``big`` with ``small_unit`` (P x P).

    A window is ``W_ab = A - B`` with ``A = m1[a] S m1[b]^T`` and
    ``B = m3[a] S m3[b]^T``. Its dot product with the (zero-mean, unit) query,
    its sum and its sum of squares are all bilinear in per-row and per-column
    factors, so each is one small matrix product over the P crop pairs:

    * dot:   <m[a] S, Q m[b]>
    * sum:   (m[a]^T 1)^T S (m[b]^T 1)
    * sumsq: <L_a^T L'_a, m[b]^T m'[b]> with L_a = m[a] S, for (m, m') in
      (m1, m1), (m1, m3), (m3, m3)

    About 5x fewer operations than building the P*P windows.
    """
    p, v, side = m1.shape
    q = small_unit.reshape(v, v)
    l1, l3 = m1 @ big, m3 @ big  # (P, V, S)
    dot = (l1.reshape(p, -1) @ (q @ m1).reshape(p, -1).T) - (l3.reshape(p, -1) @ (q @ m3).reshape(p, -1).T)
    u1, u3 = m1.sum(axis=1), m3.sum(axis=1)  # (P, S): m^T 1
    total = u1 @ big @ u1.T - u3 @ big @ u3.T

    def gram(la: np.ndarray, lb: np.ndarray, ma: np.ndarray, mb: np.ndarray) -> np.ndarray:
        g = (la.transpose(0, 2, 1) @ lb).reshape(p, -1)  # (P, S*S)
        h = (ma.transpose(0, 2, 1) @ mb).reshape(p, -1)
        return g @ h.T

    sumsq = gram(l1, l1, m1, m1) - 2.0 * gram(l1, l3, m1, m3) + gram(l3, l3, m3, m3)
    var = np.maximum(sumsq - total * total / (v * v), 1e-6)
    return dot / np.sqrt(var)


_BLAS: object | None = None


def _one_blas_thread() -> ContextManager[object]:
    """Run BLAS single-threaded for the verification's small products.

    The matrices are at most 96 x 720: threads only add synchronisation, and on a
    small box shared with anti_sus, OpenBLAS's spinning threads made one
    verification 50x slower (measured: 13 ms -> 1.2 s under load).
    threadpoolctl comes with scikit-learn; without it this is a no-op.
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:  # pragma: no cover
            _BLAS = False
    if _BLAS is False:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")  # type: ignore[union-attr]


def crop_correlation(query_sig: bytes, stored_sig: bytes, *, max_crop: float = 0.04, step: float = 0.01, mirror: bool = False) -> float:
    """Best correlation of two signatures over border crops of either one.

    One of the two images may be the other with up to ``max_crop`` of each axis
    cut away (split between both borders in ``step`` increments). For each
    hypothesis the larger image's matching window is resampled to the full
    frame and compared with the other image by normalised correlation of their
    band-pass images; the best value over all hypotheses (and both
    directions) is returned.
    """
    q = np.frombuffer(query_sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
    s = np.frombuffer(stored_sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
    if mirror:
        q = np.ascontiguousarray(q[:, ::-1])
    pairs = _crop_pairs(max_crop, step)
    m1, m3 = _windows(pairs)  # pairs[0] is (0, 0): the whole frame
    best = -1.0
    with _one_blas_thread():
        for big, small in ((s, q), (q, s)):
            whole = m1[0] @ small @ m1[0].T - m3[0] @ small @ m3[0].T
            small_unit = _unit_rows(whole.reshape(1, -1))[0]
            best = max(best, float(np.max(_window_correlations(m1, m3, big, small_unit))))
    return best


def coarse_correlation(query_sig: bytes, stored_sig: bytes, mirror: bool = False) -> float:
    """Correlation of 24x24 block means: a cheap gate before :func:`crop_correlation`.

    Copies cropped by up to 4% per axis still score >= 0.74 here, while most
    unrelated pairs score far lower, so most random candidates stop here.
    """
    vecs = []
    for sig, flip in ((query_sig, mirror), (stored_sig, False)):
        a = np.frombuffer(sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
        if flip:
            a = a[:, ::-1]
        vecs.append(a.reshape(24, 4, 24, 4).mean(axis=(1, 3)).reshape(1, -1))
    return float(_unit_rows(vecs[0])[0] @ _unit_rows(vecs[1])[0])
