"""Settings: one typed, frozen object built once, following the table in `settings_table`, from (in rising
priority) defaults, the TOML config file, a .env file, the environment and flags.

No other module reads the environment; everything downstream receives a `Settings`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from dotenv import dotenv_values
from yarl import URL

from .addresses import is_ip_literal, is_loopback, is_public
from .backend_config import BackendSpec, ModelSpec
from .clients import Client, ClientConfigError, clients_from_file
from .config_file import ConfigFile, SettingText, read_config_file
from .setting_values import (
    BUILTIN_MODEL_MAP,
    Address,
    AllowedTarget,
    ApiStyle,
    AuthMode,
    ConfigError,
    IPNetwork,
    LogFormat,
    Mode,
    ResponseShape,
    Secret,
    parse_address,
    parse_model_map,
)
from .settings_table import BY_ENV, DEFAULT_API_VERSION, DEFAULTS, SETTINGS

__all__ = [
    "BUILTIN_MODEL_MAP",
    "DEFAULT_API_VERSION",
    "DEFAULT_TUNNEL_ALLOW",
    "FLAG_VARIABLES",
    "Access",
    "Address",
    "AllowedTarget",
    "ApiStyle",
    "AuthMode",
    "ConfigError",
    "Failover",
    "ForwardProxy",
    "Limits",
    "LogFormat",
    "Mode",
    "ResponseShape",
    "Secret",
    "Settings",
    "Timeouts",
    "load_settings",
    "parse_address",
    "parse_model_map",
    "read_sources",
    "unknown_variables",
]

#: Flags of `azproxy serve` (as argparse names them) and the variables they stand for; a flag wins.
FLAG_VARIABLES: Final[Mapping[str, str]] = MappingProxyType(
    {row.flag.removeprefix("--").replace("-", "_"): row.env for row in SETTINGS if row.flag}
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds. `read` bounds the silence between two chunks, never a whole stream."""

    connect: float = DEFAULTS["timeouts.connect"]
    read: float = DEFAULTS["timeouts.read"]
    #: Sending a request to the first byte of its answer; None: `read`.
    first_byte: float | None = None


@dataclass(frozen=True, slots=True)
class Failover:
    """How requests move between backends: attempts per request, cooldown after a 429, circuit breaking."""

    #: None: every backend that serves the model, once.
    max_attempts: int | None = None
    cooldown: float = DEFAULTS["failover.cooldown"]
    circuit_failures: int = DEFAULTS["failover.circuit_failures"]
    circuit_open: float = DEFAULTS["failover.circuit_open"]
    #: Answers name the backend that served them and the attempts it took.
    backend_headers: bool = DEFAULTS["failover.backend_headers"]


