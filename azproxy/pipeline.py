"""One proxied request, top to bottom: edge (the arrival) → admission → translate → upstream → relay.

The pipeline dispatches on the arrival: a CONNECT opens a tunnel, a request for an allowlisted host is relayed
unchanged, everything else goes through the translator.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Mapping
from functools import partial
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from . import parameters
from .access import Admission
from .backends import Backend
from .clients import Client
from .config import Mode, ResponseShape, Settings
from .edge.arrival import Arrival, ArrivalKind, Passage, arrival_of
from .edge.incoming import read_incoming
from .edge.tunnel import TAKEN_OVER, blind
from .errors import Forbidden
from .model_refs import check_indirect_models
from .observe import open_tunnel
from .operations import Scope
from .realtime import bridge, response_create_frames
from .record import RECORD, note_upstream
from .relay import UsageReport, decoded, read_whole, relay, replay
from .rewrite import Rewrite
from .routing import Target, target_of
from .state import ProxyState, state_of
from .tenancy import Watch
from .translate import (
    IncomingRequest,
    Plan,
    UpstreamRequest,
    deployment_for,
    plan_request,
    responses_socket,
    to_upstream,
)
from .upstream import Sent, Translation
from .usage import Metered, TokenUsage


@web.middleware
async def dispatch_by_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tunnels and requests for other hosts never reach azproxy's own routes (models, health, preflight)."""
    arrival = arrival_of(request)
    if arrival.kind is ArrivalKind.CONNECT or arrival.passage is not Passage.TRANSLATE:
        return await proxy(request)
    return await handler(request)


