"""The two HTTP steps of a WebRTC realtime session, as Azure's "Use the GPT Realtime API via WebRTC" page and its
REST reference ("Create a client secret", "Create a Realtime call") give them; the media never reaches Azure's
HTTP surface, so it is not emulated.

- `POST /openai/v1/realtime/client_secrets`, JSON `{"session": {"type": "realtime", "model": DEPLOYMENT, ...},
  "expires_after"?: {"anchor": "created_at", "seconds": N}}` → 200 `{"value": "ek_...", "expires_at": T,
  "session": {...}}`. The deployment may also be the body's top-level `model`.
- `POST /openai/v1/realtime/calls[?model=DEPLOYMENT]`, the SDP offer as an `application/sdp` body (the docs'
  samples) or as the `sdp` part of a multipart/form-data body with an optional JSON `session` part (the REST
  reference, and the official SDK) → 201, an `application/sdp` answer, `Location: /openai/v1/realtime/calls/{id}`.
  It takes the ephemeral key as `Authorization: Bearer ek_...`; the deployment is `?model=`, else the session
  part's `model`, else the one the ephemeral key was made for.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from .calls import AzureError, Call, bad_request, headers, json_answer
from .deployments import Catalog
from .objects import Obj, new_id

#: Azure's and OpenAI's default lifetime of a client secret: ten minutes.
_DEFAULT_TTL: Final = 600


@dataclass(frozen=True, slots=True)
class EphemeralKey:
    deployment: str
    expires_at: int


class RealtimeCalls:
    """Issued ephemeral keys and the calls set up with them, by id, each with the offer it was made from."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.keys: dict[str, EphemeralKey] = {}
        self.calls: dict[str, Obj] = {}

    def valid(self, key: str) -> EphemeralKey | None:
        issued = self.keys.get(key)
        return issued if issued is not None and issued.expires_at > time.time() else None

    def client_secret(self, call: Call) -> web.StreamResponse:
        body = call.json()
        raw = body.get("session")
        session: dict[str, Any] = raw if isinstance(raw, dict) else {}
        deployment = self.catalog.resolve(session.get("model", body.get("model")), "realtime")
        expires = body.get("expires_after")
        seconds = expires.get("seconds") if isinstance(expires, dict) else None
        ttl = seconds if isinstance(seconds, int) and 10 <= seconds <= 7200 else _DEFAULT_TTL
        key = "ek_" + secrets.token_hex(16)
        issued = EphemeralKey(deployment.name, int(time.time()) + ttl)
        self.keys[key] = issued
        answer: Obj = {"id": new_id("sess_"), "object": "realtime.session", "type": "realtime"}
        answer |= {"output_modalities": ["audio"], "instructions": ""} | session | {"model": deployment.name}
        return json_answer({"value": key, "expires_at": issued.expires_at, "session": answer})

    def create_call(self, call: Call, key: EphemeralKey | None) -> web.StreamResponse:
        offer, session = _offer(call)
        named = call.query.get("model") or session.get("model") or (key.deployment if key else None)
        deployment = self.catalog.resolve(named, "realtime")
        if not offer.startswith("v=0"):
            raise bad_request("The SDP offer is missing or malformed.", "sdp")
        call_id = new_id("rtc_")
        self.calls[call_id] = {
            "id": call_id,
            "deployment": deployment.name,
            "offer": offer,
            "session": session,
        }
        return web.Response(
            status=201,
            text=_answer(),
            content_type="application/sdp",
            headers=headers() | {"Location": f"/openai/v1/realtime/calls/{call_id}"},
        )


def _offer(call: Call) -> tuple[str, dict[str, Any]]:
    """The SDP offer and the optional session configuration, from a raw or a multipart body."""
    if call.request.content_type != "multipart/form-data":
        return call.body.decode(errors="replace"), {}
    form = call.multipart()
    upload = form.files.get("sdp")
    offer = upload.content.decode(errors="replace") if upload else form.fields.get("sdp", "")
    raw = form.fields.get("session") or (form.files["session"].content if "session" in form.files else "{}")
    try:
        session = json.loads(raw)
    except ValueError:
        raise bad_request("The session part is not JSON.", "session") from None
    if not isinstance(session, dict):
        raise AzureError(400, "BadRequest", "The session part must be a JSON object.", param="session")
    return offer, session


def _answer() -> str:
    """A syntactically whole SDP answer: one audio section and the `oai-events` data channel's section."""
    lines = [
        "v=0",
        f"o=- {int(time.time())} 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=sendrecv",
        "a=setup:passive",
        "a=rtpmap:111 opus/48000/2",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
        "a=sctp-port:5000",
    ]
    return "\r\n".join(lines) + "\r\n"
