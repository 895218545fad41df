"""One proxied request, top to bottom: edge → access → translate → upstream → relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from .backends import Backend
from .clients import Client
from .config import Mode
from .edge.incoming import read_incoming
from .relay import UsageSink, relay
from .state import STATE, ProxyState
from .translate import Plan, plan_request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    incoming = await read_incoming(request, state.settings.limits.max_body)
    tunnel = state.tunnels.tunnel_of(request)
    client = state.access.identify(incoming.headers, tunnel.client if tunnel else None)
    plan = plan_request(incoming, state.settings.mode)
    state.access.check_model(client, plan.model)
    if client is None or not (client.rpm or client.tpm):
        return await relay(request, await state.upstream.send(plan, incoming))
    usage = await state.limiter.admit(client)
    on_usage = _charger(state, client) if client.tpm else None
    upstream = await state.upstream.send(plan, incoming)
    return await relay(request, upstream, extra_headers=usage.headers(), on_usage=on_usage)


async def forward_plain(request: web.Request, origin: URL) -> web.StreamResponse:
    """An allowlisted absolute-URI request, relayed unchanged to the host it names."""
    state = request.app[STATE]
    incoming = await read_incoming(request, state.settings.limits.max_body)
    backend = Backend("forward", Mode.OPENAI, origin, state.settings.api_version, {})
    upstream = await state.upstream.send(Plan(None, None, None), incoming, backends=(backend,))
    return await relay(request, upstream)


def _charger(state: ProxyState, client: Client) -> UsageSink:
    """Charges the tokens an answer reports to the client's per-minute budget."""

    async def charge(tokens: int) -> None:
        await state.limiter.charge(client, tokens)

    return charge
