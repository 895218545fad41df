"""`GET /readyz`: whether azproxy can serve now, for load balancers and orchestrators. Unlike `/healthz` (the
process is up), it answers 503 while azproxy drains after SIGTERM, and while every backend is cooling down
after a 429 or behind an open circuit."""

from __future__ import annotations

from aiohttp import web

from .listener import DRAINING
from .state import state_of


async def readyz(request: web.Request) -> web.Response:
    ready = not DRAINING.is_set() and state_of(request).upstream.router.ready()
    return web.json_response({"status": "ready" if ready else "unavailable"}, status=200 if ready else 503)
