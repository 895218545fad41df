"""Settings: one typed, frozen object built once from defaults, a .env file, the environment and flags.

No other module reads the environment; everything downstream receives a `Settings`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar

from dotenv import dotenv_values
from yarl import URL

from .addresses import is_ip_literal, is_loopback, is_public
from .clients import Client, ClientConfigError, clients_from_file, clients_from_keys
from .operations import OPERATIONS

#: The newest GA version of the classic data plane. The original project's 2023-03-15-preview was retired in 2024.
DEFAULT_API_VERSION: Final = "2024-10-21"
DEFAULT_ADDRESS: Final = "0.0.0.0:8080"
DEFAULT_OPENAI_BASE_URL: Final = "https://api.openai.com"
DEFAULT_MAX_BODY: Final = 32 * 1024 * 1024
DEFAULT_INTERCEPT_HOSTS: Final = ("api.openai.com",)

#: Azure spells the gpt-3.5 family without the dot; these are added to (and overridden by) the user's mapper.
BUILTIN_MODEL_MAP: Final[Mapping[str, str]] = MappingProxyType(
    {
        "gpt-3.5-turbo": "gpt-35-turbo",
        "gpt-3.5-turbo-0301": "gpt-35-turbo-0301",
        "gpt-3.5-turbo-0613": "gpt-35-turbo-0613",
        "gpt-3.5-turbo-1106": "gpt-35-turbo-1106",
        "gpt-3.5-turbo-0125": "gpt-35-turbo-0125",
        "gpt-3.5-turbo-16k": "gpt-35-turbo-16k",
        "gpt-3.5-turbo-16k-0613": "gpt-35-turbo-16k-0613",
        "gpt-3.5-turbo-instruct": "gpt-35-turbo-instruct",
        "gpt-3.5-turbo-instruct-0914": "gpt-35-turbo-instruct-0914",
    }
)


_HOST_NAME: Final = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


_Choice = TypeVar("_Choice", bound=StrEnum)
_API_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,40}")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable and the bad part."""


class Mode(StrEnum):
    AZURE = "azure"
    OPENAI = "openai"


class ApiStyle(StrEnum):
    """Azure's URL styles: classic deployment paths with a dated api-version, or the v1 API."""

    DEPLOYMENTS = "deployments"
    V1 = "v1"


class AuthMode(StrEnum):
    KEY = "key"
    ENTRA = "entra"


class ResponseShape(StrEnum):
    AZURE = "azure"
    OPENAI = "openai"


class Secret:
    """A credential that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds. `read` bounds the silence between two chunks, never a whole stream."""

    connect: float = 10.0
    read: float = 300.0


