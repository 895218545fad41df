"""One proxied request, top to bottom: edge → translate → upstream → relay."""

from __future__ import annotations

from aiohttp import web

from .edge.incoming import read_incoming
from .relay import relay
from .state import STATE
from .translate import plan_request


async def proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    incoming = await read_incoming(request, state.settings.max_body)
    plan = plan_request(incoming, state.settings.mode)
    upstream = await state.upstream.send(plan, incoming)
    return await relay(request, upstream)
