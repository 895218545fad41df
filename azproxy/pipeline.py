"""One proxied request, top to bottom: edge (the arrival) → admission → translate → upstream → relay.

The pipeline dispatches on the arrival: a CONNECT opens a tunnel, a request for an allowlisted host is relayed
unchanged, everything else goes through the translator.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web
from yarl import URL

from .backends import Backend
from .clients import Client
from .config import Mode, ResponseShape
from .edge.arrival import Arrival, ArrivalKind, Passage, arrival_of
from .edge.incoming import read_incoming
from .edge.tunnel import blind
from .errors import Forbidden
from .realtime import bridge
from .relay import UsageReport, relay
from .rewrite import Rewrite
from .state import STATE, ProxyState
from .translate import IncomingRequest, Plan, plan_request, to_upstream
from .usage import Metered, TokenUsage

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def dispatch_by_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tunnels and requests for other hosts never reach azproxy's own routes (models, health, preflight)."""
    arrival = arrival_of(request)
    if arrival.kind is ArrivalKind.CONNECT or arrival.passage is not Passage.TRANSLATE:
        return await proxy(request)
    return await handler(request)


async def proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    arrival = arrival_of(request)
    client = state.admission.identify(arrival, request.headers)  # from the head: no body byte read yet
    if arrival.passage is Passage.REFUSE:
        raise _refusal(arrival)
    if arrival.kind is ArrivalKind.CONNECT:
        await _open_tunnel(request, state, arrival, client)
        return web.Response()  # never sent: the tunnel has taken the connection over
    incoming = await read_incoming(request, state.settings.limits.max_body)
    if arrival.passage is Passage.RELAY:
        return await _relay_unchanged(request, state, arrival, client, incoming)
    return await _translated(request, state, client, incoming)


async def _translated(
    request: web.Request, state: ProxyState, client: Client | None, incoming: IncomingRequest
) -> web.StreamResponse:
    settings = state.settings
    plan = plan_request(incoming, settings.mode, stream_usage=settings.stream_usage)
    admitted = await state.admission.admit(client, plan.model)
    translation = partial(to_upstream, plan, incoming)
    if plan.operation is not None and plan.operation.websocket:
        upstream_request = await state.upstream.prepare(translation)
        return await bridge(request, state.upstream.session, upstream_request.url, upstream_request.headers)
    rewrite = None
    if plan.operation is not None:
        rewrite = Rewrite(plan.model, settings.model_map, settings.response_shape is ResponseShape.OPENAI)
    upstream = await state.upstream.send(translation)
    return await relay(
        request,
        upstream,
        extra_headers=admitted.headers(),
        on_usage=_usage_report(state, client, plan.model),
        rewrite=rewrite,
        hide_stream_usage=plan.adds_stream_usage,
        prompt_bytes=len(incoming.body),
    )


async def _relay_unchanged(
    request: web.Request,
    state: ProxyState,
    arrival: Arrival,
    client: Client | None,
    incoming: IncomingRequest,
) -> web.StreamResponse:
    """An allowlisted absolute-URI request, relayed unchanged to the host it names."""
    assert arrival.origin is not None
    admitted = await state.admission.admit(client, None)
    backend = Backend("forward", Mode.OPENAI, URL(arrival.origin), state.settings.api_version, {})
    translation = partial(to_upstream, Plan(None, None, None), incoming)
    upstream = await state.upstream.send(translation, backends=(backend,))
    return await relay(
        request,
        upstream,
        extra_headers=admitted.headers(),
        on_usage=_usage_report(state, client, None),
        prompt_bytes=len(incoming.body),
    )


async def _open_tunnel(
    request: web.Request, state: ProxyState, arrival: Arrival, client: Client | None
) -> None:
    target = arrival.target
    assert target is not None
    if arrival.passage is Passage.RELAY:
        await state.admission.admit(
            client, None
        )  # a blind tunnel counts as one request: its content is unseen
        addresses = await state.resolver.resolve(target.host, target.port, public_only=arrival.public_only)
        await blind(request, addresses)
        return
    context = state.certificate_authority().context_for(target.host)
    await state.tunnels.intercept(request, arrival.inside_tunnel(client), context)


def _refusal(arrival: Arrival) -> Forbidden:
    if arrival.kind is ArrivalKind.CONNECT:
        return Forbidden(
            f"azproxy does not open tunnels to {arrival.target}.", code="tunnel_target_forbidden"
        )
    return Forbidden(f"azproxy does not relay requests to {arrival.target}.", code="forward_target_forbidden")


def _usage_report(state: ProxyState, client: Client | None, model: str | None) -> UsageReport:
    def report(usage: TokenUsage) -> None:
        state.usage.observe(Metered(client, model, usage))

    return report
