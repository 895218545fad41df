"""Builds the aiohttp application (routes, error middleware, start-up and clean-up) and runs it."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from . import mocks
from .backends import backends_from
from .config import Mode, Settings
from .edge.forward import forward_proxy
from .errors import ProxyError, error_response, from_http_exception
from .pipeline import Handler, proxy
from .resolver import Resolver
from .state import STATE, ProxyState
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


def build_app(settings: Settings, resolver: Resolver | None = None) -> web.Application:
    """The whole proxy as one aiohttp app; `resolver` lets tests map public host names to loopback."""
    resolver = resolver or Resolver()
    app = web.Application(client_max_size=settings.max_body, middlewares=[openai_errors, forward_proxy])
    upstream = UpstreamClient(backends_from(settings), settings.timeouts, resolver)
    app[STATE] = ProxyState(settings, upstream, resolver)
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
    """Every error azproxy produces leaves in OpenAI's shape, never as a traceback or an HTML page."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return exc.to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "azproxy failed on this request; the log has the details.", "server_error")


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    upstream = app[STATE].upstream
    await upstream.start()
    yield
    await upstream.close()


async def _allow_any_origin(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"


async def _health(_request: web.Request) -> web.Response:
    return mocks.health()


async def _preflight(request: web.Request) -> web.Response:
    return mocks.preflight(request)


async def _list_models(request: web.Request) -> web.Response:
    return mocks.list_models(request.app[STATE].settings.model_map)


async def _get_model(request: web.Request) -> web.Response:
    return mocks.get_model(request.app[STATE].settings.model_map, request.match_info["model_id"])


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, on uvloop where it is installed."""
    scheme = "https" if settings.tls_cert else "http"
    web.run_app(
        build_app(settings),
        host=settings.address.host,
        port=settings.address.port,
        ssl_context=tls_context(settings),
        loop=new_event_loop(),
        handler_cancellation=True,
        access_log=logging.getLogger("azproxy.access") if settings.access_log else None,
        print=lambda _: log.info(
            "azproxy %s mode listening on %s://%s", settings.mode, scheme, settings.address
        ),
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's own TLS (AZPROXY_TLS_CERT/KEY), so clients can reach azproxy itself over HTTPS."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def start_server(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Start `app` inside a running loop (demo, emulator, tests); returns the runner and the bound port."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port: int = runner.addresses[0][1]
    return runner, bound_port


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed: the same code, roughly twice the requests per CPU second."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
