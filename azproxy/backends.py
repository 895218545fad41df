"""Upstream backends: where a translated request can go, with the credential and model map it needs there.

Plain data plus a credential; the pool of connections lives in `upstream`. Today settings yield one backend;
the list shape is what lets several backends per model, failover and cooldown plug in without touching the
translator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from yarl import URL

from .config import ApiStyle, AuthMode, Mode, Settings
from .credentials import ApiKey, Credential, default_entra_token


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    kind: Mode
    base_url: URL
    api_version: str
    model_map: Mapping[str, str]
    #: The server-side credential; when set it replaces whatever key the client sent.
    credential: Credential | None = None
    style: ApiStyle = ApiStyle.DEPLOYMENTS
    version_overrides: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def origin(self) -> str:
        """The base URL as a string without trailing slash, ready to have a path appended."""
        return str(self.base_url).rstrip("/")


def backends_from(settings: Settings, credential: Credential | None = None) -> tuple[Backend, ...]:
    if settings.mode is Mode.OPENAI:
        name, base_url = "openai", settings.openai_base_url
    elif settings.azure_endpoint is None:
        raise ValueError("azure mode needs an endpoint")  # load_settings already refuses this for serve
    else:
        name, base_url = "azure", settings.azure_endpoint
    return (
        Backend(
            name,
            settings.mode,
            base_url,
            settings.api_version,
            settings.model_map,
            credential or _credential(settings),
            settings.api_style,
            settings.version_overrides,
        ),
    )


def _credential(settings: Settings) -> Credential | None:
    if settings.auth is AuthMode.ENTRA and settings.mode is Mode.AZURE:
        return default_entra_token()
    if settings.azure_token is not None:
        return ApiKey(settings.azure_token, as_bearer=settings.mode is Mode.OPENAI)
    return None
