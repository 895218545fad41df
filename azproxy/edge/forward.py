"""The edge: tells how each request arrived (reverse, absolute-URI, CONNECT, inside an intercepted tunnel) and
attaches that as one `Arrival`, once per request.

It decides nothing else: who the client is and whether it may be served is admission's job, what is sent
where the pipeline's.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from azproxy.config import ForwardProxy, Mode, Settings
from azproxy.edge.aiohttp_seam import request_target
from azproxy.edge.arrival import ARRIVAL, REVERSE, Arrival, ArrivalKind, Passage, Target
from azproxy.edge.tunnel import Tunnels
from azproxy.errors import BadRequest
from azproxy.state import SNAPSHOT, STATE

log = logging.getLogger(__name__)


@web.middleware
async def attach_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Also pins the configuration snapshot the whole request is served with (`state_of`), until its handler is
    done: a reload meanwhile changes nothing for it, and its snapshot's upstream pool stays open for it."""
    live = request.app[STATE]
    state = request[SNAPSHOT] = live.pin()
    try:
        request[ARRIVAL] = arrival_of(request, state.settings, state.tunnels)
        return await handler(request)
    finally:
        live.unpin(state)


def arrival_of(request: web.Request, settings: Settings, tunnels: Tunnels) -> Arrival:
    if request.method == "CONNECT":
        return _connect(request, settings)
    tunnel = tunnels.arrival_for(request.protocol)
    if tunnel is not None:
        _check_tunnel_host(request, tunnel)
        return tunnel
    url = request_target(request)
    if not url.absolute or url.scheme not in ("http", "https"):
        return REVERSE  # the common case, kept cheap
    return _forward(url, settings.forward)


def _forward(url: URL, forward: ForwardProxy) -> Arrival:
    """An HTTP_PROXY request: intercepted hosts are translated, allowlisted ones relayed, others refused."""
    target = Target(
        (url.host or "").lower().rstrip("."), url.explicit_port or (443 if url.scheme == "https" else 80)
    )
    if target.host in forward.intercept_hosts:
        passage = Passage.TRANSLATE
    elif forward.allows_tunnel(target.host, target.port):
        passage = Passage.RELAY
    else:
        passage = Passage.REFUSE
    return Arrival(ArrivalKind.FORWARD, passage, target, origin=str(url.origin()))


def _connect(request: web.Request, settings: Settings) -> Arrival:
    """An HTTPS_PROXY tunnel: allowlisted targets blind, intercepted hosts ended here (azure mode) or blind to
    the real host at public addresses only (openai mode), the built-in hosts SDKs and tokenizers fetch from
    blind at public addresses only, others refused (logged, with the setting that would allow them)."""
    url = request_target(request)
    if not url.host or url.explicit_port is None:
        raise BadRequest("CONNECT needs a host:port target.", code="invalid_connect_target")
    target = Target(url.host.lower().rstrip("."), url.explicit_port)
    forward = settings.forward
    intercepted = target.host in forward.intercept_hosts and target.port == 443
    if forward.allows_tunnel(target.host, target.port):
        return Arrival(ArrivalKind.CONNECT, Passage.RELAY, target)
    if intercepted and settings.mode is Mode.AZURE:
        return Arrival(ArrivalKind.CONNECT, Passage.TRANSLATE, target)
    if intercepted or forward.allows_public_tunnel(target.host, target.port):
        return Arrival(ArrivalKind.CONNECT, Passage.RELAY, target, public_only=True)
    log.info("refused a tunnel to %s; AZPROXY_TUNNEL_ALLOW=%s would allow it", target, target)
    return Arrival(ArrivalKind.CONNECT, Passage.REFUSE, target)


def _check_tunnel_host(request: web.Request, tunnel: Arrival) -> None:
    """Inside a tunnel to host H, every request must be for H: a Host header cannot redirect it elsewhere."""
    assert tunnel.target is not None
    host, _, port = request.host.lower().partition(":")
    port_matches = not port or (port.isascii() and port.isdigit() and int(port) == tunnel.target.port)
    if host != tunnel.target.host or not port_matches:
        raise BadRequest(
            f"The Host header {request.host!r} does not match the tunnel's target {tunnel.target.host}.",
            code="tunnel_host_mismatch",
        )
