"""What web pages may do with azproxy: which origins CORS answers, and which Host names a reverse request may name.

A page's JavaScript can reach a loopback azproxy; the credential decides whether that matters. Where every
request must carry a key the page would have to know (client keys, or clients bringing their own Azure key),
any origin is answered by default. Where azproxy spends its server-side credential for a request that presents
none, no origin is, unless AZPROXY_CORS_ORIGINS names it. The Host check keeps DNS rebinding (a foreign name
resolving to 127.0.0.1) from turning a page into a same-origin client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDictProxy

from .addresses import is_loopback
from .config import Settings
from .errors import BadRequest, Forbidden
from .headers import HEADER_NAME

#: Every header azproxy's answers carry that browser JavaScript may want to read (OpenAI's SDKs do).
EXPOSED_HEADERS: Final = (
    "x-azproxy-request-id",
    "x-azproxy-backend",
    "x-azproxy-attempts",
    "x-request-id",
    "apim-request-id",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "retry-after-ms",
    "x-azproxy-adjusted",
    "x-azproxy-served-model",
)
_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}
_ANY: Final = "*"


@dataclass(frozen=True, slots=True)
class BrowserPolicy:
    #: Origins answered (normalised); None answers any.
    origins: frozenset[str] | None
    #: Host names a reverse request may carry; None accepts any.
    hosts: frozenset[str] | None

    @classmethod
    def from_settings(cls, settings: Settings) -> BrowserPolicy:
        return cls(_origins(settings), _hosts(settings))

    def check(self, headers: CIMultiDictProxy[str], *, reverse: bool) -> None:
        """400 for a reverse request naming a foreign Host, 403 for an origin not answered: both from the head,
        before any body byte is read or anything is sent."""
        if reverse and self.hosts is not None:
            host = bare_host(headers.get("Host", ""))
            if host and host not in self.hosts and not _is_loopback_name(host):
                raise BadRequest(
                    f"azproxy does not answer requests for the host '{host}'; add it to AZPROXY_ALLOWED_HOSTS.",
                    code="host_not_allowed",
                )
        origin = headers.get("Origin")
        if origin is not None and not self.allows(origin):
            raise Forbidden(
                "azproxy does not answer this origin; add it to AZPROXY_CORS_ORIGINS.",
                code="origin_not_allowed",
            )

    def allows(self, origin: str) -> bool:
        return self.origins is None or _normalised(origin) in self.origins

    def cors_headers(self, headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
        """The CORS headers of an answer to a request with these headers; none for an origin not answered."""
        origin = headers.get("Origin")
        if self.origins is None:
            return {
                "Access-Control-Allow-Origin": _ANY,
                "Access-Control-Expose-Headers": ", ".join(EXPOSED_HEADERS),
            }
        if origin is None or not self.allows(origin):
            return {"Vary": "Origin"}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": ", ".join(EXPOSED_HEADERS),
            "Vary": "Origin",
        }


def preflight_headers(headers: CIMultiDictProxy[str]) -> list[str]:
    """The header names a preflight asked for that are header names at all (an answered origin may send them)."""
    asked = headers.get("Access-Control-Request-Headers", "")
    return [name for name in (h.strip().lower() for h in asked.split(",")) if HEADER_NAME.fullmatch(name)]


def bare_host(value: str) -> str:
    """A Host header's name: lower case, no port, no trailing dot, IPv6 without brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _origins(settings: Settings) -> frozenset[str] | None:
    configured = settings.access.cors_origins
    if configured is not None:
        return None if _ANY in configured else frozenset(_normalised(origin) for origin in configured)
    if settings.has_server_credential and not settings.access.clients:
        return frozenset()  # a page would spend the server's credential without presenting any
    return None


def _hosts(settings: Settings) -> frozenset[str] | None:
    allowed = settings.access.allowed_hosts
    own = bare_host(settings.address.host)
    if not allowed and not is_loopback(own):
        return None
    return frozenset({*allowed, own})


def _is_loopback_name(host: str) -> bool:
    """Names no DNS answer can move: localhost and its subdomains (RFC 6761), loopback addresses."""
    return host.endswith(".localhost") or is_loopback(host)


def _normalised(origin: str) -> str:
    """An origin as browsers serialise it: lower case, no trailing slash, no default port."""
    origin = origin.strip().lower().rstrip("/")
    scheme = origin.partition("://")[0]
    default = _DEFAULT_PORTS.get(scheme)
    return origin.removesuffix(default) if default else origin