@dataclass(frozen=True, slots=True)
class AllowedTarget:
    """An allowlisted forward-proxy target; without a port only 443 is allowed."""

    host: str
    port: int | None = None

    def admits(self, host: str, port: int) -> bool:
        return host == self.host and port == (self.port or 443)


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """Forward-proxy settings: which hosts are intercepted, which tunnelled blindly, and the proxy's credentials."""

    intercept_hosts: tuple[str, ...] = DEFAULT_INTERCEPT_HOSTS
    tunnel_allow: tuple[AllowedTarget, ...] = ()
    #: `user:password` for Proxy-Authorization: Basic; None means the forward proxy asks for none.
    proxy_auth: Secret | None = None

    def allows_tunnel(self, host: str, port: int) -> bool:
        return any(target.admits(host, port) for target in self.tunnel_allow)


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use azproxy. No clients: anyone who reaches it (their own Azure key, or the server's)."""

    clients: tuple[Client, ...] = ()
    allow_anonymous: bool = False
    #: Shared rate-limit counters for several azproxy processes; None keeps them in this process.
    redis_url: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client can make azproxy hold."""

    max_body: int = DEFAULT_MAX_BODY
    max_connections: int = 10_000
    #: Seconds a new connection may take to send a complete request head.
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept.
    keepalive_timeout: float = 75.0
    max_header_size: int = 8190
    max_headers: int = 100


@dataclass(frozen=True, slots=True)
class Settings:
    address: Address = field(default_factory=lambda: parse_address(DEFAULT_ADDRESS))
    mode: Mode = Mode.AZURE
    azure_endpoint: URL | None = None
    api_version: str = DEFAULT_API_VERSION
    model_map: Mapping[str, str] = field(default_factory=lambda: BUILTIN_MODEL_MAP)
    azure_token: Secret | None = None
    openai_base_url: URL = field(default_factory=lambda: URL(DEFAULT_OPENAI_BASE_URL))
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    access_log: bool = False
    log_level: str = "INFO"
    forward: ForwardProxy = ForwardProxy()
    #: Where the local CA lives (created on first need).
    state_dir: Path = field(default_factory=lambda: Path.home() / ".local/share/azproxy")
    #: Certificate and key files that make azproxy serve HTTPS on its address.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    access: Access = Access()
    #: Vet the configured endpoints' addresses like forward-proxy targets (public addresses only).
    strict_endpoints: bool = False
    api_style: ApiStyle = ApiStyle.DEPLOYMENTS
    #: api-version per operation family (`responses`, `assistants`, ...), over the built-in needs.
    version_overrides: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    auth: AuthMode = AuthMode.KEY
    response_shape: ResponseShape = ResponseShape.AZURE

    @property
    def has_server_credential(self) -> bool:
        return self.azure_token is not None or self.auth is AuthMode.ENTRA


# Flags of `azproxy serve` and the variables they stand for; a flag wins over the variable.
FLAG_VARIABLES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "address": "AZURE_OPENAI_PROXY_ADDRESS",
        "mode": "AZURE_OPENAI_PROXY_MODE",
        "endpoint": "AZURE_OPENAI_ENDPOINT",
        "api_version": "AZURE_OPENAI_APIVERSION",
        "model_mapper": "AZURE_OPENAI_MODEL_MAPPER",
        "openai_base_url": "AZPROXY_OPENAI_BASE_URL",
        "log_level": "AZPROXY_LOG_LEVEL",
    }
)


def read_sources(
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
) -> dict[str, str]:
    """Merge, in rising priority: the .env file, the environment, the command-line flags."""
    environ = os.environ if environ is None else environ
    env_file = Path(environ.get("AZPROXY_ENV_FILE") or (cwd or Path.cwd()) / ".env")
    merged: dict[str, str] = {}
    if "AZPROXY_ENV_FILE" in environ and not env_file.is_file():
        raise ConfigError(f"AZPROXY_ENV_FILE: no such file: {env_file}")
    if env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(environ)
    for flag, value in (flags or {}).items():
        if value is not None:
            merged[FLAG_VARIABLES[flag]] = value
    return merged


def load_settings(source: Mapping[str, str], *, require_endpoint: bool = True) -> Settings:
    """Build Settings from merged variables (see `read_sources`); raise ConfigError naming what is wrong."""
    mode = _parse_choice(Mode, "AZURE_OPENAI_PROXY_MODE", source)
    endpoint = _parse_url("AZURE_OPENAI_ENDPOINT", source.get("AZURE_OPENAI_ENDPOINT", ""))
    if endpoint is None and mode is Mode.AZURE and require_endpoint:
        raise ConfigError(
            "AZURE_OPENAI_ENDPOINT is required in azure mode, e.g. https://RESOURCE.openai.azure.com"
        )
    openai_base = _parse_url("AZPROXY_OPENAI_BASE_URL", source.get("AZPROXY_OPENAI_BASE_URL", ""))
    token = source.get("AZURE_OPENAI_TOKEN", "").strip()
    settings = Settings(
        address=parse_address(source.get("AZURE_OPENAI_PROXY_ADDRESS", DEFAULT_ADDRESS)),
        mode=mode,
        azure_endpoint=endpoint,
        api_version=_parse_api_version(
            "AZURE_OPENAI_APIVERSION",
            source.get("AZURE_OPENAI_APIVERSION", "").strip() or DEFAULT_API_VERSION,
        ),
        model_map=parse_model_map(source.get("AZURE_OPENAI_MODEL_MAPPER", "")),
        azure_token=Secret(token) if token else None,
        openai_base_url=openai_base or URL(DEFAULT_OPENAI_BASE_URL),
        limits=_parse_limits(source),
        timeouts=Timeouts(
            connect=_parse_seconds("AZPROXY_CONNECT_TIMEOUT", source.get("AZPROXY_CONNECT_TIMEOUT"), 10.0),
            read=_parse_seconds("AZPROXY_READ_TIMEOUT", source.get("AZPROXY_READ_TIMEOUT"), 300.0),
        ),
        access_log=_parse_bool("AZPROXY_ACCESS_LOG", source.get("AZPROXY_ACCESS_LOG", "false")),
        log_level=_parse_log_level(source.get("AZPROXY_LOG_LEVEL", "INFO")),
        forward=ForwardProxy(
            intercept_hosts=_parse_hosts(source.get("AZPROXY_INTERCEPT_HOSTS")),
            tunnel_allow=_parse_tunnel_allow(source.get("AZPROXY_TUNNEL_ALLOW", "")),
            proxy_auth=_parse_proxy_auth(source.get("AZPROXY_PROXY_AUTH", "")),
        ),
        state_dir=_state_dir(source),
        **_parse_tls(source),
        access=Access(
            clients=_parse_clients(source),
            allow_anonymous=_parse_bool("AZPROXY_ALLOW_ANONYMOUS", source.get("AZPROXY_ALLOW_ANONYMOUS", "")),
            redis_url=source.get("AZPROXY_REDIS_URL", "").strip() or None,
        ),
        strict_endpoints=_parse_bool("AZPROXY_STRICT_ENDPOINTS", source.get("AZPROXY_STRICT_ENDPOINTS", "")),
        api_style=_parse_choice(ApiStyle, "AZPROXY_AZURE_API", source),
        version_overrides=_parse_version_overrides(source.get("AZPROXY_APIVERSION_OVERRIDES", "")),
        auth=_parse_auth(source, mode),
        response_shape=_parse_choice(ResponseShape, "AZPROXY_RESPONSE_SHAPE", source),
    )
    _check_access(settings)
    _check_strict_endpoints(settings)
    return settings


def _check_access(settings: Settings) -> None:
    """No open relay: a server-side credential on a reachable address needs client keys, or an explicit yes."""
    access = settings.access
    if access.clients and not settings.has_server_credential:
        raise ConfigError(
            "AZPROXY_API_KEYS / AZPROXY_CLIENTS_FILE need a server-side credential (AZURE_OPENAI_TOKEN): "
            "client keys are azproxy's own and are never forwarded"
        )
    if (
        settings.has_server_credential
        and not access.clients
        and not access.allow_anonymous
        and not is_loopback(settings.address.host)
    ):
        raise ConfigError(
            f"AZURE_OPENAI_TOKEN is set and azproxy would listen on {settings.address} with no client keys: "
            "anyone who reaches it could spend your Azure quota. Set AZPROXY_API_KEYS or AZPROXY_CLIENTS_FILE, "
            "listen on 127.0.0.1 (AZURE_OPENAI_PROXY_ADDRESS), or set AZPROXY_ALLOW_ANONYMOUS=true"
        )


def _check_strict_endpoints(settings: Settings) -> None:
    """IP-literal endpoints are never resolved, so strict mode vets them here; host names at each connection."""
    if not settings.strict_endpoints:
        return
    for name, url in (
        ("AZURE_OPENAI_ENDPOINT", settings.azure_endpoint),
        ("AZPROXY_OPENAI_BASE_URL", settings.openai_base_url),
    ):
        host = url.host if url is not None else None
        if host and is_ip_literal(host) and not is_public(host):
            raise ConfigError(f"{name}: {host} is not a public address and AZPROXY_STRICT_ENDPOINTS is true")


def _parse_choice(kind: type[_Choice], name: str, source: Mapping[str, str]) -> _Choice:
    text = source.get(name, "").strip().lower()
    if not text:
        return next(iter(kind))
    try:
        return kind(text)
    except ValueError:
        choices = " or ".join(repr(member.value) for member in kind)
        raise ConfigError(f"{name}: {text!r} is not {choices}") from None


def _parse_auth(source: Mapping[str, str], mode: Mode) -> AuthMode:
    auth = _parse_choice(AuthMode, "AZPROXY_AUTH", source)
    if auth is AuthMode.ENTRA and mode is not Mode.AZURE:
        raise ConfigError("AZPROXY_AUTH=entra signs in to Azure: it needs AZURE_OPENAI_PROXY_MODE=azure")
    if auth is AuthMode.ENTRA and importlib.util.find_spec("azure.identity") is None:
        raise ConfigError("AZPROXY_AUTH=entra needs azure-identity: pip install 'azproxy[entra]'")
    return auth


def _parse_version_overrides(text: str) -> Mapping[str, str]:
    overrides = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        family, sep, version = (piece.strip() for piece in entry.partition("="))
        if not sep or not version:
            raise ConfigError(f"AZPROXY_APIVERSION_OVERRIDES: entry {entry!r} is not operation=api-version")
        if family not in OPERATIONS:
            known = ", ".join(sorted(OPERATIONS))
            raise ConfigError(f"AZPROXY_APIVERSION_OVERRIDES: unknown operation {family!r} (known: {known})")
        overrides[family] = _parse_api_version("AZPROXY_APIVERSION_OVERRIDES", version)
    return MappingProxyType(overrides)


def _parse_api_version(name: str, text: str) -> str:
    if not _API_VERSION.fullmatch(text):
        raise ConfigError(f"{name}: {text!r} is not an api-version such as 2024-10-21 or 2025-04-01-preview")
    return text


def _parse_clients(source: Mapping[str, str]) -> tuple[Client, ...]:
    clients = clients_from_keys(source.get("AZPROXY_API_KEYS", ""))
    path = source.get("AZPROXY_CLIENTS_FILE", "").strip()
    if path:
        try:
            clients += clients_from_file(Path(path).expanduser(), source)
        except ClientConfigError as exc:
            raise ConfigError(f"AZPROXY_CLIENTS_FILE: {exc}") from None
    return clients


def _parse_limits(source: Mapping[str, str]) -> Limits:
    defaults = Limits()
    return Limits(
        max_body=_parse_size("AZPROXY_MAX_BODY", source.get("AZPROXY_MAX_BODY", "")) or defaults.max_body,
        max_connections=_parse_count("AZPROXY_MAX_CONNECTIONS", source, defaults.max_connections),
        header_timeout=_parse_seconds(
            "AZPROXY_HEADER_TIMEOUT", source.get("AZPROXY_HEADER_TIMEOUT"), defaults.header_timeout
        ),
        keepalive_timeout=_parse_seconds(
            "AZPROXY_KEEPALIVE_TIMEOUT", source.get("AZPROXY_KEEPALIVE_TIMEOUT"), defaults.keepalive_timeout
        ),
        max_header_size=_parse_size("AZPROXY_MAX_HEADER_SIZE", source.get("AZPROXY_MAX_HEADER_SIZE", ""))
        or defaults.max_header_size,
        max_headers=_parse_count("AZPROXY_MAX_HEADERS", source, defaults.max_headers),
    )


def _parse_count(name: str, source: Mapping[str, str], default: int) -> int:
    text = source.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) == 0:
        raise ConfigError(f"{name}: {text!r} is not a positive whole number")
    return int(text)


def parse_address(text: str) -> Address:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"AZURE_OPENAI_PROXY_ADDRESS: {text!r} is not host:port")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"AZURE_OPENAI_PROXY_ADDRESS: port {port_text!r} is not a number from 1 to 65535")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"AZURE_OPENAI_PROXY_ADDRESS: {host!r} is not an IPv6 address") from None
    return Address(host, int(port_text))


def parse_model_map(text: str) -> Mapping[str, str]:
    """`model=deployment,...` on top of the built-in map; later entries win."""
    mapping = dict(BUILTIN_MODEL_MAP)
    for entry in filter(None, (part.strip() for part in text.split(","))):
        model, sep, deployment = (piece.strip() for piece in entry.partition("="))
        if not sep or not model or not deployment:
            raise ConfigError(f"AZURE_OPENAI_MODEL_MAPPER: entry {entry!r} is not model=deployment")
        mapping[model] = deployment
    return MappingProxyType(mapping)


def _parse_hosts(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_INTERCEPT_HOSTS
    hosts = tuple(dict.fromkeys(h.strip().lower().rstrip(".") for h in text.split(",") if h.strip()))
    for host in hosts:
        if not _HOST_NAME.fullmatch(host):
            raise ConfigError(f"AZPROXY_INTERCEPT_HOSTS: {host!r} is not a DNS host name")
    return hosts


def _parse_tunnel_allow(text: str) -> tuple[AllowedTarget, ...]:
    """`host`, `host:port` or `[v6]:port`, comma-separated."""
    targets = []
    for entry in filter(None, (part.strip().lower() for part in text.split(","))):
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":")
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:
            host, port = entry, ""
        if not host or (port and (not port.isdigit() or not 0 < int(port) < 65536)):
            raise ConfigError(f"AZPROXY_TUNNEL_ALLOW: entry {entry!r} is not host, host:port or [v6]:port")
        targets.append(AllowedTarget(host, int(port) if port else None))
    return tuple(targets)


def _parse_proxy_auth(text: str) -> Secret | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("AZPROXY_PROXY_AUTH: expected user:password (both non-empty)")
    return Secret(text)


def _state_dir(source: Mapping[str, str]) -> Path:
    if source.get("AZPROXY_STATE_DIR"):
        return Path(source["AZPROXY_STATE_DIR"]).expanduser()
    data_home = source.get("XDG_DATA_HOME") or str(Path(source.get("HOME") or Path.home()) / ".local/share")
    return Path(data_home) / "azproxy"


def _parse_tls(source: Mapping[str, str]) -> dict[str, Path | None]:
    cert, key = source.get("AZPROXY_TLS_CERT", "").strip(), source.get("AZPROXY_TLS_KEY", "").strip()
    if bool(cert) != bool(key):
        raise ConfigError("AZPROXY_TLS_CERT and AZPROXY_TLS_KEY go together: set both or neither")
    for name, value in (("AZPROXY_TLS_CERT", cert), ("AZPROXY_TLS_KEY", key)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{name}: no such file: {value}")
    return {"tls_cert": Path(cert) if cert else None, "tls_key": Path(key) if key else None}


def _parse_url(name: str, text: str) -> URL | None:
    text = text.strip()
    if not text:
        return None
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{name}: {text!r} is not an http(s) URL")
    if url.query_string or url.fragment:
        raise ConfigError(f"{name}: {text!r} must not carry a query or fragment")
    return url.with_path(url.path.rstrip("/"))


def _parse_size(name: str, text: str) -> int:
    text = text.strip().upper()
    if not text:
        return 0
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    number, unit = (text[:-1], units[text[-1]]) if text[-1] in units else (text, 1)
    if not number.isdigit() or int(number) == 0:
        raise ConfigError(f"{name}: {text!r} is not a positive size such as 33554432 or 32M")
    return int(number) * unit


def _parse_seconds(name: str, text: str | None, default: float) -> float:
    if text is None or not text.strip():
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{name}: {text!r} is not a positive number of seconds")
    return seconds


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: {text!r} is not true or false")


def _parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"AZPROXY_LOG_LEVEL: {text!r} is not DEBUG, INFO, WARNING or ERROR")
    return level
