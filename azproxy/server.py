"""Builds the aiohttp application (routes, error middleware, start-up and clean-up) and runs it."""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from . import mocks
from .access import client_key
from .accesslog import AccessLog
from .backends import backends_from
from .clients import find_client
from .config import LogFormat, Mode, Settings
from .credentials import Credential
from .edge.aiohttp_seam import answer_started
from .edge.arrival import ArrivalKind, arrival_of
from .edge.forward import attach_arrival
from .errors import ProxyError, Unauthorized, error_response, from_http_exception
from .logs import protect_server_log
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import METRICS, Metrics
from .observe import mark_answer, observe_requests
from .pipeline import dispatch_by_arrival, proxy
from .ratelimit import MemoryCounters, RateLimiter, RedisCounters
from .readiness import readyz
from .record import RECORD
from .resolver import Resolver
from .state import STATE, LiveState, ProxyState, state_of
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


def build_app(
    settings: Settings,
    resolver: Resolver | None = None,
    credential: Credential | None = None,
    *,
    metrics_dir: Path | None = None,
) -> web.Application:
    """The whole proxy as one aiohttp app. `resolver` lets tests map public host names to loopback;
    `credential` replaces the one settings name (an embedding program's own Entra credential, a test's)."""
    resolver = resolver or Resolver()
    protect_server_log()
    metrics = Metrics(metrics_dir) if settings.metrics else None
    as_json = settings.log_format is LogFormat.JSON or (
        settings.log_format is LogFormat.AUTO and not sys.stdout.isatty()
    )
    observe = observe_requests(AccessLog(enabled=settings.access_log, as_json=as_json), metrics)
    app = web.Application(
        client_max_size=settings.limits.max_body,
        middlewares=[observe, openai_errors, attach_arrival, check_browser, dispatch_by_arrival],
    )
    if metrics is not None:
        app[METRICS] = metrics
    counters = RedisCounters(settings.access.redis_url) if settings.access.redis_url else MemoryCounters()
    app[STATE] = LiveState(_snapshot(settings, resolver, credential, metrics, RateLimiter(counters)))
    app.cleanup_ctx.append(_upstream_pool)
    app.on_response_prepare.append(browser_headers)
    app.on_response_prepare.append(mark_answer(metrics))
    _add_routes(app, settings)
    return app


async def reload_app(app: web.Application, settings: Settings) -> None:
    """New requests use `settings` from now on; those under way finish on the snapshot they pinned. What cannot
    change without a restart (the listener, the routes, the CA) the caller has already kept at its old value.
    Credentials come from `settings`: one handed to `build_app` is not reused."""
    live = app[STATE]
    old = live.current
    await live.swap(_snapshot(settings, old.resolver, None, app.get(METRICS), old.limiter, old))


def _snapshot(
    settings: Settings,
    resolver: Resolver,
    credential: Credential | None,
    metrics: Metrics | None,
    limiter: RateLimiter,
    previous: ProxyState | None = None,
) -> ProxyState:
    """One configuration's state: a pool of its own for its backends, the rest kept from `previous`."""
    exempt = frozenset(target.host for target in settings.forward.tunnel_allow)
    upstream = UpstreamClient(
        backends_from(settings, credential),
        settings.timeouts,
        resolver.for_connector(settings.strict_endpoints, exempt),
        settings.failover,
    )
    if metrics is not None:
        upstream.on_attempt = metrics.count_attempt
    return ProxyState(settings, upstream, resolver, limiter, previous)


