"""The client a per-address limit counts: an address as one owner holds it.

An IPv6 host is given a whole /64 (SLAAC, privacy addresses) and can send each request
from another address in it: keyed by its full address, every request had a fresh
bucket. An IPv4-mapped IPv6 address (an IPv4 client of a dual-stack listener,
`::ffff:192.0.2.1`) is that IPv4 address: its /64 would be every IPv4 client at once.
A link-local address stays whole: fe80::/64 is every host on the link.
"""

from __future__ import annotations

import ipaddress

IPV6_HOST_PREFIX = 64


def limited_address(remote: str | None) -> str:
    """`remote` (the TCP peer as aiohttp gives it) as the limit counts it: an IPv4
    address as is, an IPv6 one as its /64 network, an IPv4-mapped one as its IPv4
    address. Anything else (no peer, a link-local address, a Unix socket's path) is
    returned unchanged."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:  # "", a path
        return remote or ""
    if isinstance(address, ipaddress.IPv6Address) and not address.is_link_local:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_HOST_PREFIX), strict=False))
    return remote or ""
