"""Forward-proxy arrivals: absolute-URI requests (HTTP_PROXY) and CONNECT (HTTPS_PROXY).

This middleware only decides how a request arrived and whether azproxy may serve it that way; what happens to
an admitted request is decided once, by the same pipeline that serves reverse requests.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from yarl import URL

from azproxy.access import basic_credentials
from azproxy.config import Mode, Settings
from azproxy.edge.tunnel import TunnelTarget, blind
from azproxy.errors import BadRequest, Forbidden, ProxyAuthRequired
from azproxy.pipeline import Handler, forward_plain
from azproxy.state import STATE, ProxyState


@web.middleware
async def forward_proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "CONNECT":
        await open_tunnel(request, request.app[STATE])
        return web.Response()  # never sent: the tunnel has taken the connection over
    state = request.app[STATE]
    tunnel = state.tunnels.tunnel_of(request)
    if tunnel is not None:
        _check_tunnel_host(request, tunnel.target)
        return await handler(request)
    target = absolute_target(request)
    if target is None:
        return await handler(request)  # reverse proxy: the common case, kept cheap
    check_proxy_auth(request, state.settings)
    host, port = (
        (target.host or "").lower(),
        target.explicit_port or (443 if target.scheme == "https" else 80),
    )
    if host in state.settings.forward.intercept_hosts:
        return await handler(request)
    if state.settings.forward.allows_tunnel(host, port):
        return await forward_plain(request, target.origin())
    raise Forbidden(f"azproxy does not relay requests to {host}:{port}.", code="forward_target_forbidden")


def absolute_target(request: web.Request) -> URL | None:
    """The absolute request-target of an HTTP_PROXY request, or None for an ordinary origin-form one.

    The parsed message knows (aiohttp 3.0 to master); `raw_path` kept the target up to 3.14 but not after.
    """
    url: URL = request._message.url
    if url.absolute and url.scheme in ("http", "https"):
        return url
    return None


async def open_tunnel(request: web.Request, state: ProxyState) -> None:
    """Intercept, tunnel blindly, or refuse a CONNECT, by the mode and the configured host lists."""
    settings = state.settings
    check_proxy_auth(request, settings)
    client = state.access.identify(request.headers)
    target = _connect_target(request)
    intercepted = target.host in settings.forward.intercept_hosts and target.port == 443
    if client is not None and client.rpm and not (intercepted and settings.mode is Mode.AZURE):
        await state.limiter.admit(client)  # a blind tunnel counts as one request: its content is unseen
    if settings.forward.allows_tunnel(target.host, target.port):
        await blind(request, await state.resolver.resolve(target.host, target.port))
    elif intercepted and settings.mode is Mode.AZURE:
        context = state.certificate_authority().context_for(target.host)
        await state.tunnels.intercept(request, target, context, client)
    elif intercepted:  # openai mode: the real api.openai.com, so only ever a public address
        await blind(request, await state.resolver.resolve(target.host, target.port, public_only=True))
    else:
        raise Forbidden(
            f"azproxy does not open tunnels to {target.host}:{target.port}.", code="tunnel_target_forbidden"
        )


def check_proxy_auth(request: web.Request, settings: Settings) -> None:
    """407 unless Proxy-Authorization carries the configured `user:password` (compared in constant time)."""
    expected = settings.forward.proxy_auth
    if expected is None:
        return
    offered = basic_credentials(request.headers) or ""
    if not hmac.compare_digest(offered.encode(), expected.reveal().encode()):
        raise ProxyAuthRequired("azproxy needs proxy credentials: Proxy-Authorization: Basic user:password.")


def _connect_target(request: web.Request) -> TunnelTarget:
    url: URL = request._message.url
    if not url.host or url.explicit_port is None:
        raise BadRequest("CONNECT needs a host:port target.", code="invalid_connect_target")
    return TunnelTarget(url.host.lower().rstrip("."), url.explicit_port)


def _check_tunnel_host(request: web.Request, tunnel: TunnelTarget) -> None:
    """Inside a tunnel to host H, every request must be for H: a Host header cannot redirect it elsewhere."""
    host, _, port = request.host.lower().partition(":")
    if host != tunnel.host or (port and int(port) != tunnel.port if port.isdigit() else bool(port)):
        raise BadRequest(
            f"The Host header {request.host!r} does not match the tunnel's target {tunnel.host}.",
            code="tunnel_host_mismatch",
        )
