"""Which backend serves a request: smooth weighted round-robin within the lowest priority tier that has a
backend available, skipping backends that are cooling down after a 429 or whose circuit is open. A lone backend
is never skipped: with nowhere else to go, every request is sent and gets that backend's own answer.

Pure bookkeeping, no I/O: `upstream` asks for the next backend and reports how each attempt went. The clocks
are injectable, so tests move time instead of sleeping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final

from multidict import CIMultiDictProxy

from .backends import Backend
from .config import Failover
from .errors import BadRequest, ProxyError
from .operations import Scope
from .translate import Plan

log = logging.getLogger(__name__)

#: Names the backend a request is pinned to (never forwarded upstream), and the one that served an answer.
BACKEND_HEADER: Final = "x-azproxy-backend"
ATTEMPTS_HEADER: Final = "x-azproxy-attempts"

Clock = Callable[[], float]


class BackendsCooling(ProxyError):
    """429 without calling anyone: every backend for the model answered 429 a moment ago."""

    status = 429
    error_type = "requests"


class BackendsOut(ProxyError):
    """503 without calling anyone: every backend for the model has an open circuit."""

    status = 503
    error_type = "upstream_error"


@dataclass(frozen=True, slots=True)
class Target:
    """What routing needs of a request: its model, and whether it must stay on one backend."""

    model: str | None = None
    #: A backend the request names (`x-azproxy-backend`); it is never failed over.
    pinned: str | None = None
    #: Resource-scoped (files, batches, stored responses ...): they live on one resource, the primary.
    resource: bool = False


def target_of(plan: Plan, headers: CIMultiDictProxy[str]) -> Target:
    operation = plan.operation
    resource = operation is None or operation.scope is Scope.RESOURCE
    return Target(plan.model, headers.get(BACKEND_HEADER), resource)


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds a 429 asks to wait: `retry-after-ms` wins over `retry-after` (seconds or an HTTP date, read
    against the wall clock `now`); None when neither says anything usable."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000
    text = headers.get("retry-after", "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(moment.timestamp() - now, 0.0) if moment.tzinfo is not None else None


#: A backend's 429s are logged at most once in this many seconds.
THROTTLE_LOG_INTERVAL: Final = 10.0
#: Models whose backend count `Router.limit` remembers before it starts afresh.
_MAX_MODELS_REMEMBERED: Final = 1024


@dataclass(slots=True)
class _Health:
    """One backend's circuit: consecutive failures; open until a time; then one probe at a time."""

    failures: int = 0
    open_until: float | None = None
    probing: bool = False
    #: When a 429 from it was last logged: a throttled backend answers hundreds a second.
    throttle_logged: float = float("-inf")


