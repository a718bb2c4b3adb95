"""SSRF guard: which addresses nomad may connect to, and curl-style ``--resolve`` pins.

The crawler follows links written by strangers. A link (or a redirect) to
``http://169.254.169.254/`` or ``http://10.0.0.1/admin`` must never be fetched,
so every host is resolved *here*, every address is checked, and the client
then connects to exactly the address that was checked (no second lookup for a
rebinding DNS server to answer differently).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import BlockedAddress, FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port) -> [address, …]``; the default uses getaddrinfo."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in an IPv6 one (mapped, 6to4, NAT64, Teredo client), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return ip.teredo[1]
    # IPv4-compatible (deprecated ::a.b.c.d): the low 32 bits, top 96 zero.
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why an address must not be contacted ("loopback", "private", …), or None if public."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    inner = embedded_ipv4(ip)
    if inner is not None:
        why = blocked_reason(inner)
        if why:
            return f"{why} (embedded in {ip})"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
        return "private"
    # Order matters only for the message: the most specific name first.
    for name in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved", "site_local"):
        if getattr(ip, f"is_{name}", False):
            return name.replace("_", "-")
    if not ip.is_global:
        # Shared address space (100.64/10, carrier NAT) and other non-global ranges.
        return "non-global"
    return None


def default_resolver(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (IPv4 first), via the system resolver."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError("dns", f"cannot resolve {host}: {exc}") from exc
    addrs: list[str] = []
    for family, _t, _p, _c, sockaddr in sorted(infos, key=lambda i: i[0] != socket.AF_INET):
        a = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone id
        if a not in addrs:
            addrs.append(a)
    return addrs


def _split_resolve(entry: str) -> list[str]:
    """Split on ':' except inside [brackets] (IPv6 addresses)."""
    parts: list[str] = []
    cur = ""
    depth = 0
    for ch in entry:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _parse_addr(text: str) -> str | None:
    """The address in one ``--resolve`` field (brackets allowed), or None if it is not one."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        return None


@dataclass(frozen=True)
class Pin:
    """One ``--resolve`` entry: requests to ``host:port`` connect to ``addresses``."""

    host: str
    port: int
    addresses: tuple[str, ...]


def parse_resolve(entry: str) -> Pin:
    """Parse ``HOST:PORT:ADDR[,ADDR…]`` (curl) or ``HOST:ADDR:PORT``; IPv6 in brackets.

    The field that parses as an IP address (or a comma list of them) is the address.
    """
    parts = _split_resolve(entry)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--resolve {entry!r}: expected HOST:PORT:ADDRESS")
    host, a, b = parts[0].strip().lower().rstrip("."), parts[1], parts[2]
    for port_s, addr_s in ((a, b), (b, a)):
        addrs = [_parse_addr(x) for x in addr_s.split(",")]
        if port_s.strip().isdigit() and addrs and all(addrs):
            port = int(port_s)
            if not 0 < port < 65536:
                raise ValueError(f"--resolve {entry!r}: port {port} out of range")
            return Pin(host, port, tuple(a for a in addrs if a))
    raise ValueError(f"--resolve {entry!r}: expected HOST:PORT:ADDRESS (ADDRESS an IP, IPv6 in brackets)")


@dataclass(frozen=True)
class Target:
    """Where to connect for one URL: the checked address, and whether it came from a pin."""

    host: str
    port: int
    address: str
    pinned: bool


class AddressPolicy:
    """Resolves host names once and decides whether the result may be contacted."""

    def __init__(
        self,
        pins: Iterable[str | Pin] = (),
        *,
        allow_private: bool = False,
        resolver: Resolver | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.resolver: Resolver = resolver or default_resolver
        self.pins: dict[tuple[str, int], Pin] = {}
        for p in pins:
            pin = parse_resolve(p) if isinstance(p, str) else p
            self.pins[(pin.host, pin.port)] = pin

    def target(self, host: str, port: int, *, url: str | None = None) -> Target:
        """Resolve ``host`` and return the one address to connect to, or raise BlockedAddress."""
        host = host.lower().rstrip(".")
        pin = self.pins.get((host, port))
        if pin is not None:
            # A pinned address is the operator's explicit choice: trusted even if private.
            return Target(host, port, pin.addresses[0], True)
        literal = _parse_addr(host)
        addrs = [literal] if literal else list(self.resolver(host, port))
        if not addrs:
            raise FetchError("dns", f"no address for {host}", url=url)
        if not self.allow_private:
            for a in addrs:
                why = blocked_reason(a)
                if why:
                    # Refuse the host if *any* of its addresses is internal: a name that
                    # mixes public and private answers is a rebinding setup, not a CDN.
                    what = f"address {a}" if literal else f"{host} resolves to {a}"
                    raise BlockedAddress(f"{what}: {why}", url=url, address=a)
        return Target(host, port, addrs[0], False)