#: Public hosts that OpenAI SDKs and tokenizer libraries fetch from besides the API, which clients behind
#: HTTPS_PROXY reach through azproxy too: tiktoken's encodings (LangChain's OpenAIEmbeddings loads them), and
#: Hugging Face's hub and its file CDN (transformers tokenizers, litellm's tokenizers).
DEFAULT_TUNNEL_ALLOW: Final = (
    AllowedTarget("openaipublic.blob.core.windows.net", 443),
    AllowedTarget("huggingface.co", 443),
    AllowedTarget("cdn-lfs.huggingface.co", 443),
    AllowedTarget("cdn-lfs.hf.co", 443),
    AllowedTarget("cas-bridge.xethub.hf.co", 443),
)


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """Forward-proxy settings: which hosts are intercepted, which tunnelled blindly, and the proxy's credentials."""

    intercept_hosts: tuple[str, ...] = DEFAULTS["forward.intercept_hosts"]
    tunnel_allow: tuple[AllowedTarget, ...] = ()
    #: Also tunnel `DEFAULT_TUNNEL_ALLOW` blindly, at public addresses only.
    tunnel_allow_defaults: bool = DEFAULTS["forward.tunnel_allow_defaults"]
    #: `user:password` for Proxy-Authorization: Basic; None means the forward proxy asks for none.
    proxy_auth: Secret | None = None

    def allows_tunnel(self, host: str, port: int) -> bool:
        return any(target.admits(host, port) for target in self.tunnel_allow)

    def allows_public_tunnel(self, host: str, port: int) -> bool:
        """A built-in target (see `DEFAULT_TUNNEL_ALLOW`): tunnelled, but vetted like any public host."""
        return self.tunnel_allow_defaults and any(
            target.admits(host, port) for target in DEFAULT_TUNNEL_ALLOW
        )


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use azproxy. No clients: anyone who reaches it (their own Azure key, or the server's)."""

    clients: tuple[Client, ...] = ()
    allow_anonymous: bool = DEFAULTS["access.allow_anonymous"]
    #: Shared rate-limit counters for several azproxy processes; None keeps them in this process.
    redis_url: str | None = None
    #: Proxies in front of azproxy whose forwarding headers name the real client.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Failed key checks a minute from one address before 429; 0 turns the limit off.
    auth_failure_limit: int = DEFAULTS["access.auth_failure_limit"]
    #: Browser origins allowed by CORS (`*` for any); None answers no CORS at all.
    cors_origins: tuple[str, ...] | None = None
    #: Host names (lower case, no port, IPv6 without brackets) a Host header may carry; empty allows any.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client can make azproxy hold."""

    max_body: int = DEFAULTS["limits.max_body"]
    max_connections: int = DEFAULTS["limits.max_connections"]
    #: Seconds a new connection may take to send a complete request head.
    header_timeout: float = DEFAULTS["limits.header_timeout"]
    #: Seconds an idle keep-alive connection is kept.
    keepalive_timeout: float = DEFAULTS["limits.keepalive_timeout"]
    max_header_size: int = DEFAULTS["limits.max_header_size"]
    max_headers: int = DEFAULTS["limits.max_headers"]
    #: A body must arrive within body_timeout + length / body_min_rate seconds.
    body_timeout: float = DEFAULTS["limits.body_timeout"]
    body_min_rate: int = DEFAULTS["limits.body_min_rate"]
    #: Open connections from one address; 0 takes a tenth of max_connections (at least 1).
    max_connections_per_ip: int = 0
    #: Bytes of all request bodies being read at once.
    max_buffered: int = DEFAULTS["limits.max_buffered"]

    def __post_init__(self) -> None:
        if not self.max_connections_per_ip:
            object.__setattr__(self, "max_connections_per_ip", max(1, self.max_connections // 10))


@dataclass(frozen=True, slots=True)
class Settings:
    address: Address = DEFAULTS["address"]
    mode: Mode = DEFAULTS["mode"]
    azure_endpoint: URL | None = None
    api_version: str = DEFAULTS["api_version"]
    model_map: Mapping[str, str] = field(default_factory=lambda: BUILTIN_MODEL_MAP)
    azure_token: Secret | None = None
    openai_base_url: URL = DEFAULTS["openai_base_url"]
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    access_log: bool = DEFAULTS["access_log"]
    log_format: LogFormat = DEFAULTS["log_format"]
    log_level: str = DEFAULTS["log_level"]
    #: Prometheus metrics at /metrics, on the main listener or on `metrics_address`.
    metrics: bool = DEFAULTS["metrics"]
    metrics_address: Address | None = None
    metrics_key: Secret | None = None
    forward: ForwardProxy = ForwardProxy()
    #: Where the local CA lives (created on first need).
    state_dir: Path = field(default_factory=lambda: Path.home() / ".local/share/azproxy")
    #: Certificate and key files that make azproxy serve HTTPS on its address.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    access: Access = Access()
    #: Vet the configured endpoints' addresses like forward-proxy targets (public addresses only).
    strict_endpoints: bool = DEFAULTS["strict_endpoints"]
    #: Processes serving the one port (SO_REUSEPORT); 1 serves in the main process itself.
    workers: int = DEFAULTS["workers"]
    #: Seconds requests under way may take to finish once azproxy is told to stop.
    shutdown_grace: float = DEFAULTS["shutdown_grace"]
    api_style: ApiStyle = DEFAULTS["api_style"]
    #: api-version per operation family (`responses`, `assistants`, ...), over the built-in needs.
    version_overrides: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    auth: AuthMode = DEFAULTS["auth"]
    response_shape: ResponseShape = DEFAULTS["response_shape"]
    #: The response shape of forward-proxy arrivals, whose clients believe they talk to api.openai.com.
    forward_response_shape: ResponseShape = DEFAULTS["forward_response_shape"]
    #: Rename or drop parameters a deployment refuses, and remember that per deployment.
    fix_parameters: bool = DEFAULTS["fix_parameters"]
    #: The header a key goes to Azure under (API Management in front wants its subscription-key header).
    api_key_header: str = DEFAULTS["api_key_header"]
    #: Ask Azure for token usage at the end of streams.
    stream_usage: bool = DEFAULTS["stream_usage"]
    failover: Failover = Failover()
    #: The config file's `[[backend]]` tables; empty: the one endpoint the settings above name.
    backends: tuple[BackendSpec, ...] = ()
    #: The config file's `[[model]]` tables.
    models: tuple[ModelSpec, ...] = ()

    @property
    def has_server_credential(self) -> bool:
        if self.backends:
            return all(backend.has_credential for backend in self.backends)
        return self.azure_token is not None or self.auth is AuthMode.ENTRA


_SECTIONS: Final[Mapping[str, type[Any]]] = MappingProxyType(
    {"limits": Limits, "timeouts": Timeouts, "failover": Failover, "forward": ForwardProxy, "access": Access}
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


def unknown_variables(source: Mapping[str, str]) -> list[str]:
    """`AZPROXY_*` names no setting reads: most likely typos, which would otherwise be ignored without a word."""
    return sorted(name for name in source if name.startswith("AZPROXY_") and name not in BY_ENV)


def load_settings(source: Mapping[str, str], *, require_endpoint: bool = True) -> Settings:
    """Build Settings from merged variables (see `read_sources`) over the config file AZPROXY_CONFIG names.

    An empty value counts as unset. A bad value raises ConfigError naming the variable, or the file, line,
    table and key, and what is wrong."""
    texts = {
        name: SettingText(text, name) for name, text in source.items() if name in BY_ENV and text.strip()
    }
    config = _config_file(texts.get("AZPROXY_CONFIG"), source)
    texts = {name: text for name, text in config.texts.items() if text.text.strip()} | texts
    values = {
        row.field: _value(row.env, texts[row.env]) for row in SETTINGS if row.field and row.env in texts
    }
    values.setdefault("state_dir", _default_state_dir(source))
    values["access.clients"] = _clients(texts, source, config.clients)
    values["backends"], values["models"] = config.backends, config.models
    settings = _assemble(values)
    if require_endpoint:
        _check_endpoint(settings)
    _check_tls_pair(settings)
    _check_entra(settings)
    _check_access(settings)
    _check_strict_endpoints(settings)
    _check_workers(settings)
    return settings


def _config_file(path: SettingText | None, source: Mapping[str, str]) -> ConfigFile:
    return read_config_file(_value("AZPROXY_CONFIG", path), source) if path else ConfigFile()


def _value(name: str, text: SettingText) -> Any:
    try:
        return BY_ENV[name].parser.read(text.text)
    except ConfigError as exc:
        raise ConfigError(f"{text.origin}: {exc}") from None


def _default_state_dir(source: Mapping[str, str]) -> Path:
    data_home = source.get("XDG_DATA_HOME") or str(Path(source.get("HOME") or Path.home()) / ".local/share")
    return Path(data_home) / "azproxy"


def _clients(
    texts: Mapping[str, SettingText], source: Mapping[str, str], from_config: tuple[Client, ...]
) -> tuple[Client, ...]:
    """AZPROXY_API_KEYS, AZPROXY_CLIENTS_FILE and the config file's `[[client]]` tables, together."""
    keys, path = texts.get("AZPROXY_API_KEYS"), texts.get("AZPROXY_CLIENTS_FILE")
    clients: tuple[Client, ...] = _value("AZPROXY_API_KEYS", keys) if keys else ()
    if path:
        try:
            clients += clients_from_file(_value("AZPROXY_CLIENTS_FILE", path), source)
        except ClientConfigError as exc:
            raise ConfigError(f"{path.origin}: {exc}") from None
    clients += from_config
    names = [client.name for client in clients]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"client names must be unique across all sources of clients; repeated: {repeated}")
    return clients


def _assemble(values: Mapping[str, Any]) -> Settings:
    """Each value into the field its row names: `limits.max_body` into Settings.limits, `address` at the top."""
    fields: dict[str, dict[str, Any]] = {section: {} for section in ("", *_SECTIONS)}
    for path, value in values.items():
        section, _, name = path.rpartition(".")
        fields[section][name] = value
    return Settings(**fields[""], **{section: kind(**fields[section]) for section, kind in _SECTIONS.items()})


def _check_endpoint(settings: Settings) -> None:
    if settings.azure_endpoint is None and settings.mode is Mode.AZURE and not settings.backends:
        raise ConfigError(
            "AZURE_OPENAI_ENDPOINT is required in azure mode, e.g. https://RESOURCE.openai.azure.com"
        )


def _check_tls_pair(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("AZPROXY_TLS_CERT and AZPROXY_TLS_KEY go together: set both or neither")


def _server_credential_name(settings: Settings) -> str:
    """What holds the server-side credential, as the user configured it."""
    if settings.backends:
        return "[[backend]] api_key or auth"
    return "AZPROXY_AUTH=entra" if settings.auth is AuthMode.ENTRA else "AZURE_OPENAI_TOKEN"


def _check_entra(settings: Settings) -> None:
    if settings.auth is not AuthMode.ENTRA:
        return
    if settings.mode is not Mode.AZURE:
        raise ConfigError("AZPROXY_AUTH=entra signs in to Azure: it needs AZURE_OPENAI_PROXY_MODE=azure")
    if importlib.util.find_spec("azure.identity") is None:
        raise ConfigError("AZPROXY_AUTH=entra needs azure-identity: pip install 'azproxy[entra]'")


def _check_access(settings: Settings) -> None:
    """No open relay: a server-side credential, or a tunnel allowlist, on a reachable address needs client keys
    (or proxy credentials, for tunnels), or an explicit yes."""
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
            f"{_server_credential_name(settings)} is set and azproxy would listen on {settings.address} with no "
            "client keys: anyone who reaches it could spend your Azure quota. Set AZPROXY_API_KEYS or "
            "AZPROXY_CLIENTS_FILE, "
            "listen on 127.0.0.1 (AZURE_OPENAI_PROXY_ADDRESS), or set AZPROXY_ALLOW_ANONYMOUS=true"
        )
    forward = settings.forward
    if (
        forward.tunnel_allow
        and forward.proxy_auth is None
        and not access.clients
        and not access.allow_anonymous
        and not is_loopback(settings.address.host)
    ):
        raise ConfigError(
            f"AZPROXY_TUNNEL_ALLOW is set and azproxy would listen on {settings.address} with neither "
            "AZPROXY_PROXY_AUTH nor client keys: anyone who reaches it could tunnel to those hosts. Set "
            "AZPROXY_PROXY_AUTH, AZPROXY_API_KEYS or AZPROXY_CLIENTS_FILE, listen on 127.0.0.1 "
            "(AZURE_OPENAI_PROXY_ADDRESS), or set AZPROXY_ALLOW_ANONYMOUS=true"
        )


def _check_workers(settings: Settings) -> None:
    """Rate-limit counters live in each process: several workers without Redis would each grant a client its
    whole budget, so N workers would let it spend N times what it was given."""
    limited = [client.name for client in settings.access.clients if client.rpm or client.tpm]
    if settings.workers > 1 and limited and not settings.access.redis_url:
        raise ConfigError(
            f"AZPROXY_WORKERS: {settings.workers} workers would each count rate limits on their own (clients "
            f"with rpm or tpm: {', '.join(limited)}); set AZPROXY_REDIS_URL to share them, or run one worker"
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
