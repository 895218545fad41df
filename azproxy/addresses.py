"""What kind of network address a host or IP is: the facts the SSRF guard and the open-relay check rest on."""

from __future__ import annotations

import ipaddress
from typing import Final

#: IPv6 ranges whose last 32 bits are an IPv4 address: IPv4-compatible (deprecated, RFC 4291),
#: IPv4-translated (SIIT, RFC 2765) and the well-known NAT64 prefix (RFC 6052).
_LOW_32_BITS_IPV4: Final = tuple(
    ipaddress.IPv6Network(prefix) for prefix in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
#: The local-use NAT64 prefix (RFC 8215): where the IPv4 address sits depends on a prefix length only the
#: local network knows, so nothing in it counts as public.
_NAT64_LOCAL_USE: Final = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public(address: str) -> bool:
    """Globally routable unicast: not loopback, private, shared, link-local (cloud metadata), multicast or
    unspecified, also when an IPv6 address carries an IPv4 one (mapped, compatible, translated, NAT64, 6to4,
    Teredo): a translator on the way would connect to that IPv4 address."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL_USE:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if any(ip in network for network in _LOW_32_BITS_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    return is_ip_literal(host) and ipaddress.ip_address(host.partition("%")[0]).is_loopback
