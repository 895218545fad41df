"""The rate limiter against a fake clock: window edges, resets and headers to the millisecond, never flaky."""

from __future__ import annotations

import pytest

from azproxy.clients import Client, digest
from azproxy.ratelimit import WINDOW, MemoryCounters, RateLimited, RateLimiter

ALICE = Client("alice", digest("alice-key"), rpm=3)
BOB = Client("bob", digest("bob-key"), tpm=100)
UNLIMITED = Client("carol", digest("carol-key"))


class FakeClock:
    """Seconds since the epoch, moved only by the test."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingCounters(MemoryCounters):
    """Memory counters that remember every key asked for, to see which window the limiter named."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.keys: list[str] = []

    async def add(self, key: str, amount: int) -> int:
        self.keys.append(key)
        return await super().add(key, amount)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(MemoryCounters(clock=clock), clock=clock)


async def refused(limiter: RateLimiter, client: Client) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(client)
    return caught.value


async def test_requests_window_fills_and_resets_exactly_at_the_boundary(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    clock.now = 0.0
    assert [(await limiter.admit(ALICE)).requests for _ in range(3)] == [1, 2, 3]
    clock.now = 59.9
    await refused(limiter, ALICE)
    clock.now = 60.0
    assert (await limiter.admit(ALICE)).requests == 1
    clock.now = 119.9
    assert [(await limiter.admit(ALICE)).requests for _ in range(2)] == [2, 3]
    await refused(limiter, ALICE)
    clock.now = 120.0
    assert (await limiter.admit(ALICE)).requests == 1


async def test_reset_seconds_and_retry_after_are_exact(limiter: RateLimiter, clock: FakeClock) -> None:
    clock.now = 0.0
    assert (await limiter.admit(ALICE)).reset_seconds == 60.0
    clock.now = 45.5
    assert (await limiter.admit(ALICE)).reset_seconds == 14.5
    assert (await limiter.admit(ALICE)).reset_seconds == 14.5
    error = await refused(limiter, ALICE)
    assert error.headers["retry-after"] == "15"  # 14.5 s to go: retrying after 14 would be refused again
    assert error.headers["x-ratelimit-reset-requests"] == "14.500s"
    assert error.message == "Rate limit reached for client 'alice': requests per minute. Try again in 15s."
    clock.now = 59.5
    assert (await refused(limiter, ALICE)).headers["retry-after"] == "1"  # rounded up, never 0
    clock.now = 59.75
    assert (await refused(limiter, ALICE)).headers["x-ratelimit-reset-requests"] == "0.250s"
    clock.now = 59.9
    error = await refused(limiter, ALICE)
    assert (error.headers["x-ratelimit-reset-requests"], error.headers["retry-after"]) == ("0.100s", "1")
    clock.now = 60.0
    assert (await limiter.admit(ALICE)).reset_seconds == 60.0


async def test_request_headers_are_exact(limiter: RateLimiter, clock: FakeClock) -> None:
    clock.now = 600.0 + 12.25
    assert (await limiter.admit(ALICE)).headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "47.750s",
    }
    await limiter.admit(ALICE)
    assert (await limiter.admit(ALICE)).headers()["x-ratelimit-remaining-requests"] == "0"
    error = await refused(limiter, ALICE)
    assert (error.status, error.code, error.error_type) == (429, "rate_limit_exceeded", "requests")
    assert error.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "47.750s",
        "retry-after": "48",
    }


async def test_tokens_refused_once_charged_up_to_the_limit(limiter: RateLimiter, clock: FakeClock) -> None:
    clock.now = 10.0
    assert (await limiter.admit(BOB)).headers() == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "50.000s",
    }
    await limiter.charge(BOB, 60)
    assert (await limiter.admit(BOB)).tokens == 60
    await limiter.charge(BOB, 39)
    usage = await limiter.admit(BOB)  # one token left: admitted, the answer may overrun it
    assert usage.headers()["x-ratelimit-remaining-tokens"] == "1"
    await limiter.charge(BOB, 1)
    clock.now = 59.999
    error = await refused(limiter, BOB)
    assert error.headers == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "0.001s",
        "retry-after": "1",
    }
    assert error.message == "Rate limit reached for client 'bob': tokens per minute. Try again in 1s."
    clock.now = 60.0
    assert (await limiter.admit(BOB)).tokens == 0