def _add_routes(app: web.Application, settings: Settings) -> None:
    router = app.router
    for path in ("/healthz", "/health"):
        router.add_get(path, _health, allow_head=True)
    router.add_route("HEAD", "/", _health)
    router.add_route("OPTIONS", "/{tail:.*}", _preflight)
    if settings.metrics and settings.metrics_address is None:
        router.add_get("/metrics", _metrics)
    if settings.mode is Mode.AZURE:
        for prefix in ("/v1", ""):
            router.add_get(f"{prefix}/models", _list_models)
            router.add_get(prefix + "/models/{model_id:.+}", _get_model)
    router.add_get("/readyz", readyz, allow_head=True)
    router.add_route("*", "/{tail:.*}", proxy)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error azproxy produces leaves in OpenAI's shape, never as a traceback or an HTML page; once an
    answer has started, an error cannot become a second one (aiohttp then closes the connection)."""
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        if answer_started(request):
            raise
        if isinstance(exc, ProxyError):
            record = request.get(RECORD)
            if record is not None:
                record.error = exc.code
            return exc.to_response()
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise
            return from_http_exception(exc)
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "azproxy failed on this request; the log has the details.", "server_error")


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    live = app[STATE]
    await live.current.upstream.start()
    yield
    await live.close()


@web.middleware
async def check_browser(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuses foreign Host names and origins azproxy does not answer, right after the edge named the arrival
    and before admission: nothing of such a request is read or sent. Forward-proxy arrivals name their target
    in the request line, so only reverse ones have a Host to check."""
    state_of(request).browser.check(request.headers, reverse=arrival_of(request).kind is ArrivalKind.REVERSE)
    return await handler(request)


_CORS_ANSWER: Final = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Private-Network",
)


async def browser_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer's CORS headers come from the request's browser policy, whatever an upstream sent, and its
    Server header names no Python or aiohttp version."""
    headers = response.headers
    headers["Server"] = "azproxy"
    cors = state_of(request).browser.cors_headers(request.headers)
    if "Access-Control-Allow-Origin" not in cors:
        for name in _CORS_ANSWER:
            headers.popall(name, None)
    for name, value in cors.items():
        if name == "Vary":
            vary = headers.get("Vary")
            if vary is None or "origin" not in vary.lower():
                headers["Vary"] = f"{vary}, {value}" if vary else value
        else:
            headers[name] = value


async def _health(_request: web.Request) -> web.Response:
    return mocks.health()


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus' text format; with client keys configured, only for AZPROXY_METRICS_KEY or a client key."""
    settings = state_of(request).settings
    if settings.access.clients:
        key = client_key(request.headers) or ""
        expected = settings.metrics_key
        allowed = (
            hmac.compare_digest(key.encode(), expected.reveal().encode())
            if expected is not None
            else bool(key) and find_client(settings.access.clients, key) is not None
        )
        if not allowed:
            raise Unauthorized(
                "/metrics needs a key: AZPROXY_METRICS_KEY or a client key, as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )
    return await _render_metrics(request.app)


def metrics_app(proxy: web.Application) -> web.Application:
    """`/metrics` alone, for AZPROXY_METRICS_ADDRESS: the proxy app's metrics on a listener of their own
    (typically loopback, so no key is asked for)."""

    async def serve(_request: web.Request) -> web.Response:
        return await _render_metrics(proxy)

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return app


async def _render_metrics(proxy: web.Application) -> web.Response:
    metrics = proxy[METRICS]
    for backend, available in proxy[STATE].upstream.router.availability().items():
        metrics.available.labels(backend).set(1 if available else 0)
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _preflight(request: web.Request) -> web.Response:
    return mocks.preflight(request)


async def _list_models(request: web.Request) -> web.Response:
    return mocks.list_models(await _visible_models(request))


async def _get_model(request: web.Request) -> web.Response:
    return mocks.get_model(await _visible_models(request), request.match_info["model_id"])


async def _visible_models(request: web.Request) -> dict[str, str]:
    """The mapper's models and the deployments Azure reports or, for a client with a model allowlist, exactly
    the models it may use."""
    state = state_of(request)
    client = state.admission.identify(arrival_of(request), request.headers, request.remote)
    model_map = state.settings.model_map
    if client is not None and client.models is not None:
        return {model: model_map.get(model, model) for model in sorted(client.models)}
    own_key = None if state.admission.enabled else client_key(request.headers)
    reported = await state.listing.deployments(own_key)
    return dict(model_map) | {name: name for name in reported if name not in model_map}


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's own TLS (AZPROXY_TLS_CERT/KEY), so clients can reach azproxy itself over HTTPS."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed: the same code, roughly twice the requests per CPU second."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
