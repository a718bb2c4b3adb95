"""nomad.http: the SSRF guard, pinning, TLS, caps, deadlines, retries and per-host limits.

Everything runs on loopback: the emulator (real host names over HTTPS, reached via
--resolve pins) and small plain-HTTP servers for the byte-level cases.
"""
from __future__ import annotations

import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest
import urllib3.util.connection

from nomad.http import (
    BlockedAddress,
    FetchError,
    HttpClient,
    HttpConfig,
    HttpStatusError,
    blocked_reason,
    parse_resolve,
    parse_retry_after,
    reject_removed_placeholder,
    sniff_format,
)
from stack.emulator import Emulator, Resource
from tests.concurrency import at_once

pytestmark = pytest.mark.timeout(60)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        e.scenario.add_image("rebind.hostile.example", "ok.jpg", 64, 48)
        e.scenario.add_file("hostile.example", "loop-a", Resource("redirect", location=e.url("hostile.example", "loop-b"), status=302))
        e.scenario.add_file("hostile.example", "loop-b", Resource("redirect", location=e.url("hostile.example", "loop-a"), status=302))
        e.scenario.add_file("i.imgur.com", "/away.jpg", Resource("redirect", location=e.url("cdn.photohost.example", "photos/2024/lake.jpg"), status=302))
        e.scenario.add_file("hostile.example", "ftp.jpg", Resource("redirect", location="ftp://cdn.photohost.example/x.jpg", status=302))
        yield e


def client_for(emu: Emulator, **kw: Any) -> HttpClient:
    cfg = HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, backoff=0.01, backoff_max=0.05, **kw)
    return HttpClient(cfg)


@pytest.fixture()
def client(emu: Emulator) -> Iterator[HttpClient]:
    c = client_for(emu, retries=0)
    yield c
    c.close()


class _Plain(ThreadingHTTPServer):
    daemon_threads = True


def plain_server(handler: Callable[[BaseHTTPRequestHandler], None]) -> tuple[_Plain, int]:
    """A plain-HTTP loopback server whose GET handler is ``handler(request)``."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            try:
                handler(self)
            except OSError:
                pass

    srv = _Plain(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, srv.server_address[1]


@pytest.fixture()
def record_connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address urllib3 opens a socket to (the real connect still happens)."""
    seen: list[tuple[str, int]] = []
    real = urllib3.util.connection.create_connection

    def spy(address: tuple[str, int], *a: Any, **kw: Any) -> socket.socket:
        seen.append((address[0], address[1]))
        return real(address, *a, **kw)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    return seen


# -- the address policy --------------------------------------------------------------------

BLOCKED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "10.0.0.1": "private", "172.16.5.4": "private",
    "192.168.1.1": "private", "169.254.169.254": "link-local", "224.0.0.251": "multicast",
    "240.0.0.1": "reserved", "0.0.0.0": "unspecified", "255.255.255.255": "broadcast",
    "100.64.0.1": "carrier NAT", "::1": "loopback", "::": "unspecified", "fe80::1": "link-local",
    "fc00::1": "unique local", "ff02::1": "multicast", "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:169.254.169.254": "IPv4-mapped metadata", "2002:a00:1::": "6to4 of 10.0.0.1",
    "64:ff9b::a9fe:a9fe": "NAT64 of 169.254.169.254", "::127.0.0.1": "IPv4-compatible loopback",
    "2001:0:4136:e378:8000:63bf:f5ff:fffe": "Teredo of 10.0.0.1",
}


@pytest.mark.parametrize("address", sorted(BLOCKED))
def test_guard_blocks_every_internal_class(address: str) -> None:
    assert blocked_reason(address), f"{address} ({BLOCKED[address]}) must be refused"


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "151.101.1.140", "2606:4700::1111", "2a04:4e42::396"])
def test_guard_allows_public_addresses(address: str) -> None:
    assert blocked_reason(address) is None


@pytest.mark.parametrize("address", sorted(BLOCKED))
def test_literal_internal_url_is_never_contacted(address: str, record_connects: list) -> None:
    host = f"[{address}]" if ":" in address else address
    c = HttpClient(HttpConfig(retries=0), resolver=lambda h, p: pytest.fail("a literal address needs no lookup"))
    with pytest.raises(BlockedAddress) as ei:
        c.get(f"http://{host}:8080/latest/meta-data/")
    assert ei.value.reason == "blocked_address"
    assert record_connects == []


