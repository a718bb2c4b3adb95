"""The ROUTER side of request/reply: split a received message into routing envelope and body.

Both servers (anti_sus's filter server and gallery_bridge's ingest server) and
the broker call this; replies go back as ``envelope + reply frames``.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["split_envelope"]


def split_envelope(frames: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Split a ROUTER message into (routing envelope, body).

    REQ clients (and brokers, which add their own routing ids) put an empty
    delimiter after the routing ids, so the envelope runs up to and including
    the first empty frame after the peer id. A DEALER client may omit the
    delimiter; then the envelope is the peer id alone. Frames may be ``bytes``
    or ``zmq.Frame`` (anything with ``len()``); they are returned as given.
    """
    for i in range(1, len(frames)):
        if len(frames[i]) == 0:
            return list(frames[: i + 1]), list(frames[i + 1 :])
    return list(frames[:1]), list(frames[1:])
