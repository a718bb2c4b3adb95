"""Bluesky for the emulator: a Jetstream websocket and the ``cdn.bsky.app`` image CDN.

``GET wss://jetstream2.us-east.bsky.network/subscribe`` upgrades to a websocket
(through the emulator's one TLS server, so ``--resolve`` pins and the
emulator's CA apply) and sends the scenario's frames like Jetstream does:

* ``wantedCollections`` (repeatable) filters commit events by collection;
  identity and account events always go out;
* ``cursor`` (``time_us``) replays only events with ``time_us`` > cursor;
* ``maxMessageSizeBytes`` leaves out larger frames;
* malformed frames (added raw) go out as they are;
* after the frames the stream stays open and quiet (live tail) until the client
  closes it or the emulator stops (at most ``linger`` seconds), or, with
  ``close_after``, the server hangs up after that many frames.

The websocket side is websockets' sans-I/O :class:`ServerProtocol` on the
handler's socket. Images are ordinary scenario files on ``cdn.bsky.app`` at
``/img/feed_fullsize/plain/{did}/{cid}@jpeg``. The public AppView
(``public.api.bsky.app``) answers ``app.bsky.actor.getProfiles`` with each
known author's profile and its ``!no-unauthenticated`` self-label when set.
"""
from __future__ import annotations

import json
import socket
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from .scenario import Scenario
    from .server import Handler

JETSTREAM_HOST = "jetstream2.us-east.bsky.network"
CDN_HOST = "cdn.bsky.app"
APPVIEW_HOST = "public.api.bsky.app"
HOSTS = [JETSTREAM_HOST, CDN_HOST, APPVIEW_HOST]
POST = "app.bsky.feed.post"
PROFILE = "app.bsky.actor.profile"
BASE_TIME_US = 1_725_000_000_000_000


@dataclass
class JetstreamFeed:
    """What the emulated Jetstream serves, and what it saw."""

    frames: list[tuple[int, str, str | None]] = field(default_factory=list)
    """(time_us, frame text, commit collection or None), in stream order."""
    expected: dict[str, str] = field(default_factory=dict)
    """Outcome labels by post id (``at://…``), like ``Scenario.expected``."""
    close_after: int | None = None
    appview_optouts: set[str] = field(default_factory=set)
    """Authors whose profile carries ``!no-unauthenticated`` (set before the stream starts)."""
    appview_gone: set[str] = field(default_factory=set)
    """Authors the AppView does not know (deleted, taken down)."""
    linger: float = 30.0
    connections: list[dict[str, list[str]]] = field(default_factory=list)
    """The query of every websocket connection (tests check the cursor nomad sent)."""
    sent: int = 0
    _clock: int = BASE_TIME_US

    def next_time(self) -> int:
        self._clock += 1_000_000  # one event a second: a 2 s rewind replays about two
        return self._clock

    def add_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append a JSON event (its ``time_us`` is set when missing)."""
        event.setdefault("time_us", self.next_time())
        commit = event.get("commit")
        collection = commit.get("collection") if isinstance(commit, dict) else None
        self.frames.append((int(event["time_us"]), json.dumps(event), collection))
        return event

    def add_raw(self, text: str) -> None:
        """Append a frame that is not a valid event (sent whatever the cursor)."""
        self.frames.append((self.next_time(), text, None))


def cid_of(name: str) -> str:
    """A well-formed base32 CIDv1 string derived from ``name`` (deterministic)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    n = zlib.crc32(name.encode()) | (zlib.adler32(name.encode()) << 32)
    body = "".join(alphabet[(n >> (5 * i)) & 31] for i in range(12))
    return "bafkreig" + body * 4


