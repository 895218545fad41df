"""The Realtime API's WebSocket plumbing: one client socket bridged frame for frame to one Azure socket.

The translator decides where the upstream socket goes and how it authenticates; this module only connects it,
upgrades the client, relays TEXT and BINARY frames both ways in order, and carries the close code across.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Final

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from . import bodies
from .errors import ProxyError, error_response
from .headers import KEY_SUBPROTOCOL

#: Realtime frames carry base64 audio; 16 MiB holds any event OpenAI documents with room to spare.
MAX_FRAME: Final = 16 * 1024 * 1024
#: Pings every 30 s find half-open connections on either side that TCP alone would keep for hours.
HEARTBEAT: Final = 30.0
#: How long a close handshake may take before the connection is dropped anyway.
CLOSE_TIMEOUT: Final = 5.0
#: The subprotocol browsers offer; they fail a handshake that selects none of their offers.
SUBPROTOCOL: Final = "realtime"

_WS_SCHEMES: Final = {"http": "ws", "https": "wss"}
#: Codes an endpoint may put in a Close frame; 1006 only ever describes a connection that died without one.
_SENDABLE: Final = frozenset(WSCloseCode) - {WSCloseCode.ABNORMAL_CLOSURE}

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


#: Rewrites a client's text frame on its way upstream (Responses' `response.create` names its model).
FrameRewrite = Callable[[str], str]


class RefusedFrame(Exception):
    """Raised by a FrameRewrite for a frame that must not go on: `answer` goes back to the sender instead."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.answer = answer


async def bridge(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstream_url: URL,
    upstream_headers: Mapping[str, str],
    *,
    client_frames: FrameRewrite | None = None,
) -> web.StreamResponse:
    """Connect upstream first, so a refusal still reaches the client as an HTTP error; then upgrade and relay.

    `client_frames` rewrites each text frame the client sends; every other frame crosses byte for byte."""
    protocols = _answerable(request)
    if protocols is None:
        message = f"Offer the '{SUBPROTOCOL}' WebSocket subprotocol next to the key."
        return error_response(400, message, "invalid_request_error", "invalid_subprotocol")
    client = web.WebSocketResponse(
        protocols=protocols,
        timeout=CLOSE_TIMEOUT,
        autoping=True,
        heartbeat=HEARTBEAT,
        max_msg_size=MAX_FRAME,
    )
    if not client.can_prepare(request).ok:
        return error_response(
            400, "This endpoint needs a WebSocket upgrade.", "invalid_request_error", "websocket_required"
        )
    try:
        upstream = await session.ws_connect(
            upstream_url.with_scheme(_WS_SCHEMES.get(upstream_url.scheme, upstream_url.scheme)),
            headers=upstream_headers,
            autoping=True,
            heartbeat=HEARTBEAT,
            max_msg_size=MAX_FRAME,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
        )
    except aiohttp.WSServerHandshakeError as exc:
        return _refused(exc)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return error_response(
            502,
            f"The realtime backend could not be reached ({type(exc).__name__}).",
            "upstream_error",
            "upstream_unreachable",
        )
    try:
        await client.prepare(request)
        await _relay(client, upstream, client_frames)
    finally:
        await upstream.close(code=WSCloseCode.GOING_AWAY)
    return client


def _answerable(request: web.Request) -> tuple[str, ...] | None:
    """The subprotocol to select: `realtime` if offered, else the first offer that is no key; None if only keys.

    aiohttp logs every offer when none is selectable, so an offer of keys alone is refused before that happens.
    """
    offers = [offer.strip() for offer in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")]
    selectable = [offer for offer in offers if offer and not offer.startswith(KEY_SUBPROTOCOL)]
    if SUBPROTOCOL in selectable:
        return (SUBPROTOCOL,)
    if selectable or not any(offers):
        return tuple(selectable[:1])
    return None


def _refused(exc: aiohttp.WSServerHandshakeError) -> web.Response:
    """Azure's refusal keeps its status (its body is gone by now); anything but 4xx/5xx is a broken backend."""
    retry = {
        name: exc.headers[name]
        for name in ("retry-after", "retry-after-ms")
        if exc.headers and name in exc.headers
    }
    if 400 <= exc.status < 600:
        error_type = "invalid_request_error" if exc.status < 500 else "upstream_error"
        message = f"The realtime backend refused the connection (HTTP {exc.status})."
        return error_response(exc.status, message, error_type, str(exc.status), headers=retry)
    message = f"The realtime backend answered the upgrade with HTTP {exc.status}: {exc.message}."
    return error_response(502, message, "upstream_error", "upstream_bad_handshake")


async def _relay(
    client: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    client_frames: FrameRewrite | None = None,
) -> None:
    """Pump both ways until either side closes, then close the other with the same code when it may be sent.

    Closing a socket ends the pump reading it (aiohttp wakes a pending receive); whatever the other pump still
    holds had nowhere left to go, so cancelling it loses nothing.
    """
    pumps = (
        asyncio.create_task(_pump(client, upstream, client_frames)),
        asyncio.create_task(_pump(upstream, client)),
    )
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        try:
            await _close(upstream, client.close_code, WSCloseCode.GOING_AWAY)
            await _close(client, upstream.close_code, WSCloseCode.BAD_GATEWAY)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(source: Socket, sink: Socket, rewrite: FrameRewrite | None = None) -> None:
    """One direction, one frame at a time: awaiting each send is the back-pressure."""
    async for message in source:
        if message.type is WSMsgType.TEXT:
            try:
                await sink.send_str(rewrite(message.data) if rewrite is not None else message.data)
            except RefusedFrame as refused:
                await source.send_str(refused.answer)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is WSMsgType.ERROR:
            return


async def _close(socket: Socket, code: int | None, fallback: WSCloseCode) -> None:
    """Close with the peer's code (a Close without one counts as 1000); a socket already closed ignores this."""
    if code == 0:
        code = WSCloseCode.OK
    elif code is None or not (code in _SENDABLE or 3000 <= code <= 4999):
        code = fallback
    await socket.close(code=code)


def response_create_frames(deployment_of: Callable[[str], str]) -> FrameRewrite:
    """For the Responses API over WebSocket: each `response.create` event's `model` (top level, or in a nested
    `response` object) becomes the deployment `deployment_of` maps it to; every other frame, and every other
    byte of those, as sent. A frame that is no such event passes unchanged (Azure answers it with its own error
    event); one whose model `deployment_of` refuses (not allowed, not a deployment name) never reaches Azure:
    the client gets an `error` event in Azure's shape instead."""

    def rewrite(frame: str) -> str:
        if '"response.create"' not in frame:
            return frame
        try:
            event = json.loads(frame)
        except (ValueError, RecursionError):
            return frame
        if not isinstance(event, dict) or event.get("type") != "response.create":
            return frame
        nested = event.get("response")
        model = event.get("model")
        try:
            if isinstance(model, str):
                frame = bodies.replace_json_model(frame.encode(), deployment_of(model)).decode()
            if isinstance(nested, dict) and isinstance(nested.get("model"), str):
                deployment = deployment_of(nested["model"])
                frame = bodies.replace_nested_model(frame.encode(), "response", deployment).decode()
        except ProxyError as refused:
            error = {"type": refused.error_type, "code": refused.code, "message": refused.message}
            error["param"] = refused.param
            raise RefusedFrame(
                json.dumps({"type": "error", "status": refused.status, "error": error})
            ) from None
        return frame

    return rewrite
