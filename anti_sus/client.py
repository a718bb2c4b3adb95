"""Python client of the anti_sus filter server (wire protocol v1).

    from anti_sus.client import FilterClient
    with FilterClient("tcp://127.0.0.1:7777", timeout=30) as client:
        result = client.filter(batch)        # uint8[N, H, W, 3]
        keep = batch[result.good]

Reliability is photocore's Lazy Pirate client (:class:`photocore.client.ReqClient`):
on timeout the socket is rebuilt and the request sent again, at most
``retries`` times; then :class:`AntiSusUnavailable`. A server that answers
with an error raises :class:`AntiSusError` (with its ``code``) without retrying,
except ``busy`` (its queue is full): that request is sent again after a short,
growing, jittered pause (:mod:`photocore.backoff`) for up to ``busy_wait``
seconds, then :class:`AntiSusBusy` (an ``AntiSusUnavailable``, so callers that
wait for an unavailable server wait for a busy one too).

This module is anti_sus's public client API; nomad and ``stack`` import it here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from photocore.client import Busy, ReqClient, ServerError, Unavailable
from photocore.curve import client_keys


class AntiSusError(ServerError):
    """The server answered with an error reply; ``code`` is one of the protocol's codes."""


class AntiSusUnavailable(Unavailable):
    """No answer from the server after every retry."""


class AntiSusBusy(AntiSusUnavailable, Busy):
    """The server kept answering ``busy`` (its queue is full) for longer than ``busy_wait``."""

    code = "busy"


@dataclass(frozen=True)
class ImageResult:
    """One image's scores: GMM log-likelihood, P(watermark) (None if not run), the verdict, and P(good) from the
    learnt probe (None when the server has none, or predates it)."""

    index: int
    gmm: float
    watermark: float | None
    verdict: str
    probe: float | None = None
    prompts: dict[str, float] | None = None
    """P(reject) per prompt check (``prompt:<check>`` verdicts); None when the server has no prompt checks."""
    rejected_by: str | None = None
    """The stage that rejected the image (``gmm``, ``probe``, ``prompts``, ``watermark``); None when good or an old server."""


@dataclass(frozen=True)
class FilterResult:
    """A filter reply: ``good`` indexes in request order, per-image results, optional features.

    ``features`` has one row per index of ``features_index``: the good images with
    ``return_features=True``, every image with ``return_features="all"`` (unless the
    server predates it: then the good ones only). ``thresholds`` are the ones the
    request was judged by (``{"gmm": …, "watermark": …}``, with prompt checks ``"prompts": {check: threshold
    or None where off}``; None from older servers).
    """

    good: list[int]
    results: list[ImageResult]
    features: np.ndarray | None
    elapsed_ms: float
    features_index: list[int] | None = None
    thresholds: dict[str, Any] | None = None

    def feature_of(self, index: int) -> np.ndarray | None:
        """The features of image ``index`` (request order), or None when the reply has none for it."""
        if self.features is None:
            return None
        rows = self.features_index if self.features_index is not None else self.good
        try:
            return self.features[rows.index(index)]
        except ValueError:
            return None


