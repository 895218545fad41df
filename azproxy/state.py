"""What every handler shares, stored on the application under a typed key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .config import Settings
from .upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class ProxyState:
    settings: Settings
    upstream: UpstreamClient


STATE = web.AppKey("azproxy_state", ProxyState)