def test_name_resolving_to_private_is_blocked(record_connects: list) -> None:
    c = HttpClient(HttpConfig(retries=0), resolver=lambda h, p: ["10.1.2.3"])
    with pytest.raises(BlockedAddress, match="10.1.2.3"):
        c.get("https://intranet.example.com/x.jpg")
    # A name answering with a public *and* a private address is refused too.
    c2 = HttpClient(HttpConfig(retries=0), resolver=lambda h, p: ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(BlockedAddress):
        c2.get("https://mixed.example.com/x.jpg")
    assert record_connects == []


def test_dns_rebinding_connects_to_the_checked_address(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver answers public first, loopback after: the socket goes to the public answer."""
    answers = [["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]]
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers[min(len(lookups) - 1, len(answers) - 1)]

    connected: list[tuple[str, int]] = []
    real = urllib3.util.connection.create_connection

    def route(address: tuple[str, int], *a: Any, **kw: Any) -> socket.socket:
        connected.append(address)
        # Stand-in for the internet: the "public" address is served by the emulator.
        assert address[0] == "93.184.216.34", f"connected to {address}, not the checked address"
        return real(("127.0.0.1", address[1]), *a, **kw)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", route)
    c = HttpClient(HttpConfig(ca_bundle=emu.ca_bundle, retries=0), resolver=rebinding)
    dl = c.download_image(emu.url("rebind.hostile.example", "ok.jpg"))
    assert dl.format == "jpeg"
    assert lookups == ["rebind.hostile.example"], "exactly one lookup per request: no second chance to rebind"
    assert connected == [("93.184.216.34", emu.port)]
    # The next request resolves afresh, gets loopback, and is refused before connecting.
    c.close()
    c = HttpClient(HttpConfig(ca_bundle=emu.ca_bundle, retries=0), resolver=rebinding)
    with pytest.raises(BlockedAddress):
        c.get(emu.url("rebind.hostile.example", "ok.jpg"))
    assert connected == [("93.184.216.34", emu.port)]


def test_redirect_to_private_address_is_blocked(client: HttpClient, emu: Emulator, record_connects: list) -> None:
    for path in ("metadata.jpg", "intranet.jpg"):
        with pytest.raises(BlockedAddress) as ei:
            client.download_image(emu.url("hostile.example", path))
        assert ei.value.address in ("169.254.169.254", "10.0.0.1")
    assert {a for a, _ in record_connects} <= {"127.0.0.1"}, "the private hop must never be contacted"


def test_redirect_to_other_scheme_is_refused(client: HttpClient, emu: Emulator) -> None:
    with pytest.raises(FetchError) as ei:
        client.get(emu.url("hostile.example", "ftp.jpg"))
    assert ei.value.reason == "bad_scheme"


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)"])
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(FetchError) as ei:
        HttpClient(HttpConfig(retries=0)).get(url)
    assert ei.value.reason == "bad_scheme"


def test_credentials_in_url_refused() -> None:
    with pytest.raises(FetchError) as ei:
        HttpClient(HttpConfig(retries=0)).get("https://user:pw@example.com/")
    assert ei.value.reason == "bad_url"


def test_pinned_private_address_is_trusted_unpinned_is_not(emu: Emulator) -> None:
    pinned = client_for(emu, retries=0)
    assert pinned.download_image(emu.url("i.redd.it", "bigdirect1.jpeg")).format == "jpeg"
    # Same host name, no pin: the system resolver (or a fake one) gives loopback -> refused.
    unpinned = HttpClient(HttpConfig(ca_bundle=emu.ca_bundle, retries=0), resolver=lambda h, p: ["127.0.0.1"])
    with pytest.raises(BlockedAddress):
        unpinned.download_image(emu.url("i.redd.it", "bigdirect1.jpeg"))
    # A pin only covers its own port.
    with pytest.raises(BlockedAddress):
        pinned.policy.resolver = lambda h, p: ["127.0.0.1"]
        pinned.get(f"https://i.redd.it:{emu.port + 1 if emu.port < 65535 else 1}/x.jpg")


def test_allow_private_turns_the_guard_off() -> None:
    srv, port = plain_server(lambda r: (r.send_response(200), r.send_header("Content-Length", "2"), r.end_headers(), r.wfile.write(b"ok")))
    try:
        with pytest.raises(BlockedAddress):
            HttpClient(HttpConfig(retries=0)).get(f"http://127.0.0.1:{port}/")
        assert HttpClient(HttpConfig(retries=0, allow_private=True)).get(f"http://127.0.0.1:{port}/").body == b"ok"
    finally:
        srv.shutdown()


def test_ipv6_literal_and_pin_with_guard_off_or_pinned() -> None:
    class V6(_Plain):
        address_family = socket.AF_INET6

    def echo_host(r: BaseHTTPRequestHandler) -> None:
        body = r.headers["Host"].encode()
        r.send_response(200)
        r.send_header("Content-Length", str(len(body)))
        r.end_headers()
        r.wfile.write(body)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        do_GET = echo_host

    try:
        srv = V6(("::1", 0), H)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with pytest.raises(BlockedAddress):
            HttpClient(HttpConfig(retries=0)).get(f"http://[::1]:{port}/")
        assert HttpClient(HttpConfig(retries=0, allow_private=True)).get(f"http://[::1]:{port}/").body == f"[::1]:{port}".encode()
        pinned = HttpClient(HttpConfig(retries=0, resolve=[f"v6.example:{port}:[::1]"]))
        assert pinned.get(f"http://v6.example:{port}/").body == f"v6.example:{port}".encode()
    finally:
        srv.shutdown()


# -- --resolve ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry,host,port,addrs",
    [
        ("www.reddit.com:443:127.0.0.1", "www.reddit.com", 443, ("127.0.0.1",)),
        ("www.reddit.com:127.0.0.1:443", "www.reddit.com", 443, ("127.0.0.1",)),
        ("I.Redd.It:8443:[::1]", "i.redd.it", 8443, ("::1",)),
        ("i.redd.it:[::1]:8443", "i.redd.it", 8443, ("::1",)),
        ("cdn.example:80:10.0.0.2,10.0.0.3", "cdn.example", 80, ("10.0.0.2", "10.0.0.3")),
    ],
)
def test_parse_resolve_both_orders(entry: str, host: str, port: int, addrs: tuple) -> None:
    pin = parse_resolve(entry)
    assert (pin.host, pin.port, pin.addresses) == (host, port, addrs)


@pytest.mark.parametrize("entry", ["nohost", "a.b:443", "a.b:x:127.0.0.1", "a.b:443:not-an-ip", ":443:127.0.0.1", "a.b:70000:127.0.0.1"])
def test_parse_resolve_rejects_garbage(entry: str) -> None:
    with pytest.raises(ValueError, match="--resolve"):
        parse_resolve(entry)


def test_resolve_in_host_addr_port_order_reaches_emulator(emu: Emulator) -> None:
    c = HttpClient(HttpConfig(resolve=[f"i.redd.it:127.0.0.1:{emu.port}"], ca_bundle=emu.ca_bundle, retries=0))
    assert c.download_image(emu.url("i.redd.it", "bigdirect1.jpeg")).format == "jpeg"


# -- TLS ----------------------------------------------------------------------------------


def test_ca_bundle_needed_and_hostname_checked(emu: Emulator) -> None:
    no_ca = HttpClient(HttpConfig(resolve=emu.resolve_entries(), retries=0))
    with pytest.raises(FetchError) as ei:
        no_ca.get(emu.url("www.reddit.com", "r/all/new.json"))
    assert ei.value.reason == "tls"
    # The certificate does not name this host: verification is on the name, not the address.
    wrong = HttpClient(HttpConfig(resolve=[f"not-in-cert.example:{emu.port}:127.0.0.1"], ca_bundle=emu.ca_bundle, retries=0))
    with pytest.raises(FetchError) as ei:
        wrong.get(f"https://not-in-cert.example:{emu.port}/")
    assert ei.value.reason == "tls"


def test_bad_ca_bundle_is_a_clear_error(tmp_path: Any) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="--ca-bundle"):
        HttpClient(HttpConfig(ca_bundle=str(bad)))


# -- caps, deadline, content checks -------------------------------------------------------


def _lying_chunked(r: BaseHTTPRequestHandler) -> None:
    """Claims Content-Length: 100 but streams megabytes chunked (the length header is a lie)."""
    r.send_response(200)
    r.send_header("Content-Length", "100")
    r.send_header("Transfer-Encoding", "chunked")
    r.end_headers()
    piece = b"\xff\xd8\xff" + b"\0" * 65533
    for _ in range(200):
        r.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    r.wfile.write(b"0\r\n\r\n")


def _no_length(r: BaseHTTPRequestHandler) -> None:
    r.send_response(200)
    r.send_header("Connection", "close")
    r.end_headers()
    for _ in range(200):
        r.wfile.write(b"\xff\xd8\xff" + b"\0" * 65533)


def _huge_length(r: BaseHTTPRequestHandler) -> None:
    r.send_response(200)
    r.send_header("Content-Length", str(10**12))
    r.end_headers()
    r.wfile.write(b"\xff\xd8\xff" * 10)


@pytest.mark.parametrize("handler", [_lying_chunked, _no_length, _huge_length])
def test_byte_cap_never_trusts_content_length(handler: Callable) -> None:
    srv, port = plain_server(handler)
    try:
        c = HttpClient(HttpConfig(resolve=[f"big.example:{port}:127.0.0.1"], max_bytes=1 << 20, retries=0))
        t0 = time.monotonic()
        with pytest.raises(FetchError) as ei:
            c.download_image(f"http://big.example:{port}/x.jpg")
        assert ei.value.reason == "too_large"
        assert time.monotonic() - t0 < 5
        # The per-call cap overrides the configured one.
        with pytest.raises(FetchError) as ei:
            c.get(f"http://big.example:{port}/x.jpg", max_bytes=1000)
        assert ei.value.reason == "too_large"
    finally:
        srv.shutdown()


def test_slow_endless_body_hits_the_deadline(emu: Emulator) -> None:
    # retries=3: a server that used the whole deadline is not given another one.
    c = client_for(emu, retries=3, deadline=1.0, read_timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as ei:
        c.download_image(emu.url("hostile.example", "slow.jpg"))
    elapsed = time.monotonic() - t0
    assert ei.value.reason == "timeout"
    assert 0.9 <= elapsed < 4.0, f"deadline 1 s, took {elapsed:.2f} s"


def test_read_timeout_is_retried() -> None:
    calls = []

    def stall_once(r: BaseHTTPRequestHandler) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.0)  # past the read timeout: the client gives up on this attempt
        r.send_response(200)
        r.send_header("Content-Length", "2")
        r.end_headers()
        r.wfile.write(b"ok")

    srv, port = plain_server(stall_once)
    try:
        c = HttpClient(HttpConfig(resolve=[f"stall.example:{port}:127.0.0.1"], read_timeout=0.3, retries=1, backoff=0.01))
        assert c.get(f"http://stall.example:{port}/").body == b"ok"
        assert len(calls) == 2
    finally:
        srv.shutdown()


def test_trickled_headers_hit_the_deadline() -> None:
    """Each header byte arrives inside the read timeout; the deadline still ends the request."""

    def trickle(r: BaseHTTPRequestHandler) -> None:
        r.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            r.wfile.write(b"X")
            r.wfile.flush()
            time.sleep(0.1)

    srv, port = plain_server(trickle)
    try:
        c = HttpClient(HttpConfig(resolve=[f"slowloris.example:{port}:127.0.0.1"], deadline=1.0, read_timeout=5.0, retries=0))
        t0 = time.monotonic()
        with pytest.raises(FetchError) as ei:
            c.get(f"http://slowloris.example:{port}/")
        assert ei.value.reason == "timeout"
        assert time.monotonic() - t0 < 4.0, "without the watchdog this takes the whole 10 s trickle"
    finally:
        srv.shutdown()


def test_html_served_as_jpg_is_rejected(client: HttpClient, emu: Emulator) -> None:
    with pytest.raises(FetchError) as ei:
        client.download_image(emu.url("hostile.example", "html.jpg"))
    assert ei.value.reason == "not_image"
    with pytest.raises(FetchError) as ei:
        client.download_image(emu.url("i.imgur.com", "Gv6If7Y.gifv"))  # imgur's .gifv is a page
    assert ei.value.reason == "not_image"
    with pytest.raises(FetchError) as ei:
        client.download_image(emu.url("i.imgur.com", "Gv6If7Y.gif"))
    assert ei.value.reason == "unsupported_format"


def test_download_formats(client: HttpClient, emu: Emulator) -> None:
    assert client.download_image(emu.url("i.redd.it", "portrait4.png")).format == "png"
    assert client.download_image(emu.url("cdn.photohost.example", "photos/2024/modern.webp")).format == "webp"


def test_sniff_format() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff_format(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_format(b"GIF89a...") == "gif"
    assert sniff_format(b"<!DOCTYPE html>") is None
    assert sniff_format(b"") is None


def test_removed_placeholder_is_never_downloaded(client: HttpClient, emu: Emulator) -> None:
    before = emu.count(host="i.imgur.com", path="/removed.png")
    with pytest.raises(FetchError) as ei:
        client.download_image(emu.url("i.imgur.com", "Rm0Vd9X.jpg"), redirect_check=reject_removed_placeholder)
    assert ei.value.reason == "removed"
    assert emu.count(host="i.imgur.com", path="/removed.png") == before
    # Without the veto the redirect is followed and the history kept.
    dl = client.download_image(emu.url("i.imgur.com", "Rm0Vd9X.jpg"))
    assert dl.url.endswith("/removed.png") and dl.history == [emu.url("i.imgur.com", "Rm0Vd9X.jpg")]


def test_too_many_redirects(client: HttpClient, emu: Emulator) -> None:
    with pytest.raises(FetchError) as ei:
        client.get(emu.url("hostile.example", "loop-a"))
    assert ei.value.reason == "too_many_redirects"
    # allow_redirects=False hands the 302 back instead.
    resp = client.get(emu.url("hostile.example", "loop-a"), allow_redirects=False)
    assert resp.status == 302 and resp.headers["location"].endswith("/loop-b")


def test_authorization_not_forwarded_to_another_host(client: HttpClient, emu: Emulator) -> None:
    client.download_image(emu.url("i.imgur.com", "away.jpg"), headers={"Authorization": "Client-ID secret"})
    recs = [r for r in emu.records() if r.path in ("/away.jpg", "/photos/2024/lake.jpg")][-2:]
    assert [r.host for r in recs] == ["i.imgur.com", "cdn.photohost.example"]
    assert recs[0].headers.get("Authorization") == "Client-ID secret"
    assert "Authorization" not in recs[1].headers


def test_request_shapes_user_agent_params_auth(client: HttpClient, emu: Emulator) -> None:
    env = emu.nomad_env()
    tok = client.request("POST", emu.url("www.reddit.com", "api/v1/access_token"),
                         data={"grant_type": "client_credentials"},
                         auth=(env["REDDIT_CLIENT_ID"], env["REDDIT_CLIENT_SECRET"])).json()
    data, resp = client.get_json(emu.url("oauth.reddit.com", "r/all/new"), params={"limit": 3, "raw_json": 1},
                                 headers={"Authorization": f"bearer {tok['access_token']}"})
    assert len(data["data"]["children"]) == 3
    assert resp.headers["X-RATELIMIT-REMAINING"] == resp.headers["x-ratelimit-remaining"]
    rec = [r for r in emu.records() if r.host == "oauth.reddit.com"][-1]
    assert rec.headers["User-Agent"] == HttpConfig().user_agent
    assert rec.query["limit"] == ["3"] and rec.query["raw_json"] == ["1"]
    page = client.get(emu.url("www.flickr.com", "photos/dave_photos/53712345678/"))
    with pytest.raises(FetchError) as ei:
        page.json()
    assert ei.value.reason == "bad_json"


# -- retries and backoff ------------------------------------------------------------------


def test_retries_5xx_then_succeeds(emu: Emulator) -> None:
    emu.scenario.inject[("i.redd.it", "/bigdirect1.jpeg")] = [503, 502]
    before = emu.count(host="i.redd.it", path="/bigdirect1.jpeg")
    c = client_for(emu, retries=3)
    assert c.download_image(emu.url("i.redd.it", "bigdirect1.jpeg")).format == "jpeg"
    assert emu.count(host="i.redd.it", path="/bigdirect1.jpeg") - before == 3


def test_retries_are_bounded(emu: Emulator) -> None:
    emu.scenario.inject[("i.redd.it", "/smallpic2.jpeg")] = [500] * 10
    before = emu.count(host="i.redd.it", path="/smallpic2.jpeg")
    c = client_for(emu, retries=2)
    with pytest.raises(HttpStatusError) as ei:
        c.download_image(emu.url("i.redd.it", "smallpic2.jpeg"))
    assert ei.value.status == 500 and ei.value.reason == "http_5xx"
    assert emu.count(host="i.redd.it", path="/smallpic2.jpeg") - before == 3
    emu.scenario.inject.clear()


def test_404_is_not_retried(emu: Emulator) -> None:
    before = emu.count(host="i.redd.it", path="/nope.jpg")
    with pytest.raises(HttpStatusError) as ei:
        client_for(emu, retries=3).download_image(emu.url("i.redd.it", "nope.jpg"))
    assert ei.value.reason == "http_404"
    assert emu.count(host="i.redd.it", path="/nope.jpg") - before == 1


def test_429_honours_retry_after_capped(emu: Emulator) -> None:
    emu.scenario.inject[("i.redd.it", "/portrait4.png")] = [429]  # the emulator sends Retry-After: 1
    slept: list[float] = []
    cfg = HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, retries=2, backoff=0.01, backoff_max=30)
    HttpClient(cfg, sleep=slept.append).download_image(emu.url("i.redd.it", "portrait4.png"))
    assert len(slept) == 1 and 1.0 <= slept[0] <= 30
    emu.scenario.inject[("i.redd.it", "/portrait4.png")] = [429, 429]
    slept.clear()
    cfg.backoff_max = 0.2
    HttpClient(cfg, sleep=slept.append).download_image(emu.url("i.redd.it", "portrait4.png"))
    assert slept and all(s <= 0.2 for s in slept), "Retry-After is capped by backoff_max"


def test_backoff_grows_with_jitter() -> None:
    """The retry waits are photocore's schedule: the n-th wait lies in [0, base * 2**n], capped at backoff_max."""
    policy = HttpClient(HttpConfig(backoff=1.0, backoff_max=60.0)).retry
    busy = FetchError("http_5xx")
    waits = [[policy.delay(s, busy) for s in [policy.schedule()] for _ in range(7)] for _ in range(200)]
    for n in range(7):
        nth = [w[n] for w in waits]
        assert all(0.0 <= d <= min(60.0, 2.0**n) for d in nth)
        assert len(set(nth)) > 1, "jitter spreads the retries"
    assert max(w[6] for w in waits) > 32.0, "the limit doubles each time up to the cap"
    late = policy.schedule()
    late.attempt = 20
    assert policy.delay(late, busy) <= 60.0


def test_retry_after_lengthens_a_wait_up_to_the_cap() -> None:
    policy = HttpClient(HttpConfig(backoff=0.01, backoff_max=5.0), rng=random.Random(1)).retry
    assert policy.delay(policy.schedule(), HttpStatusError(429, {}, url="https://x/", retry_after=3.0)) == 3.0
    assert policy.delay(policy.schedule(), HttpStatusError(503, {}, url="https://x/", retry_after=99.0)) == 5.0
    assert not policy.retryable(FetchError("timeout", retryable=False)) and not policy.retryable(FetchError("http_404"))


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 9 <= parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) <= 11


def test_close_wakes_a_sleeping_retry(emu: Emulator) -> None:
    emu.scenario.inject[("i.redd.it", "/nsfw1.jpeg")] = [503, 503]
    c = HttpClient(HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, retries=2, backoff=30, backoff_max=30))
    threading.Timer(0.3, c.close).start()
    t0 = time.monotonic()
    with pytest.raises(FetchError) as ei:
        c.download_image(emu.url("i.redd.it", "nsfw1.jpeg"))
    assert ei.value.reason == "closed" and time.monotonic() - t0 < 5
    emu.scenario.inject.clear()


