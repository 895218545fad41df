"""One proxied request, top to bottom: edge → access → translate → upstream → relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from .backends import Backend
from .clients import Client
from .config import Mode, ResponseShape
from .edge.incoming import read_incoming
from .realtime import bridge
from .relay import UsageSink, relay
from .rewrite import Rewrite
from .state import STATE, ProxyState
from .translate import Plan, plan_request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    settings = state.settings
    incoming = await read_incoming(request, settings.limits.max_body)
    tunnel = state.tunnels.tunnel_of(request)
    client = state.access.identify(incoming.headers, tunnel.client if tunnel else None)
    plan = plan_request(incoming, settings.mode)
    state.access.check_model(client, plan.model)
    usage = await state.limiter.admit(client) if client is not None and (client.rpm or client.tpm) else None
    if plan.operation is not None and plan.operation.websocket:
        upstream_request = await state.upstream.prepare(plan, incoming)
        return await bridge(request, state.upstream.session, upstream_request.url, upstream_request.headers)
    rewrite = None
    if plan.operation is not None:
        rewrite = Rewrite(plan.model, settings.model_map, settings.response_shape is ResponseShape.OPENAI)
    upstream = await state.upstream.send(plan, incoming)
    return await relay(
        request,
        upstream,
        extra_headers=usage.headers() if usage is not None else None,
        on_usage=_charger(state, usage.client) if usage is not None and usage.client.tpm else None,
        rewrite=rewrite,
    )


async def forward_plain(request: web.Request, origin: URL) -> web.StreamResponse:
    """An allowlisted absolute-URI request, relayed unchanged to the host it names (after the same access
    control and request budget as every other request)."""
    state = request.app[STATE]
    incoming = await read_incoming(request, state.settings.limits.max_body)
    client = state.access.identify_by_proxy_key(incoming.headers)
    usage = await state.limiter.admit(client) if client is not None and client.rpm else None
    backend = Backend("forward", Mode.OPENAI, origin, state.settings.api_version, {})
    upstream = await state.upstream.send(Plan(None, None, None), incoming, backends=(backend,))
    return await relay(request, upstream, extra_headers=usage.headers() if usage is not None else None)


def _charger(state: ProxyState, client: Client) -> UsageSink:
    """Charges the tokens an answer reports to the client's per-minute budget."""

    async def charge(tokens: int) -> None:
        await state.limiter.charge(client, tokens)

    return charge
