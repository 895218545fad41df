"""Every setting azproxy reads, as one table: its variable, its config-file key, its parser, its default (stated
here only: the Settings dataclasses take theirs from this table), what the docs say, and where it lands.

The README's configuration tables are checked against these rows, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from .clients import clients_from_keys
from .setting_values import (
    ADDRESS,
    API_VERSION,
    BOOL,
    COUNT,
    COUNT_OR_ZERO,
    DNS_NAMES,
    EXISTING_FILE,
    HEADER_NAME,
    HOST_NAMES,
    LOG_LEVEL,
    MODEL_MAP,
    NETWORKS,
    ORIGINS,
    PATH,
    PROXY_AUTH,
    SECONDS,
    SECRET,
    SIZE,
    TEXT,
    TUNNEL_TARGETS,
    URL_,
    VERSION_OVERRIDES,
    ApiStyle,
    AuthMode,
    ConfigError,
    LogFormat,
    Mode,
    Parser,
    ResponseShape,
    choice,
)


def _workers(text: str) -> int:
    """A positive whole number, or `auto`: one per CPU this process may run on."""
    text = text.strip()
    if text.lower() == "auto":
        return len(os.sched_getaffinity(0))
    if not text.isdigit() or int(text) == 0:
        raise ConfigError(f"{text!r} is not a positive whole number or auto")
    return int(text)


WORKERS: Final = Parser(_workers, (int, str))

#: The newest GA version of the classic data plane. The original project's 2023-03-15-preview was retired in 2024.
DEFAULT_API_VERSION: Final = "2024-10-21"


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table."""

    env: str
    #: `table.name`: key `name` of TOML table `[table]`; "" for what only the environment can say.
    key: str
    parser: Parser[Any]
    #: As a user would write it; None means unset (the field's own empty value, or what `unset` describes).
    default: str | None
    #: Attribute path in Settings (`limits.max_body`); None for inputs that other steps combine.
    field: str | None
    #: The docs' meaning column.
    meaning: str
    #: The docs' default column when there is no default text.
    unset: str = "(none)"
    #: The `azproxy serve` flag that stands for this variable.
    flag: str = ""
    #: A credential: the config file may only point at it (`env:NAME`, `file:/path`), never hold it.
    secret: bool = False

    @property
    def documented_default(self) -> str:
        return f"`{self.default}`" if self.default is not None else self.unset


