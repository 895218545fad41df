"""One proxied request, top to bottom: edge → translate → upstream → relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from .backends import Backend
from .config import Mode
from .edge.incoming import read_incoming
from .relay import relay
from .state import STATE
from .translate import Plan, plan_request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    incoming = await read_incoming(request, state.settings.max_body)
    plan = plan_request(incoming, state.settings.mode)
    upstream = await state.upstream.send(plan, incoming)
    return await relay(request, upstream)


async def forward_plain(request: web.Request, origin: URL) -> web.StreamResponse:
    """An allowlisted absolute-URI request, relayed unchanged to the host it names."""
    state = request.app[STATE]
    incoming = await read_incoming(request, state.settings.max_body)
    backend = Backend("forward", Mode.OPENAI, origin, state.settings.api_version, {})
    upstream = await state.upstream.send(Plan(None, None, None), incoming, backends=(backend,))
    return await relay(request, upstream)
