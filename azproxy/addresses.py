"""What kind of network address a host or IP is: the facts the SSRF guard and the open-relay check rest on."""

from __future__ import annotations

import ipaddress


def is_public(address: str) -> bool:
    """Globally routable unicast: not loopback, private, shared, link-local (cloud metadata), multicast or
    unspecified, also when an IPv6 address wraps an IPv4 one (mapped, 6to4, Teredo)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


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
