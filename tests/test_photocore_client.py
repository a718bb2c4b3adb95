"""photocore.client: the one Lazy Pirate client, against real ROUTER servers on 127.0.0.1."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq

from anti_sus.client import AntiSusBusy, AntiSusError, AntiSusUnavailable, FilterClient
from gallery_bridge.client import GalleryUnavailable, IngestClient, IngestError
from photocore.client import Busy, ReqClient, ServerError, Unavailable
from photocore.curve import client_keys, secure_server
from photocore.envelope import split_envelope
from photocore.protocol import error_reply, ok_reply, parse_header, request_id

from .test_photocore_curve import allow_listed_keys

pytestmark = pytest.mark.timeout(120)

Answer = Callable[[int, dict], "bytes | None"]
"""(number of the request, its header) -> reply frame, or None to drop the request unanswered."""


@contextlib.contextmanager
def router(answer: Answer, *, curve: tuple[Path, Path | None] | None = None) -> Iterator[tuple[str, list[dict]]]:
    """A ROUTER on 127.0.0.1 answering with ``answer``; yields (endpoint, headers received)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    auth = secure_server(ctx, [sock], curve[0], curve[1]) if curve else None
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    seen: list[dict] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if not sock.poll(50, zmq.POLLIN):
                continue
            envelope, body = split_envelope(sock.recv_multipart())
            header = parse_header(body[0])
            seen.append(header)
            reply = answer(len(seen), header)
            if reply is not None:
                sock.send_multipart([*envelope, reply])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", seen
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()


def pong(_n: int, header: dict) -> bytes:
    return ok_reply(request_id(header), pong=True)


def test_a_dropped_request_is_resent_on_a_new_socket() -> None:
    with router(lambda n, h: None if n == 1 else pong(n, h)) as (endpoint, seen):
        with ReqClient(endpoint, timeout=0.3, retries=2) as client:
            reply, extra = client.call({"op": "ping"})
    assert reply["ok"] and reply["pong"] and extra == []
    assert len(seen) == 2  # the first try was dropped, the second answered
    assert seen[0]["id"] == seen[1]["id"] and seen[0]["v"] == 1  # the same request, sent again


def test_gives_up_after_retries_plus_one_tries() -> None:
    with router(lambda n, h: None) as (endpoint, seen):
        with ReqClient(endpoint, timeout=0.2, retries=2) as client:
            with pytest.raises(Unavailable, match="3 attempt"):
                client.call({"op": "ping"})
    assert len(seen) == 3


def test_error_reply_is_raised_without_retrying() -> None:
    with router(lambda n, h: error_reply("bad_header", "nope", request_id(h))) as (endpoint, seen):
        with ReqClient(endpoint, timeout=5, retries=3) as client:
            with pytest.raises(ServerError) as ei:
                client.call({"op": "ping"})
    assert ei.value.code == "bad_header" and ei.value.message == "nope"
    assert len(seen) == 1


def test_busy_is_waited_out_with_growing_jittered_pauses() -> None:
    pauses: list[float] = []
    with router(lambda n, h: error_reply("busy", "full", request_id(h)) if n <= 4 else pong(n, h)) as (endpoint, seen):
        with ReqClient(endpoint, timeout=5, retries=0, busy_wait=60, sleep=pauses.append) as client:
            assert client.call({"op": "ping"})[0]["pong"]
    assert len(seen) == 5 and len(pauses) == 4  # busy does not use up the (zero) retries
    first, longest = ReqClient.BUSY_PAUSE
    assert all(0 <= p <= longest for p in pauses)
    assert pauses[0] <= first


def test_busy_for_longer_than_busy_wait_raises_busy() -> None:
    with router(lambda n, h: error_reply("busy", "full", request_id(h))) as (endpoint, seen):
        with ReqClient(endpoint, timeout=5, retries=0, busy_wait=0.3) as client:
            with pytest.raises(Busy, match="busy for 0.3s"):
                client.call({"op": "ping"})
    assert len(seen) >= 2


def test_without_busy_wait_busy_is_an_error() -> None:
    with router(lambda n, h: error_reply("busy", "full", request_id(h))) as (endpoint, _):
        with ReqClient(endpoint, timeout=5, retries=0) as client:
            with pytest.raises(ServerError) as ei:
                client.call({"op": "ping"})
    assert ei.value.code == "busy" and not isinstance(ei.value, Unavailable)


def test_malformed_reply_is_an_internal_error() -> None:
    with router(lambda n, h: b"\xff not json") as (endpoint, _):
        with ReqClient(endpoint, timeout=5, retries=0) as client:
            with pytest.raises(ServerError, match="internal: malformed reply"):
                client.call({"op": "ping"})


def test_service_clients_raise_their_own_classes() -> None:
    with router(lambda n, h: error_reply("busy", "full", request_id(h))) as (endpoint, _):
        with FilterClient(endpoint, timeout=5, retries=0, busy_wait=0.2) as anti:
            with pytest.raises(AntiSusBusy) as ei:
                anti.ping()
            assert isinstance(ei.value, AntiSusUnavailable) and isinstance(ei.value, Busy)
    with router(lambda n, h: error_reply("too_large", "big", request_id(h))) as (endpoint, _):
        with FilterClient(endpoint, timeout=5, retries=0) as anti:
            with pytest.raises(AntiSusError):
                anti.info()
        with IngestClient(endpoint, timeout=5, retries=0) as gallery:
            with pytest.raises(IngestError) as gi:
                gallery.ping()
            assert gi.value.code == "too_large" and not gi.value.retryable
    with router(lambda n, h: None) as (endpoint, _):
        with IngestClient(endpoint, timeout=0.2, retries=0) as gallery:
            with pytest.raises(GalleryUnavailable):
                gallery.ping()


def test_both_service_clients_speak_curve_to_an_allow_listed_server(tmp_path: Path) -> None:
    """The same CURVE client code for anti_sus and gallery_bridge: listed key served, unlisted key never answered."""
    k = allow_listed_keys(tmp_path)
    server_pub, server_sec, listed_sec, stranger_sec, allow = (k["server"], k["server_secret"], k["client_secret"],
                                                               k["stranger_secret"], k["allow"])
    with router(pong, curve=(server_sec, allow)) as (endpoint, seen):
        with IngestClient(endpoint, timeout=20, retries=0, curve=client_keys(server_pub, listed_sec)) as gallery:
            assert gallery.ping()["pong"]
        with FilterClient(endpoint, timeout=20, retries=0, curve_server_key=server_pub, curve_client_keys=listed_sec) as anti:
            assert anti.ping() >= 0
        with IngestClient(endpoint, timeout=0.5, retries=1, curve=client_keys(server_pub, stranger_sec)) as gallery:
            with pytest.raises(GalleryUnavailable):
                gallery.ping()
        with ReqClient(endpoint, timeout=0.5, retries=0) as plain:
            with pytest.raises(Unavailable):
                plain.call({"op": "ping"})
    assert len(seen) == 2  # only the two listed requests reached the server


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        ReqClient("tcp://127.0.0.1:9", timeout=0)
    with pytest.raises(ValueError):
        ReqClient("tcp://127.0.0.1:9", retries=-1)
    with pytest.raises(ValueError):
        ReqClient("tcp://127.0.0.1:9", busy_wait=-1)