# -- concurrency --------------------------------------------------------------------------


def test_per_host_limit_and_thread_safety() -> None:
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def slow_ok(r: BaseHTTPRequestHandler) -> None:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.15)
        with lock:
            state["now"] -= 1
        body = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
        r.send_response(200)
        r.send_header("Content-Length", str(len(body)))
        r.end_headers()
        r.wfile.write(body)

    srv, port = plain_server(slow_ok)
    try:
        c = HttpClient(HttpConfig(resolve=[f"one.example:{port}:127.0.0.1"], per_host=2, retries=0))
        results, errors = at_once(lambda: c.download_image(f"http://one.example:{port}/a.png").format, 8, join_timeout=20)
        assert not errors and results == ["png"] * 8
        assert state["max"] == 2, f"at most 2 in flight per host, saw {state['max']}"
        assert c.limiter.in_flight() == 0 and not c.limiter._busy, "idle hosts are forgotten"
    finally:
        srv.shutdown()


def test_thread_pool_downloads_get_their_own_bytes(emu: Emulator) -> None:
    """Many threads, several hosts, pooled TLS connections: every image arrives intact."""
    from concurrent.futures import ThreadPoolExecutor

    from stack.emulator import images as gen

    files = [((h, p), r) for (h, p), r in emu.scenario.files.items()
             if r.kind == "image" and r.fmt in ("jpeg", "png") and r.width * r.height <= 2_000_000]
    assert len(files) >= 12
    c = client_for(emu, retries=0, per_host=2)

    def fetch(item: tuple[tuple[str, str], Resource]) -> bool:
        (host, path), res = item
        dl = c.download_image(emu.url(host, path))
        return dl.data == gen.picture(res.width, res.height, res.fmt, res.seed, res.orientation)

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(fetch, files * 2))
    assert c.limiter.in_flight() == 0
    c.close()



