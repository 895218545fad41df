"""Upstream backends: where a translated request can go, with the credential and model map it needs there.

Plain data; the pool of connections lives in `upstream`. Today settings yield one backend; the list shape is what
lets several backends per model, failover and cooldown plug in without touching the translator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from yarl import URL

from .config import Mode, Secret, Settings


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    kind: Mode
    base_url: URL
    api_version: str
    model_map: Mapping[str, str]
    #: The server-side key; when set it replaces whatever key the client sent.
    api_key: Secret | None = None

    @property
    def origin(self) -> str:
        """The base URL as a string without trailing slash, ready to have a path appended."""
        return str(self.base_url).rstrip("/")


def backends_from(settings: Settings) -> tuple[Backend, ...]:
    if settings.mode is Mode.OPENAI:
        name, kind, base_url = "openai", Mode.OPENAI, settings.openai_base_url
    elif settings.azure_endpoint is None:
        raise ValueError("azure mode needs an endpoint")  # load_settings already refuses this for serve
    else:
        name, kind, base_url = "azure", Mode.AZURE, settings.azure_endpoint
    return (Backend(name, kind, base_url, settings.api_version, settings.model_map, settings.azure_token),)