def image_entry(cid: str, aspect: tuple[int, int] | None, alt: str = "") -> dict[str, Any]:
    """One ``app.bsky.embed.images`` entry."""
    entry: dict[str, Any] = {
        "alt": alt,
        "image": {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/jpeg", "size": 345678},
    }
    if aspect is not None:
        entry["aspectRatio"] = {"width": aspect[0], "height": aspect[1]}
    return entry


def post_event(did: str, rkey: str, *, text: str = "", embed: dict[str, Any] | None = None,
               labels: list[str] | None = None, operation: str = "create") -> dict[str, Any]:
    """A Jetstream commit event for a post."""
    record: dict[str, Any] = {"$type": POST, "text": text, "createdAt": "2024-08-30T06:40:00.000Z", "langs": ["en"]}
    if embed is not None:
        record["embed"] = embed
    if labels:
        record["labels"] = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": v} for v in labels]}
    commit: dict[str, Any] = {"rev": "3l3qo2vutsw2b", "operation": operation, "collection": POST, "rkey": rkey}
    if operation != "delete":
        commit["record"] = record
        commit["cid"] = cid_of(f"{did}/{rkey}")
    return {"did": did, "kind": "commit", "commit": commit}


def profile_event(did: str, labels: list[str]) -> dict[str, Any]:
    """A profile update commit with these self-labels."""
    record: dict[str, Any] = {"$type": PROFILE, "displayName": did[-6:]}
    if labels:
        record["labels"] = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": v} for v in labels]}
    return {"did": did, "kind": "commit", "commit": {
        "rev": "3l3qo2vutsw2c", "operation": "update", "collection": PROFILE, "rkey": "self",
        "record": record, "cid": cid_of(f"{did}/profile")}}


def cdn_path(did: str, cid: str) -> str:
    return f"/img/feed_fullsize/plain/{did}/{cid}@jpeg"


def add_bluesky(s: "Scenario") -> JetstreamFeed:
    """The default Bluesky content: one frame for every path of nomad's Jetstream reader."""
    feed: JetstreamFeed = s.jetstream
    alice, bob, carol, dave = "did:plc:alice2kx7u4z5xq4a7zqk3abc", "did:plc:bobby6yq2n4m5r7t3vwx9def", \
        "did:plc:carol3jf8w2p6s4h7ynq2ghi", "did:web:dave.example.com"

    def images(did: str, name: str, size: tuple[int, int], aspect: tuple[int, int] | None = None) -> dict[str, Any]:
        cid = cid_of(name)
        s.add_image(CDN_HOST, cdn_path(did, cid), *size)
        return image_entry(cid, size if aspect is None else aspect, alt=f"photo {name}")

    def post(did: str, rkey: str, expected: str, **kw: Any) -> None:
        feed.add_event(post_event(did, rkey, **kw))
        feed.expected[f"at://{did}/{POST}/{rkey}"] = expected

    feed.add_event({"did": alice, "kind": "identity", "identity": {"did": alice, "handle": "alice.bsky.social", "seq": 1, "time": "2024-08-30T06:39:59Z"}})
    post(alice, "3l3qo2vuowo2a", "accept_candidate", text="a lake at dawn",
         embed={"$type": "app.bsky.embed.images", "images": [images(alice, "lake", (1600, 1200))]})
    post(alice, "3l3qo2vuowo2b", "skip_adult_label", text="nsfw",
         embed={"$type": "app.bsky.embed.images", "images": [images(alice, "adult", (1600, 1200))]}, labels=["porn"])
    post(bob, "3l3qo2vuowo2c", "skip_text_only", text="just words")
    feed.add_raw("{this is not json")
    post(bob, "3l3qo2vuowo2d", "accept_candidate", text="quote with a photo", embed={
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {"$type": "app.bsky.embed.record", "record": {"uri": f"at://{alice}/{POST}/3l3qo2vuowo2a", "cid": cid_of("q")}},
        "media": {"$type": "app.bsky.embed.images", "images": [images(bob, "mountain", (2000, 1500))]}})
    feed.add_event({"did": bob, "kind": "commit", "commit": {"rev": "x", "operation": "create", "collection": "app.bsky.feed.like",
                                                            "rkey": "3l3qo2vuowo2z", "record": {"$type": "app.bsky.feed.like"}}})
    # carol opts out of logged-out visibility; her later photo must not be taken.
    feed.add_event(profile_event(carol, ["!no-unauthenticated"]))
    post(carol, "3l3qo2vuowo2e", "skip_opted_out", text="private",
         embed={"$type": "app.bsky.embed.images", "images": [images(carol, "garden", (1600, 1200))]})
    feed.add_raw('["a", "list"]')
    feed.add_event({"did": dave, "kind": "account", "account": {"active": False, "did": dave, "seq": 2, "status": "deactivated", "time": "2024-08-30T06:40:05Z"}})
    # aspectRatio as a bare ratio: the size is only known after the download.
    post(dave, "3l3qo2vuowo2f", "accept_candidate", text="ratio only",
         embed={"$type": "app.bsky.embed.images", "images": [images(dave, "field", (1600, 1200), aspect=(4, 3))]})
    post(dave, "3l3qo2vuowo2g", "skip_small", text="small",
         embed={"$type": "app.bsky.embed.images", "images": [images(dave, "thumb", (800, 600))]})
    feed.add_event(post_event(dave, "3l3qo2vuowo2g", operation="delete"))
    # erin opted out long ago (no profile commit on the stream: only the AppView knows);
    # frank's account is gone by the time nomad asks.
    erin, frank = "did:plc:erin5tq3w7r2k6m4n8p2jkl", "did:plc:frank4b6c8d2f3g5h7j9mno"
    feed.appview_optouts.add(erin)
    feed.appview_gone.add(frank)
    post(erin, "3l3qo2vuowo2h", "skip_opted_out", text="old opt-out",
         embed={"$type": "app.bsky.embed.images", "images": [images(erin, "porch", (1600, 1200))]})
    post(frank, "3l3qo2vuowo2i", "skip_author_unknown", text="gone",
         embed={"$type": "app.bsky.embed.images", "images": [images(frank, "dock", (1600, 1200))]})
    return feed


def appview(handler: "Handler") -> None:
    """``GET /xrpc/app.bsky.actor.getProfiles?actors=…`` (at most 25 actors, unknown ones left out)."""
    feed: JetstreamFeed = handler.emu.scenario.jetstream
    if handler.route != "/xrpc/app.bsky.actor.getProfiles":
        return handler._json({"error": "MethodNotImplemented", "message": "Method Not Implemented"}, 501)
    actors = handler.query.get("actors", [])
    if not actors or len(actors) > 25:
        return handler._json({"error": "InvalidRequest", "message": "actors must hold 1 to 25 items"}, 400)
    profiles = []
    for did in actors:
        if did in feed.appview_gone or not did.startswith("did:"):
            continue
        labels = [{"src": did, "uri": f"at://{did}/{PROFILE}/self", "cid": cid_of(did), "val": "!no-unauthenticated",
                   "cts": "2024-01-01T00:00:00.000Z"}] if did in feed.appview_optouts else []
        profiles.append({"did": did, "handle": f"{did.rsplit(':', 1)[-1][:8]}.bsky.social", "labels": labels,
                         "followersCount": 1, "postsCount": 2})
    handler._json({"profiles": profiles})


# --- the websocket endpoint ------------------------------------------------------------------


def serve(handler: "Handler") -> None:
    """Upgrade ``handler``'s request to a Jetstream websocket and stream the scenario's frames."""
    emu = handler.emu
    feed: JetstreamFeed = emu.scenario.jetstream
    query = parse_qs(urlsplit(handler.path).query)
    protocol = ServerProtocol(max_size=1 << 16)
    # The HTTP server has parsed the request already; it is replayed into the
    # protocol so its parser moves on to websocket frames afterwards.
    head = f"GET {handler.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in handler.headers.items()) + "\r\n"
    protocol.receive_data(head.encode("latin-1"))
    request = next((e for e in protocol.events_received() if isinstance(e, Request)), None)
    if request is None:
        handler._send(400, b"bad websocket request", "text/plain")
        return
    response = protocol.accept(request)
    protocol.send_response(response)
    handler.status = response.status_code
    handler._record(response.status_code)
    handler.close_connection = True
    sock: socket.socket = handler.connection
    sock.sendall(b"".join(protocol.data_to_send()))
    if response.status_code != 101:
        return
    feed.connections.append(query)
    wanted = set(query.get("wantedCollections", []))
    try:
        cursor = int(query.get("cursor", ["0"])[0])
    except ValueError:
        cursor = 0
    try:
        max_bytes = int(query.get("maxMessageSizeBytes", ["0"])[0])
    except ValueError:
        max_bytes = 0
    sent = 0
    for time_us, text, collection in list(feed.frames):
        if time_us <= cursor or (max_bytes > 0 and len(text.encode()) > max_bytes):
            continue
        if collection is not None and wanted and collection not in wanted:
            continue
        if feed.close_after is not None and sent >= feed.close_after:
            break
        protocol.send_text(text.encode())
        sent += 1
    feed.sent += sent
    if feed.close_after is not None:
        protocol.send_close(1011, "emulated hang-up")
    try:
        sock.sendall(b"".join(protocol.data_to_send()))
        _linger(sock, protocol, emu._stopping, feed.linger if feed.close_after is None else 2.0)
    except OSError:
        return


def _linger(sock: socket.socket, protocol: ServerProtocol, stopping: Any, seconds: float) -> None:
    """Live tail: answer pings and the client's close until it leaves (bounded)."""
    sock.settimeout(0.2)
    for _ in range(int(seconds / 0.2)):
        if stopping.is_set() or protocol.state is State.CLOSED:
            return
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        if not data:
            protocol.receive_eof()
        else:
            protocol.receive_data(data)
        for _event in protocol.events_received():
            pass  # pings are answered and closes echoed by the protocol itself
        out = b"".join(protocol.data_to_send())
        if out:
            sock.sendall(out)
        if not data or protocol.close_expected():
            return


__all__ = ["JetstreamFeed", "add_bluesky", "serve", "post_event", "profile_event", "image_entry", "cid_of",
           "cdn_path", "appview", "JETSTREAM_HOST", "APPVIEW_HOST", "CDN_HOST", "HOSTS"]
