"""Key guessing, slowed to a crawl: failed key checks are counted per client address, and an address with too
many within a minute is answered 429 for `BLOCK_SECONDS`, without its keys even being compared.

Without this, one connection tries thousands of keys a second. An IPv6 client is counted by its /64, since
one host commonly holds a whole /64; memory is bounded by dropping the address that failed longest ago.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final

from multidict import CIMultiDictProxy

from .errors import ProxyError
from .setting_values import IPNetwork

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Seconds in which failures are counted.
WINDOW_SECONDS: Final = 60.0
#: Seconds an address over the limit is answered 429.
BLOCK_SECONDS: Final = 60.0
#: Client addresses tracked at once.
MAX_ADDRESSES: Final = 10_000


class TooManyAuthFailures(ProxyError):
    status = 429
    error_type = "requests"


@dataclass(slots=True)
class _Record:
    failures: deque[float]
    blocked_until: float = field(default=-math.inf)


class GuessingGuard:
    """Counts failed key checks per client address and blocks an address that reaches `limit` in a minute;
    `limit` 0 turns it off."""

    def __init__(
        self,
        limit: int,
        trusted_proxies: Collection[IPNetwork] = (),
        *,
        clock: Clock = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self._limit = limit
        self._trusted = tuple(trusted_proxies)
        self._clock = clock
        self._max_addresses = max_addresses
        #: Least recently active first, so the oldest is the one dropped.
        self._records: dict[str, _Record] = {}

    def client_address(self, peer: str | None, headers: CIMultiDictProxy[str]) -> str | None:
        """Who to count: the peer or, when the peer is a trusted proxy, the last address in X-Forwarded-For
        that is not itself a trusted proxy (earlier entries are the client's to write, and may be forged)."""
        if peer is None or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for value in headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
        for hop in reversed(hops):
            if not _is_ip(hop):
                return peer  # not what a proxy writes: count the proxy rather than trust it
            if not self._is_trusted(hop):
                return hop
        return peer

    def check(self, address: str | None) -> None:
        """429 with retry-after while `address` is blocked."""
        if not self._limit or address is None:
            return
        bucket = _bucket(address)
        record = self._records.get(bucket)
        if record is None:
            return
        wait = record.blocked_until - self._clock()
        if wait <= 0:
            return
        self._touch(bucket, record)
        raise TooManyAuthFailures(
            "Too many failed key checks from this address; try again later.",
            code="too_many_auth_failures",
            headers={"retry-after": str(math.ceil(wait))},
        )

    def failed(self, address: str | None) -> None:
        """One failed key check from `address`; the one that reaches the limit starts a block (logged once)."""
        if not self._limit or address is None:
            return
        bucket, now = _bucket(address), self._clock()
        record = self._records.get(bucket) or _Record(deque(maxlen=self._limit))
        self._touch(bucket, record)
        while record.failures and record.failures[0] <= now - WINDOW_SECONDS:
            record.failures.popleft()
        record.failures.append(now)
        if len(record.failures) >= self._limit:
            record.failures.clear()
            record.blocked_until = now + BLOCK_SECONDS
            log.warning(
                "%s: %d failed key checks within a minute; answering 429 for %.0f s (AZPROXY_AUTH_FAILURE_LIMIT)",
                bucket,
                self._limit,
                BLOCK_SECONDS,
            )

    def _touch(self, bucket: str, record: _Record) -> None:
        self._records.pop(bucket, None)
        self._records[bucket] = record
        while len(self._records) > self._max_addresses:
            del self._records[next(iter(self._records))]

    def _is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False  # the common case, without parsing the address on every request
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        return any(ip.version == network.version and ip in network for network in self._trusted)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return False
    return True


def _bucket(address: str) -> str:
    """The address as counted: IPv4 as it is (also when IPv6-mapped), IPv6 by its /64."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