def _recording_server(seen: list[tuple[str, dict[str, str]]], redirect: Callable[[int], str] | None) -> tuple[_Plain, int]:
    """A plain server recording (path, headers); ``/start`` redirects to ``redirect(own port)``, the rest is 200."""
    port_box: list[int] = []

    def handle(r: BaseHTTPRequestHandler) -> None:
        seen.append((r.path, {k.lower(): v for k, v in r.headers.items()}))
        if redirect is not None and r.path == "/start":
            r.send_response(302)
            r.send_header("Location", redirect(port_box[0]))
            r.send_header("Content-Length", "0")
            r.end_headers()
            return
        r.send_response(200)
        r.send_header("Content-Length", "2")
        r.end_headers()
        r.wfile.write(b"ok")

    srv, port = plain_server(handle)
    port_box.append(port)
    return srv, port


CREDS = {"Authorization": "bearer s3cret", "Cookie": "session=s3cret", "Proxy-Authorization": "Basic s3cret"}


def _get_start_with_creds(port: int, *servers: _Plain) -> None:
    """GET ``/start`` on ``port`` with CREDS through every redirect, then stop ``servers``."""
    try:
        with HttpClient(HttpConfig(allow_private=True, retries=0)) as c:
            assert c.get(f"http://127.0.0.1:{port}/start", headers=CREDS).body == b"ok"
    finally:
        for srv in servers:
            srv.shutdown()


