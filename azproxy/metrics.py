"""Prometheus metrics, made with prometheus-client, observed from each finished request's record.

azproxy's own names, and the OpenTelemetry GenAI semantic conventions' client metrics in Prometheus form
(`gen_ai.client.token.usage` → `gen_ai_client_token_usage`, `gen_ai.client.operation.duration` →
`gen_ai_client_operation_duration_seconds`, attributes with dots as underscores, provider `azure.ai.openai`).
With several worker processes, prometheus-client's multi-process mode (a directory every worker writes to)
makes `/metrics` report the whole server, whichever worker answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from .record import RequestRecord

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
PROVIDER: Final = "azure.ai.openai"
#: Latency buckets from a millisecond (azproxy's own overhead) to minutes (long streams).
_SECONDS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: OpenTelemetry's recommended buckets for gen_ai.client.token.usage.
_TOKENS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
#: OpenAI path → gen_ai.operation.name.
_OPERATIONS: Final = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}

#: Distinct model names counted under their own label: past this many, and until a request for it succeeded, a
#: name counts as `other`, so a client naming random models cannot grow the registry (and `/metrics`) without
#: bound nor use up the places of real ones.
MAX_MODELS: Final = 1000
OTHER_MODEL: Final = "other"

AvailableBackends = Callable[[], Iterable[tuple[str, bool]]]


class Metrics:
    """One registry per process; `multiprocess_dir` (the same for every worker) aggregates the workers."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            # prometheus-client picks its value class when imported; a worker switches it to the shared files
            # (in PROMETHEUS_MULTIPROC_DIR, which the command line set before any worker started).
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        registry = self.registry = CollectorRegistry(auto_describe=True)
        #: Labelled children by (metric, *label values): prometheus-client's labels() costs more than the
        #: increment it leads to, on every request.
        self._children: dict[tuple[object, ...], Any] = {}
        self._models: set[str] = set()
        self.requests = Counter(
            "azproxy_requests",
            "Requests answered.",
            ("arrival", "model", "backend", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "azproxy_request_duration_seconds",
            "From the request head to the end of the answer.",
            ("model", "backend"),
            buckets=_SECONDS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "azproxy_time_to_first_byte_seconds",
            "From the request head to the first byte of the answer sent.",
            ("model", "backend"),
            buckets=_SECONDS,
            registry=registry,
        )
        self.tokens = Counter(
            "azproxy_tokens",
            "Tokens used, as backends reported them.",
            ("model", "client", "type"),
            registry=registry,
        )
        self.attempts = Counter(
            "azproxy_upstream_attempts",
            "Requests sent to backends, by outcome.",
            ("backend", "outcome"),
            registry=registry,
        )
        self.failovers = Counter(
            "azproxy_failovers", "Requests that needed more than one backend.", ("model",), registry=registry
        )
        self.available = Gauge(
            "azproxy_backend_available",
            "1 while a backend takes requests, 0 while it cools down or its circuit is open.",
            ("backend",),
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.open_streams = Gauge(
            "azproxy_open_streams", "Streams being relayed.", registry=registry, multiprocess_mode="livesum"
        )
        self.open_tunnels = Gauge(
            "azproxy_open_tunnels", "CONNECT tunnels open.", registry=registry, multiprocess_mode="livesum"
        )
        self.overhead = Histogram(
            "azproxy_overhead_seconds",
            "Time spent in azproxy itself: the whole request less the time waiting for backends.",
            buckets=_SECONDS,
            registry=registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per operation (OpenTelemetry GenAI gen_ai.client.token.usage).",
            ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"),
            buckets=_TOKENS,
            registry=registry,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of GenAI operations (OpenTelemetry GenAI gen_ai.client.operation.duration).",
            ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"),
            buckets=_SECONDS,
            registry=registry,
        )

    def observe(self, record: RequestRecord, duration: float) -> None:
        """Counts one finished request."""
        model, backend = self._model_label(record.model or "", record.status), record.backend or ""
        child = self._child
        child(self.requests, record.arrival, model, backend, str(record.status or 0)).inc()
        child(self.duration, model, backend).observe(duration)
        if record.ttfb is not None:
            child(self.ttfb, model, backend).observe(record.ttfb)
        self.overhead.observe(max(duration - record.upstream_wait, 0.0))
        if record.attempts > 1:
            child(self.failovers, model).inc()
        usage, client = record.usage, record.client or ""
        for kind, tokens in (("input", usage.prompt), ("output", usage.completion)):
            if tokens:
                child(self.tokens, model, client, kind).inc(tokens)
        operation = _OPERATIONS.get(record.path.removeprefix("/v1/").lstrip("/"))
        if operation is None or record.model is None:
            return
        child(self.operation_duration, operation, PROVIDER, model).observe(duration)
        for kind, tokens in (("input", usage.prompt), ("output", usage.completion)):
            if tokens is not None:
                child(self.token_usage, operation, PROVIDER, model, kind).observe(tokens)

    def count_attempt(self, backend: str, outcome: str) -> None:
        self._child(self.attempts, backend, outcome).inc()

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _model_label(self, model: str, status: int | None) -> str:
        """A model counts under its own name once a request for it succeeded: names that only ever met a 403 or
        404 (a client trying random ones) never take one of the MAX_MODELS places."""
        if model in self._models:
            return model
        if status is None or status >= 400 or len(self._models) >= MAX_MODELS:
            return OTHER_MODEL
        self._models.add(model)
        return model

    def render(self) -> bytes:
        """The text exposition of the whole server."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=str(self._multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(combined)


METRICS: Final = web.AppKey("azproxy_metrics", Metrics)


def forget_worker_metrics(directory: Path, pid: int) -> None:
    """A worker that ended no longer counts in the live gauges (open streams and tunnels, availability)."""
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
