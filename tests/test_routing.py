"""The router alone, on a fake clock: weights, priority tiers, cooldowns after 429, circuits, pinning."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from yarl import URL

from azproxy.backends import Backend
from azproxy.config import Failover, Mode
from azproxy.errors import BadRequest
from azproxy.routing import BackendsCooling, BackendsOut, Router, Target, retry_after


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backend(name: str, weight: int = 1, priority: int = 0, excludes: frozenset[str] = frozenset()) -> Backend:
    return Backend(
        name,
        Mode.AZURE,
        URL(f"https://{name}.example"),
        "2024-10-21",
        {},
        weight=weight,
        priority=priority,
        excludes=excludes,
    )


def router(*backends: Backend, **failover: float) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    return Router(backends, Failover(**failover), clock=clock, wall=lambda: 0.0), clock  # type: ignore[arg-type]


CHAT = Target("gpt-4o")


def picks(route: Router, count: int, target: Target = CHAT) -> list[str]:
    chosen = []
    for _ in range(count):
        picked = route.next(target)
        assert picked is not None
        route.answered(picked)
        chosen.append(picked.name)
    return chosen


def test_weights_three_to_one_give_three_of_every_four() -> None:
    route, _ = router(backend("east", weight=3), backend("west"))
    chosen = picks(route, 40)
    assert Counter(chosen) == {"east": 30, "west": 10}
    for start in range(0, 40, 4):
        assert Counter(chosen[start : start + 4]) == {"east": 3, "west": 1}


def test_a_429_moves_traffic_away_for_its_retry_after_and_back_after() -> None:
    route, clock = router(backend("east"), backend("west"))
    route.throttled(backend("east"), "gpt-4o", {"retry-after": "2"})
    assert set(picks(route, 4)) == {"west"}
    assert set(picks(route, 4, Target("other-model"))) == {"east", "west"}  # only that model's deployment
    clock.now += 2.01
    assert set(picks(route, 4)) == {"east", "west"}


def test_retry_after_ms_wins_and_the_default_cooldown_applies_without_either() -> None:
    route, clock = router(backend("east"), backend("west"), cooldown=5)
    route.throttled(backend("east"), "gpt-4o", {"retry-after": "30", "retry-after-ms": "1500"})
    clock.now += 1.6
    assert "east" in picks(route, 2)
    route.throttled(backend("east"), "gpt-4o", {})
    clock.now += 4.9
    assert set(picks(route, 2)) == {"west"}
    clock.now += 0.2
    assert "east" in picks(route, 2)


def test_retry_after_forms() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}, 0) == 0.25
    assert retry_after({"retry-after": "7"}, 0) == 7
    moment = datetime(2030, 1, 1, tzinfo=UTC)
    assert retry_after({"retry-after": format_datetime(moment, usegmt=True)}, moment.timestamp() - 3) == 3
    assert retry_after({"retry-after": "soon"}, 0) is None
    assert retry_after({"retry-after-ms": "nan"}, 0) is None
    assert retry_after({}, 0) is None


def test_all_cooling_is_429_with_the_shortest_wait_rounded_up() -> None:
    route, _ = router(backend("east"), backend("west"))
    route.throttled(backend("east"), "gpt-4o", {"retry-after-ms": "4200"})
    route.throttled(backend("west"), "gpt-4o", {"retry-after": "9"})
    assert route.next(CHAT) is None
    refusal = route.unavailable(CHAT)
    assert isinstance(refusal, BackendsCooling)
    assert refusal.status == 429
    assert refusal.headers == {"retry-after": "5"}
    assert not route.ready()


def test_circuit_opens_after_failures_then_one_probe_closes_it() -> None:
    route, clock = router(backend("east"), backend("west"), circuit_failures=3, circuit_open=30)
    east = backend("east")
    for _ in range(3):
        route.failed(east)
    assert set(picks(route, 4)) == {"west"}
    clock.now += 30
    probe = None
    while probe is None:
        picked = route.next(CHAT)
        assert picked is not None
        if picked.name == "east":
            probe = picked
        else:
            route.answered(picked)
    assert set(picks(route, 3)) == {"west"}  # one probe at a time
    route.answered(probe)
    assert Counter(picks(route, 4)) == {"east": 2, "west": 2}


def test_a_failed_probe_reopens_and_all_open_is_503() -> None:
    route, clock = router(backend("east"), backend("west"), circuit_failures=1, circuit_open=10)
    route.failed(backend("east"))
    route.failed(backend("west"))
    refusal = route.unavailable(CHAT)
    assert isinstance(refusal, BackendsOut)
    assert (refusal.status, refusal.headers) == (503, {"retry-after": "10"})
    clock.now += 10
    probe = route.next(CHAT)
    assert probe is not None
    route.failed(probe)
    clock.now += 9
    other = route.next(CHAT)
    assert other is not None
    assert other.name != probe.name


def test_priority_one_serves_only_while_every_priority_zero_is_out() -> None:
    route, clock = router(backend("east"), backend("west"), backend("openai", priority=1))
    assert "openai" not in picks(route, 10)
    route.throttled(backend("east"), "gpt-4o", {"retry-after": "5"})
    assert set(picks(route, 4)) == {"west"}
    route.throttled(backend("west"), "gpt-4o", {"retry-after": "5"})
    assert set(picks(route, 4)) == {"openai"}
    clock.now += 5
    assert "openai" not in picks(route, 4)


def test_failover_order_tries_each_candidate_once() -> None:
    route, _ = router(backend("east", weight=2), backend("west"), backend("openai", priority=1))
    tried: list[str] = []
    while (picked := route.next(CHAT, tried)) is not None:
        tried.append(picked.name)
    assert tried == ["east", "west", "openai"]
    assert route.limit(CHAT) == 3
    assert router(backend("a"), backend("b"), max_attempts=1)[0].limit(CHAT) == 1


def test_models_named_in_a_model_table_go_only_to_their_backends() -> None:
    route, _ = router(backend("east", excludes=frozenset({"gpt-4o"})), backend("west"))
    assert set(picks(route, 4)) == {"west"}
    assert set(picks(route, 4, Target("gpt-4o-mini"))) == {"east", "west"}
    assert route.limit(CHAT) == 1


def test_resource_requests_stay_on_the_primary_unless_pinned() -> None:
    route, _ = router(backend("east"), backend("west"), backend("openai", priority=1))
    files = Target(None, resource=True)
    assert [route.next(files) for _ in range(3)] == [backend("east")] * 3
    assert route.next(files, ["east"]) is None
    assert route.limit(files) == 1
    pinned = Target("gpt-4o", pinned="west")
    assert route.next(pinned) == backend("west")
    route.throttled(backend("west"), "gpt-4o", {"retry-after": "5"})
    assert route.next(pinned) == backend("west")  # never routed around: its resource lives there
    with pytest.raises(BadRequest, match="No backend is named 'north'"):
        route.next(Target("gpt-4o", pinned="north"))


def test_a_lone_backend_is_never_skipped() -> None:
    route, _ = router(backend("azure"), circuit_failures=1)
    route.failed(backend("azure"))
    route.throttled(backend("azure"), "gpt-4o", {"retry-after": "5"})
    assert route.next(CHAT) == backend("azure")
    assert route.ready()