def test_credentials_dropped_when_redirect_changes_port() -> None:
    """Same host (127.0.0.1), another port: another origin, so no Authorization/Cookie/Proxy-Authorization."""
    first: list[tuple[str, dict[str, str]]] = []
    second: list[tuple[str, dict[str, str]]] = []
    target, tport = _recording_server(second, None)
    hop, hport = _recording_server(first, lambda _own: f"http://127.0.0.1:{tport}/end")
    _get_start_with_creds(hport, hop, target)
    assert first[0][1]["authorization"] == "bearer s3cret"
    assert second and not {"authorization", "cookie", "proxy-authorization"} & set(second[0][1])


def test_credentials_kept_within_the_same_origin() -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    srv, port = _recording_server(seen, lambda own: f"http://127.0.0.1:{own}/end")
    _get_start_with_creds(port, srv)
    assert [p for p, _ in seen] == ["/start", "/end"]
    assert seen[1][1]["authorization"] == "bearer s3cret" and seen[1][1]["cookie"] == "session=s3cret"


def test_origin_is_scheme_host_and_port() -> None:
    from nomad.http import _origin

    assert _origin("https://Example.com/a") == _origin("https://example.com:443/b")
    assert _origin("http://example.com/") != _origin("https://example.com/")
    assert _origin("https://example.com/") != _origin("https://example.com:8443/")


def test_redirect_policy_next_hop() -> None:
    """nomad.net.redirects on its own: 303 turns a POST into a bodiless GET; leaving the origin drops credentials."""
    from nomad.net.redirects import origin, next_hop
    from nomad.net.request import encode_request

    req = encode_request("post", "https://api.example/a", user_agent="t", json={"q": 1}, headers=CREDS)
    assert req.method == "POST" and req.headers["Content-Type"] == "application/json"
    start = origin(req.url)
    same = next_hop(req, 307, "/b", start)
    assert (same.method, same.url, same.body) == ("POST", "https://api.example/b", req.body)
    assert same.headers["Authorization"] == CREDS["Authorization"]
    other = next_hop(req, 303, "https://api.example:8443/c", start)
    assert (other.method, other.body) == ("GET", None)
    assert not {"authorization", "cookie", "proxy-authorization", "content-type"} & {k.lower() for k in other.headers}
    assert next_hop(other, 302, "https://api.example/d", start).headers.get("Cookie") is None, "dropped for good"
