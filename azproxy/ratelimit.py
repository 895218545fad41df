"""Per-client rate limits: requests and tokens per minute, in this process or shared through Redis.

Fixed one-minute windows: cheap, and the same arithmetic in memory and in Redis (INCR with an expiry).
Tokens are charged after the answer, from its `usage`, so a request is admitted while the window has tokens left.
The clock is a parameter (wall-clock seconds, `time.time` by default) so a window's edges can be tested exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .clients import Client
from .errors import ProxyError

log = logging.getLogger(__name__)

WINDOW: Final = 60

#: Seconds since the epoch; windows are numbered `int(clock() // WINDOW)` so every process agrees on them.
Clock = Callable[[], float]


class RateLimited(ProxyError):
    status = 429
    error_type = "requests"


@dataclass(frozen=True, slots=True)
class Usage:
    """A client's standing in the current window, reported as OpenAI's x-ratelimit-* headers."""

    client: Client
    requests: int
    tokens: int
    reset_seconds: float

    def headers(self) -> dict[str, str]:
        reset = f"{max(self.reset_seconds, 0.001):.3f}s"
        headers: dict[str, str] = {}
        if self.client.rpm:
            headers |= {
                "x-ratelimit-limit-requests": str(self.client.rpm),
                "x-ratelimit-remaining-requests": str(max(self.client.rpm - self.requests, 0)),
                "x-ratelimit-reset-requests": reset,
            }
        if self.client.tpm:
            headers |= {
                "x-ratelimit-limit-tokens": str(self.client.tpm),
                "x-ratelimit-remaining-tokens": str(max(self.client.tpm - self.tokens, 0)),
                "x-ratelimit-reset-tokens": reset,
            }
        return headers


class Counters(Protocol):
    """Where window counts live: `add` returns the new total (add 0 to read)."""

    async def add(self, key: str, amount: int) -> int: ...

    async def close(self) -> None: ...


class RateLimiter:
    def __init__(self, counters: Counters, *, clock: Clock = time.time) -> None:
        self._counters = counters
        self._clock = clock

    async def admit(self, client: Client) -> Usage:
        """Count the request; 429 with retry-after when the client's window is spent (the request is not sent)."""
        now = self._clock()
        window, reset = int(now // WINDOW), WINDOW - now % WINDOW
        requests = await self._counters.add(_key(client, window, "requests"), 1) if client.rpm else 0
        tokens = await self._counters.add(_key(client, window, "tokens"), 0) if client.tpm else 0
        usage = Usage(client, requests, tokens, reset)
        spent = []
        if client.rpm and requests > client.rpm:
            spent.append("requests")
        if client.tpm and tokens >= client.tpm:
            spent.append("tokens")
        if spent:
            # Whole seconds, rounded up: a client that waits as told finds the new window.
            wait = math.ceil(reset)
            raise RateLimited(
                f"Rate limit reached for client '{client.name}': {' and '.join(spent)} per minute. "
                f"Try again in {wait}s.",
                code="rate_limit_exceeded",
                headers=usage.headers() | {"retry-after": str(wait)},
            )
        return usage

    async def charge(self, client: Client, tokens: int) -> None:
        if client.tpm and tokens > 0:
            await self._counters.add(_key(client, int(self._clock() // WINDOW), "tokens"), tokens)

    async def close(self) -> None:
        await self._counters.close()


def _key(client: Client, window: int, kind: str) -> str:
    return f"azproxy:ratelimit:{client.key_digest.hex()[:16]}:{window}:{kind}"


class MemoryCounters:
    """Counters for one process; windows older than the current one are dropped as time moves on."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._window = 0

    async def add(self, key: str, amount: int) -> int:
        window = int(self._clock() // WINDOW)
        if window != self._window:
            self._counts = {k: v for k, v in self._counts.items() if f":{window}:" in k}
            self._window = window
        total = self._counts.get(key, 0) + amount
        self._counts[key] = total
        return total

    async def close(self) -> None:
        return None


class RedisCounters:
    """Counters shared by every azproxy process using the same Redis. If Redis fails, requests are let through
    (the keys are still checked) and the failure is logged: limits are about fairness, not access."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._redis: Any = redis.asyncio.from_url(url)
        self._last_failure_log = 0.0

    async def add(self, key: str, amount: int) -> int:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incrby(key, amount)
                pipe.expire(key, 2 * WINDOW)
                total, _ = await pipe.execute()
            return int(total)
        except Exception as exc:  # any Redis or connection failure: fail open, loudly
            if time.monotonic() - self._last_failure_log > 30:
                self._last_failure_log = time.monotonic()
                log.error("rate-limit counters in Redis unavailable, not limiting: %s", type(exc).__name__)
            return 0

    async def close(self) -> None:
        await self._redis.aclose()