async def proxy(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    arrival = arrival_of(request)
    client = state.admission.identify(arrival, request.headers, request.remote)  # from the head: no body read
    record = request[RECORD]
    record.client = client.name if client is not None else None
    if arrival.passage is Passage.REFUSE:
        raise _refusal(arrival)
    if arrival.kind is ArrivalKind.CONNECT:
        with open_tunnel(request):
            await _open_tunnel(request, state, arrival, client)
        record.status = 200  # the tunnel was established; its own requests have records of their own
        return TAKEN_OVER
    incoming = await read_incoming(request, state.settings.limits.max_body)
    if arrival.passage is Passage.RELAY:
        return await _relay_unchanged(request, state, arrival, client, incoming)
    return await _translated(request, state, client, incoming)


async def _translated(
    request: web.Request, state: ProxyState, client: Client | None, incoming: IncomingRequest
) -> web.StreamResponse:
    settings = state.settings
    plan = plan_request(incoming, settings.mode, stream_usage=settings.stream_usage)
    record = request[RECORD]
    record.model = plan.model
    admitted = await state.admission.admit(client, plan.model)
    watch = await _tenancy(state, client, plan, incoming)
    if watch is not None:
        incoming = watch.incoming
    if client is not None:
        await check_indirect_models(state, client, plan, incoming)
    translation = partial(to_upstream, plan, incoming)
    target = target_of(plan, incoming.headers)
    if plan.operation is not None and plan.operation.websocket:
        upstream_request = await state.upstream.prepare(translation, target)
        return await bridge(request, state.upstream.session, upstream_request.url, upstream_request.headers)
    if plan.operation is not None and responses_socket(plan.operation, incoming):
        return await _responses_bridge(request, state, translation, target, client)
    rewrite = None
    if plan.operation is not None:
        rewrite = Rewrite(
            plan.model, settings.model_map, _shape_for(request, settings) is ResponseShape.OPENAI
        )
    waiting = time.monotonic()
    sent, adjusted = await _send_fixing_parameters(request, state, plan, translation, target)
    note_upstream(record, sent, plan.model, time.monotonic() - waiting)
    return await relay(
        request,
        sent.response,
        extra_headers={
            **(admitted.headers() or {}),
            **sent.headers(settings.failover.backend_headers),
            **adjusted,
        },
        on_usage=_usage_report(request, state, client, plan.model),
        rewrite=rewrite,
        hide_stream_usage=plan.adds_stream_usage,
        prompt_bytes=len(incoming.body),
        on_json_answer=watch.on_json_answer if watch is not None else None,
        on_events=watch.on_events if watch is not None else None,
    )


async def _tenancy(
    state: ProxyState, client: Client | None, plan: Plan, incoming: IncomingRequest
) -> Watch | None:
    """With client keys on, stored objects are their creator's: checked here before anything is sent; the
    watch records, forgets or filters from the answer. Deployment operations (chat, ...) skip it at once."""
    operation = plan.operation
    if state.tenancy is None or client is None or operation is None or operation.scope is not Scope.RESOURCE:
        return None
    return await state.tenancy.admit(client, operation, incoming)


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
    upstream = (await state.upstream.send(translation, backends=(backend,))).response
    return await relay(
        request,
        upstream,
        extra_headers=admitted.headers(),
        on_usage=_usage_report(request, state, client, None),
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
        record = request[RECORD]
        record.bytes_in, record.bytes_out = await blind(request, addresses)
        return
    context = state.certificate_authority().context_for(target.host)
    record = request[RECORD]
    record.bytes_in, record.bytes_out = await state.tunnels.intercept(
        request, arrival.inside_tunnel(client), context
    )


def _refusal(arrival: Arrival) -> Forbidden:
    if arrival.kind is ArrivalKind.CONNECT:
        return Forbidden(
            f"azproxy does not open tunnels to {arrival.target}.", code="tunnel_target_forbidden"
        )
    return Forbidden(f"azproxy does not relay requests to {arrival.target}.", code="forward_target_forbidden")


def _usage_report(
    request: web.Request, state: ProxyState, client: Client | None, model: str | None
) -> UsageReport:
    def report(usage: TokenUsage) -> None:
        request[RECORD].usage = usage
        state.usage.observe(Metered(client, model, usage))

    return report


#: The deployments' refused parameters each application learnt (ProxyState has no room for them).
_MEMORIES: weakref.WeakKeyDictionary[web.Application, parameters.ParameterMemory] = (
    weakref.WeakKeyDictionary()
)
#: The largest refusal read to learn which parameter it names; Azure's are a few hundred bytes.
_MAX_REFUSAL: Final = 64 * 1024


def _shape_for(request: web.Request, settings: Settings) -> ResponseShape:
    """Forward-proxy clients believe they talk to api.openai.com, so they get OpenAI's shape by default (in
    openai mode they do talk to it, and its answers are left alone)."""
    forward = arrival_of(request).kind in (ArrivalKind.FORWARD, ArrivalKind.TUNNEL)
    if forward and settings.mode is Mode.AZURE:
        return settings.forward_response_shape
    return settings.response_shape


async def _send_fixing_parameters(
    request: web.Request, state: ProxyState, plan: Plan, translation: Translation, target: Target
) -> tuple[Sent, Mapping[str, str]]:
    """Send; where a deployment refuses a parameter it can do without (see parameters.py), send again without
    it, once per parameter named and at most MAX_RETRIES times, before anything reached the client. What a
    deployment needed is remembered, so later requests are sent fixed. Returns the answer and its header
    naming the adjustments (empty when none)."""
    operation = plan.operation
    if not state.settings.fix_parameters or operation is None or operation.name != "chat/completions":
        return await state.upstream.send(translation, target), {}
    memory = _MEMORIES.setdefault(request.app, parameters.ParameterMemory())
    learnt: list[parameters.Adjustment] = []
    made: list[tuple[parameters.Adjustment, ...]] = [()]

    def fixed(backend: Backend, credential: Mapping[str, str] | None) -> UpstreamRequest:
        upstream_request = translation(backend, credential)
        if "Content-Encoding" in upstream_request.headers:
            return upstream_request  # sent exactly as the client compressed it: nothing to adjust in
        known = memory.get(backend.name, deployment_for(plan.model, backend))
        body, made[0] = parameters.apply(upstream_request.body, (*known, *learnt))
        return dataclasses.replace(upstream_request, body=body) if made[0] else upstream_request

    while True:
        sent = await state.upstream.send(fixed, target)
        refused = sent.response.status == 400 and len(learnt) < parameters.MAX_RETRIES
        try:
            adjustment = await _refused_parameter(sent) if refused else None
        except BaseException:
            sent.response.close()  # its body stalled or broke, or the client left: nobody will read it
            raise
        if adjustment is None or adjustment in learnt or adjustment in made[0]:
            break
        sent.response.release()
        learnt.append(adjustment)
        memory.remember(sent.backend.name, deployment_for(plan.model, sent.backend), adjustment)
    return sent, ({parameters.ADJUSTED_HEADER: parameters.header_value(made[0])} if made[0] else {})


async def _refused_parameter(sent: Sent) -> parameters.Adjustment | None:
    """The adjustment a small 400 answer asks for; the answer is read, and put back for the relay when none."""
    response = sent.response
    length = response.content_length
    if response.status != 400 or length is None or length > _MAX_REFUSAL:
        return None
    body, _ = await read_whole(response, _MAX_REFUSAL)  # a stall or a break is a 504 or 502, as in the relay
    encoding = response.headers.get("Content-Encoding")
    readable = decoded(body, encoding) if encoding else body
    adjustment = parameters.refused(response.status, readable) if readable is not None else None
    if adjustment is None:
        replay(response, body)
    return adjustment


def _allowed(client: Client | None, model: str) -> str:
    if client is not None:
        Admission.check_model(client, model)
    return model


async def _responses_bridge(
    request: web.Request, state: ProxyState, translation: Translation, target: Target, client: Client | None
) -> web.StreamResponse:
    """The Responses API over WebSocket: the model each `response.create` names is checked against the
    client's allowlist and becomes its deployment."""
    chosen: list[Backend] = []

    def recorded(backend: Backend, credential: Mapping[str, str] | None) -> UpstreamRequest:
        chosen.append(backend)
        return translation(backend, credential)

    upstream_request = await state.upstream.prepare(recorded, target)
    backend = chosen[-1]
    return await bridge(
        request,
        state.upstream.session,
        upstream_request.url,
        upstream_request.headers,
        client_frames=response_create_frames(lambda model: deployment_for(_allowed(client, model), backend)),
    )