class FilterClient(ReqClient):
    """A connection to one anti_sus server (or broker frontend).

    ``curve_server_key`` (Z85 bytes or a ``.key`` file) makes it a CURVE client;
    ``curve_client_keys`` is (public, secret) or a ``.key_secret`` file (a
    throwaway pair without it). ``busy_wait`` defaults to ``timeout``.
    """

    server_error = AntiSusError
    unavailable = AntiSusUnavailable
    busy = AntiSusBusy

    def __init__(self, endpoint: str, *, timeout: float = 60.0, retries: int = 3,
                 curve_server_key: bytes | str | Path | None = None,
                 curve_client_keys: tuple[bytes, bytes] | str | Path | None = None,
                 context: zmq.Context | None = None, busy_wait: float | None = None) -> None:
        if not timeout > 0 or (busy_wait is not None and busy_wait < 0):
            raise ValueError("timeout must be > 0, retries >= 0 and busy_wait >= 0")
        curve = client_keys(curve_server_key, curve_client_keys) if curve_server_key is not None else None
        super().__init__(endpoint, timeout=timeout, retries=retries, curve=curve, context=context,
                         busy_wait=timeout if busy_wait is None else busy_wait)
        self.all_features_supported: bool | None = None
        """False once the server refused ``return_features="all"`` (it predates it); None until asked."""

    # -- public API ------------------------------------------------------------
    def filter(self, images: np.ndarray, *, gmm_threshold: float | None = None,
               watermark_threshold: float | None = None, return_features: bool | str = False,
               probe_threshold: float | None = None,
               prompt_thresholds: dict[str, float | None] | None = None) -> FilterResult:
        """Filter ``uint8[N, H, W, 3]`` RGB images; thresholds override the server's for this request.

        ``return_features``: False, True (the good images' features) or ``"all"``
        (every image's, rejected ones included). A server that predates ``"all"``
        answers the good images' features instead (see ``FilterResult.features_index``).
        """
        if return_features not in (False, True, "all"):
            raise ValueError(f"return_features must be False, True or 'all', got {return_features!r}")
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
            raise ValueError(f"images must be uint8[N>=1, H, W, 3], got {arr.dtype}{list(arr.shape)}")
        arr = np.ascontiguousarray(arr)
        want_all = return_features == "all" and self.all_features_supported is not False
        options: dict[str, Any] = {"return_features": "all" if want_all else bool(return_features)}
        if gmm_threshold is not None:
            options["gmm_threshold"] = float(gmm_threshold)
        if watermark_threshold is not None:
            options["watermark_threshold"] = float(watermark_threshold)
        if probe_threshold is not None:  # only when asked: a server older than the probe stage refuses the option
            options["probe_threshold"] = float(probe_threshold)
        if prompt_thresholds:  # {check: P(reject) threshold, or None to turn it off}; only when asked, as above
            options["prompt_thresholds"] = {str(k): None if v is None else float(v) for k, v in prompt_thresholds.items()}
        header = {"op": "filter", "shape": list(arr.shape), "dtype": "uint8", "options": options}
        try:
            reply, extra = self.call(header, [arr.data])
        except AntiSusError as exc:
            if not (want_all and exc.code == "bad_header" and "return_features" in str(exc)):
                raise
            # An older server knows only true/false: ask again for the good images' features, and remember.
            self.all_features_supported = False
            options["return_features"] = True
            reply, extra = self.call(header, [arr.data])
        if want_all and reply.get("features_of") == "all":
            self.all_features_supported = True
        # gmm is null when the server's stage list leaves the GMM out: NaN here, so old callers' floats stay floats.
        results = [ImageResult(int(r["index"]), float("nan") if r.get("gmm") is None else float(r["gmm"]), None if r.get("watermark") is None else float(r["watermark"]),
                               str(r["verdict"]), None if r.get("probe") is None else float(r["probe"]),
                               None if r.get("prompts") is None else {str(k): float(v) for k, v in r["prompts"].items()},
                               None if r.get("rejected_by") is None else str(r["rejected_by"]))
                   for r in reply["results"]]
        good = [int(i) for i in reply["good"]]
        features = index = None
        if return_features:
            if not extra:
                raise AntiSusError("internal", "reply has no features frame")
            every = reply.get("features_of") == "all"
            index = list(range(len(arr))) if every else good
            shape = reply.get("features_shape") or [len(index), -1]
            features = np.frombuffer(extra[0], dtype="<f4").reshape(shape)
            if len(features) != len(index):
                raise AntiSusError("internal", f"reply has {len(features)} feature rows for {len(index)} images")
        thresholds = reply.get("thresholds")
        if isinstance(thresholds, dict):
            checks = thresholds.get("prompts")
            thresholds = {k: float(v) for k, v in thresholds.items() if isinstance(v, (int, float))}
            if isinstance(checks, dict):  # per prompt check: its threshold, None where it was off
                thresholds["prompts"] = {str(k): None if v is None else float(v) for k, v in checks.items()
                                         if v is None or isinstance(v, (int, float))}
        else:
            thresholds = None
        return FilterResult(good, results, features, float(reply.get("elapsed_ms", 0.0)), index, thresholds)

    def info(self) -> dict[str, Any]:
        """The server's models (with sha256), thresholds, limits and version."""
        return self.call({"op": "info"})[0]

    def reload(self) -> dict[str, Any]:
        """Ask the server (or broker) to load its model directory again and swap to it (an admin op).

        Returns the reply: ``generation`` and ``manifest_sha256`` (a broker adds
        ``workers``, one entry per worker it reloaded). A bad directory raises
        :class:`AntiSusError` with code ``reload_failed`` (the old models keep serving);
        a CURVE key not on the server's admin list raises it with code ``forbidden``.
        """
        return self.call({"op": "reload"})[0]

    def ping(self) -> float:
        """Round-trip time in milliseconds."""
        t0 = time.perf_counter()
        self.call({"op": "ping"})
        return (time.perf_counter() - t0) * 1000.0
