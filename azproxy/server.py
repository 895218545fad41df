"""Builds the aiohttp application (routes, error middleware, start-up and clean-up) and runs it."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from . import mocks
from .access import client_key
from .backends import backends_from
from .config import Mode, Settings
from .credentials import Credential
from .edge.aiohttp_seam import answer_started
from .edge.arrival import arrival_of
from .edge.forward import attach_arrival
from .errors import ProxyError, error_response, from_http_exception
from .listener import start_server
from .logs import protect_server_log
from .pipeline import Handler, dispatch_by_arrival, proxy
from .ratelimit import MemoryCounters, RateLimiter, RedisCounters
from .resolver import Resolver
from .state import STATE, ProxyState
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


def build_app(
    settings: Settings, resolver: Resolver | None = None, credential: Credential | None = None
) -> web.Application:
    """The whole proxy as one aiohttp app. `resolver` lets tests map public host names to loopback;
    `credential` replaces the one settings name (an embedding program's own Entra credential, a test's)."""
    resolver = resolver or Resolver()
    protect_server_log()
    app = web.Application(
        client_max_size=settings.limits.max_body,
        middlewares=[openai_errors, attach_arrival, dispatch_by_arrival],
    )
    exempt = frozenset(target.host for target in settings.forward.tunnel_allow)
    upstream = UpstreamClient(
        backends_from(settings, credential),
        settings.timeouts,
        resolver.for_connector(settings.strict_endpoints, exempt),
    )
    counters = RedisCounters(settings.access.redis_url) if settings.access.redis_url else MemoryCounters()
    app[STATE] = ProxyState(settings, upstream, resolver, RateLimiter(counters))
    app.cleanup_ctx.append(_upstream_pool)
    app.on_response_prepare.append(_allow_any_origin)
    _add_routes(app, settings)
    return app


def _add_routes(app: web.Application, settings: Settings) -> None:
    router = app.router
    for path in ("/healthz", "/health"):
        router.add_get(path, _health, allow_head=True)
    router.add_route("HEAD", "/", _health)
    router.add_route("OPTIONS", "/{tail:.*}", _preflight)
    if settings.mode is Mode.AZURE:
        for prefix in ("/v1", ""):
            router.add_get(f"{prefix}/models", _list_models)
            router.add_get(prefix + "/models/{model_id:.+}", _get_model)
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
            return exc.to_response()
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise
            return from_http_exception(exc)
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "azproxy failed on this request; the log has the details.", "server_error")


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.upstream.start()
    yield
    await state.upstream.close()
    await state.limiter.close()


async def _allow_any_origin(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"


async def _health(_request: web.Request) -> web.Response:
    return mocks.health()


async def _preflight(request: web.Request) -> web.Response:
    return mocks.preflight(request)


async def _list_models(request: web.Request) -> web.Response:
    return mocks.list_models(await _visible_models(request))


async def _get_model(request: web.Request) -> web.Response:
    return mocks.get_model(await _visible_models(request), request.match_info["model_id"])


async def _visible_models(request: web.Request) -> dict[str, str]:
    """The mapper's models and the deployments Azure reports or, for a client with a model allowlist, exactly
    the models it may use."""
    state = request.app[STATE]
    client = state.admission.identify(arrival_of(request), request.headers)
    model_map = state.settings.model_map
    if client is not None and client.models is not None:
        return {model: model_map.get(model, model) for model in sorted(client.models)}
    own_key = None if state.admission.enabled else client_key(request.headers)
    reported = await state.listing.deployments(own_key)
    return dict(model_map) | {name: name for name in reported if name not in model_map}


def run(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, on uvloop where it is installed."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve_until_stopped(settings))


async def _serve_until_stopped(settings: Settings) -> None:
    if settings.access.allow_anonymous and settings.has_server_credential and not settings.access.clients:
        log.warning(
            "AZPROXY_ALLOW_ANONYMOUS=true: anyone who reaches %s spends this Azure credential",
            settings.address,
        )
    access_log = logging.getLogger("azproxy.access") if settings.access_log else None
    app_runner, _ = await start_server(
        build_app(settings),
        settings.address.host,
        settings.address.port,
        settings.limits,
        ssl_context=tls_context(settings),
        access_log=access_log,
        trusted_proxies=settings.access.trusted_proxies,
    )
    scheme = "https" if settings.tls_cert else "http"
    log.info("azproxy %s mode listening on %s://%s", settings.mode, scheme, settings.address)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
        log.info("stopping: finishing requests under way")
    finally:
        await app_runner.cleanup()


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
