"""How a request arrived, decided once by the edge and attached to the request for every later step."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from aiohttp import web

from azproxy.clients import Client
from azproxy.edge.aiohttp_seam import request_key


class ArrivalKind(StrEnum):
    """The ways into azproxy; the values are what logs and metrics call them."""

    #: A path-only request to azproxy's own address (a base URL pointed at azproxy).
    REVERSE = "reverse"
    #: An absolute-URI request (`HTTP_PROXY`): `POST http://api.openai.com/v1/...`.
    FORWARD = "forward"
    #: A request inside an intercepted CONNECT tunnel (`HTTPS_PROXY`), TLS ended by azproxy.
    TUNNEL = "tunnel"
    #: A CONNECT request itself: it asks for a tunnel, intercepted or blind.
    CONNECT = "connect"


class Passage(StrEnum):
    """What the edge found azproxy may do with the request, by its target and the forward-proxy settings."""

    #: Served by azproxy's translator (reverse requests, intercepted hosts).
    TRANSLATE = "translate"
    #: Passed on unchanged to the host it names (allowlisted targets; openai mode's real api.openai.com).
    RELAY = "relay"
    #: A target azproxy serves in neither way: 403.
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Target:
    """The host and port an absolute URI, a CONNECT or a tunnel names."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Arrival:
    kind: ArrivalKind
    passage: Passage = Passage.TRANSLATE
    #: The named host and port; None for reverse requests.
    target: Target | None = None
    #: The absolute URI's origin (`https://host:port`), for forward requests.
    origin: str | None = None
    #: Inside a tunnel: the client its CONNECT identified, the identity of requests that present no key.
    tunnel_client: Client | None = None
    #: A relayed target may be reached only at public addresses (it is no operator-chosen one).
    public_only: bool = False

    @property
    def label(self) -> str:
        """What logs and metrics call it: reverse, forward, tunnel (intercepted) or blind."""
        if self.kind is ArrivalKind.CONNECT:
            return "blind" if self.passage is Passage.RELAY else "tunnel"
        return self.kind.value

    def inside_tunnel(self, client: Client | None) -> Arrival:
        """The arrival of every request inside the intercepted tunnel this CONNECT opens."""
        return Arrival(ArrivalKind.TUNNEL, Passage.TRANSLATE, self.target, tunnel_client=client)


REVERSE: Final = Arrival(ArrivalKind.REVERSE)

ARRIVAL: Final = request_key("azproxy_arrival", Arrival)


def arrival_of(request: web.Request) -> Arrival:
    """The arrival the edge attached; requests that bypass the edge (none in azproxy's app) count as reverse."""
    arrival: Arrival = request.get(ARRIVAL, REVERSE)
    return arrival
