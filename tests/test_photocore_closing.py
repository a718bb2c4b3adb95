"""photocore.closing: ``with`` closes the owner, also when the block fails."""
from __future__ import annotations

import pytest

from gallery_bridge.server import Server
from nomad.store import Store
from photocore.client import ReqClient
from photocore.closing import Closeable


class Owner(Closeable):
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_with_returns_the_object_and_closes_it_once() -> None:
    with Owner() as o:
        assert isinstance(o, Owner) and o.closed == 0
    assert o.closed == 1


def test_a_failing_block_still_closes_and_the_error_propagates() -> None:
    o = Owner()
    with pytest.raises(RuntimeError):
        with o:
            raise RuntimeError("boom")
    assert o.closed == 1


def test_the_resource_owners_use_it() -> None:
    assert all(issubclass(cls, Closeable) for cls in (ReqClient, Server, Store))
    with ReqClient("tcp://127.0.0.1:9", timeout=1) as client:
        client._socket()
    assert client._sock is None  # closed on leaving the block