# fmt: off
SETTINGS: Final = (
    # [server]: azproxy itself
    Setting(
        "AZURE_OPENAI_PROXY_ADDRESS", "server.address", ADDRESS, "0.0.0.0:8080",
        field="address", flag="--address",
        meaning="where azproxy listens: `host:port`, `[v6]:port` or `:port`",
    ),
    Setting(
        "AZURE_OPENAI_PROXY_MODE", "server.mode", choice(Mode), "azure", field="mode", flag="--mode",
        meaning="`azure`: translate to Azure OpenAI; `openai`: plain relay to `AZPROXY_OPENAI_BASE_URL`",
    ),
    Setting(
        "AZPROXY_LOG_LEVEL", "server.log_level", LOG_LEVEL, "INFO", field="log_level", flag="--log-level",
        meaning="`DEBUG`, `INFO`, `WARNING`, `ERROR`",
    ),
    Setting(
        "AZPROXY_ACCESS_LOG", "server.access_log", BOOL, "true", field="access_log",
        meaning="log one line per request, CONNECT and aborted streams included (no header, body or key)",
    ),
    Setting(
        "AZPROXY_LOG_FORMAT", "server.log_format", choice(LogFormat), "auto", field="log_format",
        meaning="`json`, `text`, or `auto`: JSON when stdout is not a terminal (systemd, Docker)",
    ),
    Setting(
        "AZPROXY_METRICS", "server.metrics", BOOL, "true", field="metrics",
        meaning="serve Prometheus metrics at `/metrics`",
    ),
    Setting(
        "AZPROXY_METRICS_ADDRESS", "server.metrics_address", ADDRESS, None, field="metrics_address",
        unset="(the main listener)",
        meaning="serve `/metrics` on this `host:port` instead, e.g. `127.0.0.1:9464`",
    ),
    Setting(
        "AZPROXY_METRICS_KEY", "server.metrics_key", SECRET, None, field="metrics_key", secret=True,
        unset="(any client key)",
        meaning="the Bearer key `/metrics` on the main listener needs when client keys are configured",
    ),
    Setting(
        "AZPROXY_STATE_DIR", "server.state_dir", PATH, None,
        field="state_dir", unset="`$XDG_DATA_HOME/azproxy` or `~/.local/share/azproxy`",
        meaning="where the forward proxy's local CA lives (`/var/lib/azproxy` under systemd)",
    ),
    Setting(
        "AZPROXY_TLS_CERT", "server.tls_cert", EXISTING_FILE, None, field="tls_cert",
        meaning="certificate file (with `AZPROXY_TLS_KEY`): serve HTTPS on azproxy's own address",
    ),
    Setting(
        "AZPROXY_TLS_KEY", "server.tls_key", EXISTING_FILE, None, field="tls_key",
        meaning="its private key file",
    ),
    Setting(
        "AZPROXY_STRICT_ENDPOINTS", "server.strict_endpoints", BOOL, "false", field="strict_endpoints",
        meaning="connect to the Azure endpoint and the OpenAI base URL only on public addresses",
    ),
    Setting(
        "AZPROXY_WORKERS", "server.workers", WORKERS, "1", field="workers", flag="--workers",
        meaning="processes serving the one port (`auto`: one per CPU); rate limits then need `AZPROXY_REDIS_URL`",
    ),
    Setting(
        "AZPROXY_SHUTDOWN_GRACE", "server.shutdown_grace", SECONDS, "30", field="shutdown_grace",
        meaning="seconds requests and streams under way may take to finish after SIGTERM or SIGINT",
    ),
    Setting(
        "AZPROXY_ENV_FILE", "", PATH, None, field=None, unset="`./.env`",
        meaning="another `.env` file to read",
    ),
    Setting(
        "AZPROXY_CONFIG", "", PATH, None, field=None,
        meaning="a TOML config file (see below)",
    ),
    # [azure]: the Azure OpenAI resource and how it is called
    Setting(
        "AZURE_OPENAI_ENDPOINT", "azure.endpoint", URL_, None,
        field="azure_endpoint", unset="(required in azure mode)", flag="--endpoint",
        meaning="`https://RESOURCE.openai.azure.com`",
    ),
    Setting(
        "AZURE_OPENAI_APIVERSION", "azure.api_version", API_VERSION, DEFAULT_API_VERSION,
        field="api_version", flag="--api-version",
        meaning="the `api-version` sent to Azure unless the client sends its own",
    ),
    Setting(
        "AZURE_OPENAI_MODEL_MAPPER", "azure.model_mapper", MODEL_MAP, None,
        field="model_map", unset="the gpt-3.5 names, see below", flag="--model-mapper",
        meaning="`model=deployment,...`",
    ),
    Setting(
        "AZURE_OPENAI_TOKEN", "azure.token", SECRET, None, field="azure_token", secret=True,
        meaning="a server-side Azure key; when set it replaces whatever key the client sent",
    ),
    Setting(
        "AZPROXY_AZURE_API", "azure.api", choice(ApiStyle), "deployments", field="api_style",
        meaning="`deployments`: classic URLs with a dated api-version; `v1`: Azure's v1 API",
    ),
    Setting(
        "AZPROXY_APIVERSION_OVERRIDES", "azure.api_version_overrides", VERSION_OVERRIDES, None,
        field="version_overrides",
        meaning='`operation=api-version,...`, see "What is translated"',
    ),
    Setting(
        "AZPROXY_AUTH", "azure.auth", choice(AuthMode), "key", field="auth",
        meaning="`key`: the client's or the server's key; `entra`: Microsoft Entra ID tokens",
    ),
    Setting(
        "AZPROXY_RESPONSE_SHAPE", "azure.response_shape", choice(ResponseShape), "azure",
        field="response_shape",
        meaning="`azure`: answers as Azure sent them; `openai`: in OpenAI's shape",
    ),
    Setting(
        "AZPROXY_FORWARD_RESPONSE_SHAPE", "azure.forward_response_shape", choice(ResponseShape), "openai",
        field="forward_response_shape",
        meaning="`AZPROXY_RESPONSE_SHAPE` for forward-proxy arrivals (`HTTPS_PROXY`, `HTTP_PROXY`), whose "
        "clients believe they talk to api.openai.com",
    ),
    Setting(
        "AZPROXY_FIX_PARAMETERS", "azure.fix_parameters", BOOL, "true", field="fix_parameters",
        meaning="rename or drop a parameter a deployment refuses (`max_tokens`, `temperature` on reasoning "
        "models), send again, and remember it for that deployment",
    ),
    Setting(
        "AZPROXY_API_KEY_HEADER", "azure.api_key_header", HEADER_NAME, "api-key", field="api_key_header",
        meaning="the header a key is sent under; `Ocp-Apim-Subscription-Key` for Azure API Management in front",
    ),
    Setting(
        "AZPROXY_STREAM_USAGE", "azure.stream_usage", BOOL, "true", field="stream_usage",
        meaning="ask Azure to report token usage at the end of streamed answers",
    ),
    # [openai]: the upstream of openai mode
    Setting(
        "AZPROXY_OPENAI_BASE_URL", "openai.base_url", URL_, "https://api.openai.com",
        field="openai_base_url", flag="--openai-base-url",
        meaning="the upstream of openai mode",
    ),
    # [timeouts]: waiting for the upstream
    Setting(
        "AZPROXY_CONNECT_TIMEOUT", "timeouts.connect", SECONDS, "10", field="timeouts.connect",
        meaning="seconds to connect to the upstream (then 502)",
    ),
    Setting(
        "AZPROXY_READ_TIMEOUT", "timeouts.read", SECONDS, "300", field="timeouts.read",
        meaning="seconds of silence from the upstream before giving up: 504 before the answer starts, a final "
        "error event in a stream. It bounds the gap between two chunks, never a whole stream",
    ),
    Setting(
        "AZPROXY_FIRST_BYTE_TIMEOUT", "timeouts.first_byte", SECONDS, None, field="timeouts.first_byte",
        unset="`AZPROXY_READ_TIMEOUT`",
        meaning="seconds from sending a request to the first byte of its answer: then the next backend, or 504",
    ),
    # [failover]: several backends (see "Several backends")
    Setting(
        "AZPROXY_MAX_ATTEMPTS", "failover.max_attempts", COUNT, None, field="failover.max_attempts",
        unset="every candidate once",
        meaning="backends one request is sent to at most, the first included",
    ),
    Setting(
        "AZPROXY_COOLDOWN", "failover.cooldown", SECONDS, "10", field="failover.cooldown",
        meaning="seconds a backend that answered 429 without `retry-after` is skipped for that model",
    ),
    Setting(
        "AZPROXY_CIRCUIT_FAILURES", "failover.circuit_failures", COUNT, "3", field="failover.circuit_failures",
        meaning="consecutive connect errors, timeouts or 5xx answers that open a backend's circuit",
    ),
    Setting(
        "AZPROXY_CIRCUIT_OPEN", "failover.circuit_open", SECONDS, "30", field="failover.circuit_open",
        meaning="seconds an open circuit keeps its backend out; then one request probes it",
    ),
    Setting(
        "AZPROXY_BACKEND_HEADERS", "failover.backend_headers", BOOL, "true", field="failover.backend_headers",
        meaning="answers carry `x-azproxy-backend` and `x-azproxy-attempts`",
    ),
    # [limits]: what one client can make azproxy hold
    Setting(
        "AZPROXY_MAX_BODY", "limits.max_body", SIZE, "32M", field="limits.max_body",
        meaning="largest request body accepted (bytes, or with `K`/`M`/`G`); larger gets 413",
    ),
    Setting(
        "AZPROXY_MAX_BUFFERED", "limits.max_buffered", SIZE, "256M", field="limits.max_buffered",
        meaning="bytes of all request bodies being read at once",
    ),
    Setting(
        "AZPROXY_BODY_TIMEOUT", "limits.body_timeout", SECONDS, "30", field="limits.body_timeout",
        meaning="a request body must arrive within these seconds plus its length over `AZPROXY_BODY_MIN_RATE`",
    ),
    Setting(
        "AZPROXY_BODY_MIN_RATE", "limits.body_min_rate", SIZE, "16K", field="limits.body_min_rate",
        meaning="the slowest a request body may arrive, in bytes a second",
    ),
    Setting(
        "AZPROXY_MAX_HEADER_SIZE", "limits.max_header_size", SIZE, "8190", field="limits.max_header_size",
        meaning="request line and each header line (400)",
    ),
    Setting(
        "AZPROXY_MAX_HEADERS", "limits.max_headers", COUNT, "100", field="limits.max_headers",
        meaning="header count (400)",
    ),
    Setting(
        "AZPROXY_HEADER_TIMEOUT", "limits.header_timeout", SECONDS, "10", field="limits.header_timeout",
        meaning="seconds a new connection, or a new intercepted tunnel, may take to send its first complete "
        "request head",
    ),
    Setting(
        "AZPROXY_KEEPALIVE_TIMEOUT", "limits.keepalive_timeout", SECONDS, "75",
        field="limits.keepalive_timeout",
        meaning="seconds an idle keep-alive connection is kept",
    ),
    Setting(
        "AZPROXY_MAX_CONNECTIONS", "limits.max_connections", COUNT, "10000", field="limits.max_connections",
        meaning="open client connections (tunnels included); newcomers over it are closed at once",
    ),
    Setting(
        "AZPROXY_MAX_CONNECTIONS_PER_IP", "limits.max_connections_per_ip", COUNT, None,
        field="limits.max_connections_per_ip", unset="a tenth of `AZPROXY_MAX_CONNECTIONS`, at least 1",
        meaning="open client connections from one address",
    ),
    # [forward]: the forward proxy (HTTPS_PROXY, HTTP_PROXY)
    Setting(
        "AZPROXY_INTERCEPT_HOSTS", "forward.intercept_hosts", DNS_NAMES, "api.openai.com",
        field="forward.intercept_hosts",
        meaning="hosts whose tunnels azproxy intercepts (azure mode) or relays (openai mode)",
    ),
    Setting(
        "AZPROXY_TUNNEL_ALLOW", "forward.tunnel_allow", TUNNEL_TARGETS, None, field="forward.tunnel_allow",
        meaning="other targets to tunnel blindly: `host` (port 443), `host:port`, `[v6]:port`",
    ),
    Setting(
        "AZPROXY_TUNNEL_ALLOW_DEFAULTS", "forward.tunnel_allow_defaults", BOOL, "true",
        field="forward.tunnel_allow_defaults",
        meaning="also tunnel blindly, to public addresses only, the hosts OpenAI SDKs and tokenizers fetch "
        "from (see Forward proxy)",
    ),
    Setting(
        "AZPROXY_PROXY_AUTH", "forward.proxy_auth", PROXY_AUTH, None, field="forward.proxy_auth", secret=True,
        meaning="`user:password` that forward-proxy requests must carry as `Proxy-Authorization: Basic` (else 407)",
    ),
    # [access]: who may use azproxy
    Setting(
        "AZPROXY_API_KEYS", "access.api_keys", Parser(clients_from_keys), None, field=None, secret=True,
        meaning="client keys, comma-separated; each becomes a client named by its hash",
    ),
    Setting(
        "AZPROXY_CLIENTS_FILE", "access.clients_file", PATH, None, field=None,
        meaning="a TOML file of `[[client]]` tables (see Security)",
    ),
    Setting(
        "AZPROXY_ALLOW_ANONYMOUS", "access.allow_anonymous", BOOL, "false", field="access.allow_anonymous",
        meaning="with a server-side credential, serve clients without keys on a non-loopback address",
    ),
    Setting(
        "AZPROXY_REDIS_URL", "access.redis_url", TEXT, None, field="access.redis_url",
        meaning="`redis://host:6379/0`: rate-limit counters shared by several azproxy processes",
    ),
    Setting(
        "AZPROXY_TRUSTED_PROXIES", "access.trusted_proxies", NETWORKS, None, field="access.trusted_proxies",
        meaning="addresses or networks (`10.0.0.0/8`) of proxies in front of azproxy whose forwarding headers count",
    ),
    Setting(
        "AZPROXY_AUTH_FAILURE_LIMIT", "access.auth_failure_limit", COUNT_OR_ZERO, "5",
        field="access.auth_failure_limit",
        meaning="failed key checks a minute from one address before it gets 429; `0` turns this off",
    ),
    Setting(
        "AZPROXY_CORS_ORIGINS", "access.cors_origins", ORIGINS, None, field="access.cors_origins",
        meaning="browser origins allowed to call azproxy (`https://chat.example.com`, or `*`)",
    ),
    Setting(
        "AZPROXY_ALLOWED_HOSTS", "access.allowed_hosts", HOST_NAMES, None,
        field="access.allowed_hosts", unset="(any)",
        meaning="host names a request's `Host` header may carry (without port)",
    ),
)
# fmt: on

BY_ENV: Final[Mapping[str, Setting]] = MappingProxyType({row.env: row for row in SETTINGS})
BY_KEY: Final[Mapping[str, Setting]] = MappingProxyType({row.key: row for row in SETTINGS if row.key})
#: The config file's settings tables, in the order the docs list them.
FILE_TABLES: Final = tuple(dict.fromkeys(key.partition(".")[0] for key in BY_KEY))
#: Each field's default, read from its row's text: the dataclasses' defaults, so each is stated once, above.
DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {row.field: row.parser.read(row.default) for row in SETTINGS if row.field and row.default is not None}
)
