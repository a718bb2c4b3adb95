"""Filtering: a batch goes to anti_sus with patience; unavailable means wait and retry, never drop it.

A batch the server finds too large is halved (it takes fewer images per
request than ``--batch-size``) and the halves' answers merged into one.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import Callable

import numpy as np

from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterClient, FilterResult

from .patience import Patience

log = logging.getLogger("nomad.delivery")

MAX_INTERNAL_RETRIES = 5
"""Waits after anti_sus "internal" errors before the batch is given up as failed."""


class FilterStage:
    """anti_sus with patience: unavailable means wait and retry, never drop the batch."""

    def __init__(
        self,
        client: FilterClient,
        *,
        sleep: Callable[[float], bool] | None = None,
        gmm_threshold: float | None = None,
        watermark_threshold: float | None = None,
        backoff_max: float = 30.0,
        on_unavailable: Callable[[], None] | None = None,
        rng: random.Random | None = None,
        features: bool | str = True,
    ) -> None:
        self.client = client
        # "all" when the review sample is on: a rejected image goes to review with its CLIP features.
        self.features = features
        self.gmm_threshold = gmm_threshold
        self.watermark_threshold = watermark_threshold
        # The crawler installs its stop-aware wait here, so a SIGTERM ends the patience.
        self.sleep: Callable[[float], bool] = sleep or (lambda s: bool(time.sleep(s)))
        self._backoff_max = backoff_max
        self._on_unavailable = on_unavailable
        self._rng = rng

    def filter(self, wires: np.ndarray) -> FilterResult:
        """Score a batch; retries on AntiSusUnavailable until it answers or a stop is requested."""
        patience = Patience(self.sleep, cap=self._backoff_max, rng=self._rng)
        while True:
            try:
                return self.client.filter(
                    wires,
                    gmm_threshold=self.gmm_threshold,
                    watermark_threshold=self.watermark_threshold,
                    return_features=self.features,
                )
            except AntiSusUnavailable as exc:
                if self._on_unavailable:
                    self._on_unavailable()
                log.warning("anti_sus unavailable (%s); keeping the batch of %d and retrying", exc, len(wires))
                patience.wait()
            except AntiSusError as exc:
                if exc.code == "too_large" and len(wires) > 1:
                    # The server takes fewer images per request than --batch-size: halve it.
                    half = len(wires) // 2
                    return merge_results(self.filter(wires[:half]), self.filter(wires[half:]), half)
                if exc.code == "internal":
                    log.warning("anti_sus internal error (%s); retrying the batch", exc)
                    patience.wait()
                    if patience.attempt > MAX_INTERNAL_RETRIES:
                        raise
                    continue
                raise


def merge_results(a: FilterResult, b: FilterResult, offset: int) -> FilterResult:
    """One FilterResult for two halves of a batch (``b``'s indexes shifted by ``offset``)."""
    features = index = None
    if a.features is not None and b.features is not None:
        features = np.concatenate([a.features, b.features])  # float32[rows of a + rows of b, D]
        rows_a = a.features_index if a.features_index is not None else a.good
        rows_b = b.features_index if b.features_index is not None else b.good
        index = list(rows_a) + [i + offset for i in rows_b]
    return FilterResult(
        a.good + [i + offset for i in b.good],
        a.results + [replace(r, index=r.index + offset) for r in b.results],  # every score kept, the probe's too
        features,
        a.elapsed_ms + b.elapsed_ms,
        index,
        a.thresholds or b.thresholds,
    )
