"""Upstream backends: where a translated request can go, with the credential and model map it needs there.

Plain data plus a credential; the pool of connections lives in `upstream`, the choice between backends in
`routing`. Settings yield one backend from the environment's endpoint, or one per `[[backend]]` table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from yarl import URL

from .backend_config import BackendSpec
from .config import ApiStyle, AuthMode, Mode, Settings
from .credentials import ApiKey, Credential, EntraToken, default_entra_token

log = logging.getLogger(__name__)


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
    #: Its share of requests among the backends of its priority.
    weight: int = 1
    #: 0 is served first; a higher number is a fallback tier, used while every lower one is out.
    priority: int = 0
    #: Models a `[[model]]` table gives to other backends only.
    excludes: frozenset[str] = frozenset()
    #: Seconds; None: the global timeouts.
    connect_timeout: float | None = None
    first_byte_timeout: float | None = None
    idle_timeout: float | None = None
    #: The header a key goes under: `api-key`, or what API Management in front expects.
    api_key_header: str = "api-key"

    @property
    def origin(self) -> str:
        """The base URL as a string without trailing slash, ready to have a path appended."""
        return str(self.base_url).rstrip("/")

    @property
    def host(self) -> str:
        """How logs name where it is (never with credentials)."""
        return self.base_url.host or self.origin

    def serves(self, model: str | None) -> bool:
        return model is None or model not in self.excludes


def backends_from(settings: Settings, credential: Credential | None = None) -> tuple[Backend, ...]:
    """`credential` replaces the one the settings name (for file backends: those signing in with Entra ID)."""
    if settings.backends:
        return tuple(_from_spec(settings, spec, credential) for spec in settings.backends)
    if settings.mode is Mode.OPENAI:
        name, base_url = "openai", settings.openai_base_url
    elif settings.azure_endpoint is None:
        raise ValueError("azure mode needs an endpoint")  # load_settings already refuses this for serve
    else:
        name, base_url = "azure", azure_endpoint(settings.azure_endpoint, "AZURE_OPENAI_ENDPOINT")
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
            api_key_header=settings.api_key_header,
        ),
    )


def azure_endpoint(url: URL, setting: str) -> URL:
    """The endpoint azproxy appends `/openai/...` to. One that already ends in `/openai` (a copy from the
    portal) would get it twice, and every request Azure's bare 404: the segment is dropped, with a warning.
    A path prefix (API Management: `https://NAME.azure-api.net/openai-prod`) is kept."""
    if not url.path.rstrip("/").endswith("/openai"):
        return url
    fixed = url.with_path(url.path.rstrip("/").removesuffix("/openai"))
    log.warning(
        "%s ends in /openai, which azproxy adds itself: using %s (change the setting to silence this)",
        setting,
        fixed,
    )
    return fixed


def _from_spec(settings: Settings, spec: BackendSpec, credential: Credential | None) -> Backend:
    """A `[[backend]]` table over the global settings: its `[[model]]` deployments on top of the mapper."""
    own = {
        model.name: model.deployments[spec.name]
        for model in settings.models
        if spec.name in model.deployments
    }
    excludes = frozenset(model.name for model in settings.models if spec.name not in model.deployments)
    url = (
        azure_endpoint(spec.url, f"[[backend]] {spec.name!r} endpoint")
        if spec.kind is Mode.AZURE
        else spec.url
    )
    return Backend(
        spec.name,
        spec.kind,
        url,
        spec.api_version or settings.api_version,
        MappingProxyType(dict(settings.model_map) | own),
        _spec_credential(spec, credential, settings.api_key_header),
        spec.style or settings.api_style,
        spec.version_overrides if spec.version_overrides is not None else settings.version_overrides,
        weight=spec.weight,
        priority=spec.priority,
        excludes=excludes,
        connect_timeout=spec.connect_timeout,
        first_byte_timeout=spec.first_byte_timeout,
        idle_timeout=spec.idle_timeout,
        api_key_header=spec.api_key_header or settings.api_key_header,
    )


def _spec_credential(spec: BackendSpec, credential: Credential | None, header: str) -> Credential | None:
    if spec.auth is AuthMode.ENTRA:
        if credential is not None:
            return credential
        if spec.entra_scope is None:
            return default_entra_token()
        from azure.identity.aio import DefaultAzureCredential

        return EntraToken(DefaultAzureCredential(), scope=spec.entra_scope)
    if spec.api_key is not None:
        return ApiKey(spec.api_key, as_bearer=spec.kind is Mode.OPENAI, header=spec.api_key_header or header)
    return None


def _credential(settings: Settings) -> Credential | None:
    if settings.auth is AuthMode.ENTRA and settings.mode is Mode.AZURE:
        return default_entra_token()
    if settings.azure_token is not None:
        return ApiKey(
            settings.azure_token, as_bearer=settings.mode is Mode.OPENAI, header=settings.api_key_header
        )
    return None
