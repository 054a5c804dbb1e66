"""The client address: the socket peer or, behind a proxy listed in TRUSTED_PROXIES, the client it names.

Decided once per request by `app.middleware` (written into `scope["client"]`), so the rate limiter and the
access log key on the same address. Nothing else may believe X-Forwarded-For: the server's own proxy-header
handling is turned off (`app.serve`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


def parse_networks(entries: list[str]) -> list[Network]:
    return [ip_network(entry, strict=False) for entry in entries]


def client_address(peer: str, forwarded_for: Iterable[str], trusted: list[Network]) -> str:
    """The socket peer, or, when that peer is a trusted proxy, the nearest untrusted X-Forwarded-For hop.

    Walking the header from the right skips only addresses we trust; anything a client wrote further
    left is never believed, so a spoofed header from an untrusted peer changes nothing.
    """
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            address = _parse_ip(hop)
            return str(address) if address is not None else peer
    first = _parse_ip(hops[0]) if hops else None
    return str(first) if first is not None else peer


#: A hop with a port, as some gateways (Azure Application Gateway) write it: `203.0.113.5:41234`, `[2001:db8::1]:443`.
_WITH_PORT = re.compile(r"\[(?P<v6>[^\]]+)\]:[0-9]{1,5}|(?P<v4>[0-9.]+):[0-9]{1,5}")


def _parse_ip(value: str) -> Address | None:
    """An address in its one canonical spelling (so `::1` and `0::1` are one rate-limit key); no scope ids
    (`fe80::1%anything` would let a client write any text into the key and the log). A port is dropped: the
    hop a proxy wrote with one was not parsed, so every client behind that proxy counted as the proxy."""
    if "%" in value:
        return None
    with_port = _WITH_PORT.fullmatch(value)
    if with_port is not None:
        value = with_port.group("v6") or with_port.group("v4")
    try:
        address = ip_address(value)
    except ValueError:
        return None
    # An IPv4 address as a dual-stack socket (`--host ::`) reports it, or a proxy wrote it: that IPv4 address.
    return address.ipv4_mapped or address if isinstance(address, IPv6Address) else address


def _is_trusted(value: str, trusted: list[Network]) -> bool:
    """`value` is in TRUSTED_PROXIES, an IPv4 address whether the list spells it as IPv4 or IPv4-mapped IPv6."""
    address = _parse_ip(value)
    if address is None:
        return False
    spellings = [address, IPv6Address(f"::ffff:{address}")] if isinstance(address, IPv4Address) else [address]
    return any(spelling in network for spelling in spellings for network in trusted)
