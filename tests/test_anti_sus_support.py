"""Shared helpers for the anti_sus tests (no tests here): a fake pipeline and servers on loopback.

The fake pipeline makes verdicts predictable: an image's GMM score is its mean
pixel value, its P(watermark) is the red value of its top-left pixel / 255.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

import numpy as np
import zmq

from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits

LOOPBACK = "tcp://127.0.0.1:*"


class FakeStages:
    """Deterministic stand-in for ``Pipeline``; ``poison`` pixel value makes it raise."""

    has_watermark = True

    def __init__(self, gmm_threshold: float = 100.0, watermark_threshold: float = 0.5, delay: float = 0.0,
                 poison: int | None = 13) -> None:
        self.gmm_threshold = gmm_threshold
        self.watermark_threshold = watermark_threshold
        self.delay = delay
        self.poison = poison
        self.batches: list[int] = []

    def clip_input(self, batch: np.ndarray) -> np.ndarray:
        if self.poison is not None and (batch == self.poison).all(axis=(1, 2, 3)).any():
            raise RuntimeError("poisoned image")
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)

    def embed(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        if self.delay:
            time.sleep(self.delay)
        return np.hstack([x, np.zeros((len(x), 3), np.float32)]).astype(np.float32)

    def gmm_score(self, features: np.ndarray) -> np.ndarray:
        return features[:, 0].astype(np.float64)

    def watermark_input(self, batch: np.ndarray) -> np.ndarray:
        return batch[:, 0, 0, 0].astype(np.float64) / 255.0

    def watermark_prob(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def info(self) -> dict[str, Any]:
        return {"models": {"fake": True}, "thresholds": {"gmm": self.gmm_threshold, "watermark": self.watermark_threshold},
                "watermark_stage": True}


def image(value: int, corner: int | None = None, size: int = 8) -> np.ndarray:
    """One uint8[size, size, 3] image of a flat value; ``corner`` sets the top-left red value."""
    im = np.full((size, size, 3), value, np.uint8)
    if corner is not None:
        im[0, 0, 0] = corner
    return im


@contextlib.contextmanager
def running(server: FilterServer) -> Iterator[str]:
    """Bind, serve in a thread, yield the first endpoint; stop and join (bounded) afterwards."""
    endpoints = server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoints[0]
    finally:
        server.stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "server did not stop"


def fake_server(stages: FakeStages | None = None, **cfg: Any) -> FilterServer:
    limits = cfg.pop("limits", Limits(max_images=16, max_pixels=512 * 512))
    return FilterServer(stages or FakeStages(), ServerConfig(binds=[LOOPBACK], limits=limits, **cfg))


def raw_socket(ctx: zmq.Context, endpoint: str, kind: int = zmq.DEALER) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def recv_within(sock: zmq.Socket, seconds: float = 15.0) -> list[bytes]:
    """A reply within ``seconds`` or an AssertionError (never a hang)."""
    assert sock.poll(int(seconds * 1000)), f"no reply within {seconds}s"
    return sock.recv_multipart()