class Router:
    """Shared by all requests of the process; every method runs to completion between awaits."""

    def __init__(
        self,
        backends: Sequence[Backend],
        failover: Failover,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.backends = tuple(backends)
        self.clock = clock
        self.wall = wall
        self._failover = failover
        self._skips = len(self.backends) > 1
        self._tiers = tuple(
            tuple(b for b in self.backends if b.priority == level)
            for level in sorted({b.priority for b in self.backends})
        )
        self._by_name = {backend.name: backend for backend in self.backends}
        self._health = {backend.name: _Health() for backend in self.backends}
        #: (backend, model) → when its 429 cooldown ends.
        self._cooling: dict[tuple[str, str | None], float] = {}
        #: Smooth weighted round-robin state per set of eligible backends (a handful of sets in practice).
        self._current: dict[tuple[str, ...], dict[str, int]] = {}
        #: How many backends serve a model, per model asked for (bounded: clients name the models).
        self._serving: dict[str | None, int] = {}

    @property
    def primary(self) -> Backend:
        """Where resource-scoped requests go: the first backend of the first tier."""
        return self._tiers[0][0]

    def limit(self, target: Target) -> int:
        """How many backends one request may try."""
        if self.pinned(target) is not None:
            return 1
        candidates = self._serving.get(target.model)
        if candidates is None:
            if len(self._serving) >= _MAX_MODELS_REMEMBERED:
                self._serving.clear()
            candidates = self._serving[target.model] = sum(
                1 for backend in self.backends if backend.serves(target.model)
            )
        return min(candidates, self._failover.max_attempts or candidates)

    def pinned(self, target: Target) -> Backend | None:
        """The one backend a pinned or resource-scoped request goes to; 400 for a name no backend has."""
        if target.pinned is None:
            return self.primary if target.resource else None
        backend = self._by_name.get(target.pinned)
        if backend is None:
            raise BadRequest(
                f"No backend is named {target.pinned!r} ({BACKEND_HEADER}); known: "
                f"{', '.join(self._by_name)}.",
                param=BACKEND_HEADER,
                code="unknown_backend",
            )
        if not backend.serves(target.model):
            raise BadRequest(
                f"Backend {backend.name!r} does not serve model {target.model!r}.",
                param=BACKEND_HEADER,
                code="model_not_on_backend",
            )
        return backend

    def next(self, target: Target, tried: Sequence[str] = ()) -> Backend | None:
        """The backend for the next attempt, or None when no other one may be tried now. A pinned request
        ignores cooldowns and circuits: its resource lives there and nowhere else."""
        pinned = self.pinned(target)
        if pinned is not None:
            return None if pinned.name in tried else pinned
        now = self.clock()
        for tier in self._tiers:
            eligible = [
                backend
                for backend in tier
                if backend.serves(target.model)
                and backend.name not in tried
                and self._wait(backend, target.model, now) is None
            ]
            if eligible:
                chosen = self._pick(eligible)
                health = self._health[chosen.name]
                if health.open_until is not None:
                    health.probing = True  # half-open: this request is the one probe
                return chosen
        return None

    def unavailable(self, target: Target) -> ProxyError:
        """Why no backend could be tried at all, with the shortest wait (whole seconds, rounded up)."""
        now = self.clock()
        waits = [
            wait
            for backend in self.backends
            if backend.serves(target.model)
            for wait in [self._wait(backend, target.model, now)]
            if wait is not None
        ]
        seconds = max(1, math.ceil(min((wait for wait, _ in waits), default=1.0)))
        headers = {"retry-after": str(seconds)}
        subject = f"model {target.model!r}" if target.model else "this request"
        if any(throttled for _, throttled in waits):
            return BackendsCooling(
                f"Every backend for {subject} is rate limited; retry after {seconds} seconds.",
                code="rate_limit_exceeded",
                headers=headers,
            )
        return BackendsOut(
            f"Every backend for {subject} is failing; retry after {seconds} seconds.",
            code="backends_unavailable",
            headers=headers,
        )

    def ready(self) -> bool:
        """At least one backend is neither cooling down nor behind an open circuit."""
        return any(self.availability().values())

    def availability(self) -> dict[str, bool]:
        """Per backend: neither cooling down (for any model) nor behind an open circuit."""
        if not self._skips:
            return dict.fromkeys(self._health, True)
        now = self.clock()
        cooling = {name for (name, _), until in self._cooling.items() if until > now}
        return {
            name: name not in cooling and (health.open_until is None or health.open_until <= now)
            for name, health in self._health.items()
        }

    def answered(self, backend: Backend) -> None:
        """It answered (whatever the status but 5xx): its circuit closes."""
        health = self._health[backend.name]
        if health.open_until is not None:
            log.warning("backend %s (%s) answers again: circuit closed", backend.name, backend.host)
        health.failures, health.open_until, health.probing = 0, None, False

    def throttled(self, backend: Backend, model: str | None, headers: Mapping[str, str]) -> None:
        """A 429: skip this backend for this model for as long as it asks, or the configured cooldown."""
        self.answered(backend)
        now = self.clock()
        seconds = retry_after(headers, self.wall())
        if seconds is None:
            seconds = self._failover.cooldown
        self._cooling = {key: until for key, until in self._cooling.items() if until > now}
        self._cooling[(backend.name, model)] = now + seconds
        health = self._health[backend.name]
        if now - health.throttle_logged < THROTTLE_LOG_INTERVAL:
            return
        health.throttle_logged = now
        log.warning(
            "backend %s (%s) answered 429 for %r: skipped for %.1f s",
            backend.name,
            backend.host,
            model or "a resource request",
            seconds,
        )

    def failed(self, backend: Backend) -> None:
        """A connect error, a timeout or a 5xx; enough of them in a row open the circuit."""
        health = self._health[backend.name]
        health.failures += 1
        health.probing = False
        if health.failures >= self._failover.circuit_failures:
            health.open_until = self.clock() + self._failover.circuit_open
            log.warning(
                "backend %s (%s) failed %d times in a row: circuit open for %.0f s",
                backend.name,
                backend.host,
                health.failures,
                self._failover.circuit_open,
            )

    def abandoned(self, backend: Backend) -> None:
        """The attempt ended without a verdict (the client left): a probe may be sent again."""
        self._health[backend.name].probing = False

    def _wait(self, backend: Backend, model: str | None, now: float) -> tuple[float, bool] | None:
        """None if the backend may be tried now, else (seconds left, whether a 429 is the cause)."""
        if not self._skips:
            return None
        until = self._cooling.get((backend.name, model))
        if until is not None and until > now:
            return until - now, True
        health = self._health[backend.name]
        if health.open_until is None:
            return None
        if health.open_until > now:
            return health.open_until - now, False
        return (1.0, False) if health.probing else None

    def _pick(self, eligible: Sequence[Backend]) -> Backend:
        """Smooth weighted round-robin (as nginx does it): weights 3:1 give exactly 3 of every 4, interleaved."""
        key = tuple(backend.name for backend in eligible)
        current = self._current.setdefault(key, dict.fromkeys(key, 0))
        total = 0
        best = eligible[0]
        for backend in eligible:
            current[backend.name] += backend.weight
            total += backend.weight
            if current[backend.name] > current[best.name]:
                best = backend
        current[best.name] -= total
        return best