async def test_overrun_tokens_show_as_none_remaining(limiter: RateLimiter) -> None:
    await limiter.charge(BOB, 250)
    error = await refused(limiter, BOB)
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_tokens_are_charged_to_the_window_the_answer_ended_in(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    """An answer admitted at 59.9 s and finished at 60.1 s spends the new window's tokens."""
    clock.now = 59.9
    await limiter.admit(BOB)
    clock.now = 60.1
    await limiter.charge(BOB, 100)
    await refused(limiter, BOB)
    clock.now = 120.0
    assert (await limiter.admit(BOB)).tokens == 0


async def test_both_limits_spent_name_both(clock: FakeClock) -> None:
    both = Client("dave", digest("dave-key"), rpm=1, tpm=10)
    limiter = RateLimiter(MemoryCounters(clock=clock), clock=clock)
    clock.now = 30.0
    await limiter.admit(both)
    await limiter.charge(both, 10)
    error = await refused(limiter, both)
    assert (
        error.message
        == "Rate limit reached for client 'dave': requests and tokens per minute. Try again in 30s."
    )
    assert error.headers == {
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "30.000s",
        "x-ratelimit-limit-tokens": "10",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "30.000s",
        "retry-after": "30",
    }


async def test_clients_without_limits_are_not_counted(clock: FakeClock) -> None:
    counters = RecordingCounters(clock)
    limiter = RateLimiter(counters, clock=clock)
    for _ in range(1000):
        assert (await limiter.admit(UNLIMITED)).headers() == {}
    await limiter.charge(UNLIMITED, 10**9)
    assert counters.keys == []


async def test_clients_have_separate_windows(limiter: RateLimiter) -> None:
    other = Client("erin", digest("erin-key"), rpm=3)
    for _ in range(3):
        await limiter.admit(ALICE)
    await refused(limiter, ALICE)
    assert (await limiter.admit(other)).requests == 1


async def test_keys_name_the_window_of_the_limiters_clock(clock: FakeClock) -> None:
    """Shared counters (Redis) keep no clock: the window number in the key is the limiter's."""
    counters = RecordingCounters(clock)
    limiter = RateLimiter(counters, clock=clock)
    both = Client("dave", digest("dave-key"), rpm=1, tpm=10)
    clock.now = 1_700_000_000.0
    window = int(1_700_000_000 // WINDOW)
    await limiter.admit(both)
    await limiter.charge(both, 5)
    prefix = f"azproxy:ratelimit:{digest('dave-key').hex()[:16]}:{window}"
    assert counters.keys == [f"{prefix}:requests", f"{prefix}:tokens", f"{prefix}:tokens"]


async def test_memory_counters_drop_old_windows(clock: FakeClock) -> None:
    counters = MemoryCounters(clock=clock)
    clock.now = 0.0
    assert await counters.add("azproxy:ratelimit:aa:0:requests", 5) == 5
    assert await counters.add("azproxy:ratelimit:bb:0:tokens", 7) == 7
    clock.now = 59.9
    assert await counters.add("azproxy:ratelimit:aa:0:requests", 0) == 5
    clock.now = 60.0
    assert await counters.add("azproxy:ratelimit:aa:1:requests", 1) == 1
    assert await counters.add("azproxy:ratelimit:aa:0:requests", 0) == 0
    assert await counters.add("azproxy:ratelimit:bb:0:tokens", 0) == 0
    assert await counters.add("azproxy:ratelimit:aa:1:requests", 1) == 2
    clock.now = 180.0  # a window with no traffic in between drops everything older too
    assert await counters.add("azproxy:ratelimit:aa:3:requests", 0) == 0
    assert await counters.add("azproxy:ratelimit:aa:1:requests", 0) == 0


async def test_close_closes_the_counters(clock: FakeClock) -> None:
    closed: list[bool] = []

    class Closing(MemoryCounters):
        async def close(self) -> None:
            closed.append(True)

    await RateLimiter(Closing(clock=clock), clock=clock).close()
    assert closed == [True]
