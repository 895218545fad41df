"""The values settings hold, and the parsers that read each one from the text a user writes.

A parser knows nothing of where its text came from: it raises ConfigError with what is wrong, and the loader
puts the variable's name (or the config file's table and key) in front.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from yarl import URL

from .headers import HEADER_NAME as HEADER_PATTERN
from .operations import OPERATIONS

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
_API_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,40}")
_SIZE_UNITS: Final = {"K": 1024, "M": 1024**2, "G": 1024**3}

_T = TypeVar("_T")
_Choice = TypeVar("_Choice", bound=StrEnum)


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and the bad part."""


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


def header_name(text: str) -> str:
    """A header name such as `Ocp-Apim-Subscription-Key`."""
    name = text.strip()
    if not HEADER_PATTERN.fullmatch(name):
        raise ConfigError(f"{name!r} is not an HTTP header name")
    return name


class LogFormat(StrEnum):
    """`auto`: JSON when stdout is not a terminal (systemd, Docker), readable text when it is."""

    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


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
class AllowedTarget:
    """An allowlisted forward-proxy target; without a port only 443 is allowed."""

    host: str
    port: int | None = None

    def admits(self, host: str, port: int) -> bool:
        return host == self.host and port == (self.port or 443)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Parser(Generic[_T]):
    """How one setting's text becomes its value, and which TOML types its config-file key may hold
    (arrays and tables are joined into the same comma-separated text the environment would carry)."""

    read: Callable[[str], _T]
    file_types: tuple[type, ...] = (str,)


def parse_address(text: str) -> Address:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{shown(text)!r} is not host:port")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"port {port_text!r} is not a number from 1 to 65535")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} is not an IPv6 address") from None
    return Address(host, int(port_text))


def parse_model_map(text: str) -> Mapping[str, str]:
    """`model=deployment,...` on top of the built-in map; later entries win."""
    return MappingProxyType(dict(BUILTIN_MODEL_MAP) | _pairs(text, "model=deployment"))


def choice(kind: type[_Choice]) -> Parser[_Choice]:
    def read(text: str) -> _Choice:
        try:
            return kind(text.strip().lower())
        except ValueError:
            choices = " or ".join(repr(member.value) for member in kind)
            raise ConfigError(f"{text.strip()!r} is not {choices}") from None

    return Parser(read)


def _pairs(text: str, form: str) -> dict[str, str]:
    pairs = {}
    for entry in _entries(text):
        name, sep, value = (piece.strip() for piece in entry.partition("="))
        if not sep or not name or not value:
            raise ConfigError(f"entry {entry!r} is not {form}")
        pairs[name] = value
    return pairs


def _entries(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _version_overrides(text: str) -> Mapping[str, str]:
    overrides = _pairs(text, "operation=api-version")
    for family, version in overrides.items():
        if family not in OPERATIONS:
            raise ConfigError(f"unknown operation {family!r} (known: {', '.join(sorted(OPERATIONS))})")
        _api_version(version)
    return MappingProxyType(overrides)


def _api_version(text: str) -> str:
    if not _API_VERSION.fullmatch(text.strip()):
        raise ConfigError(f"{text!r} is not an api-version such as 2024-10-21 or 2025-04-01-preview")
    return text.strip()


def shown(text: str) -> str:
    """A URL-like text fit for an error message: no `user:password@` and no query or fragment, which may hold
    credentials (`?api-key=...`). Everything up to the last `@` goes, since a password may hold `/` or `@`."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    bare = rest.split("?", 1)[0].split("#", 1)[0]
    return scheme + sep + bare + ("?..." if bare != rest else "")


def _url(text: str) -> URL:
    try:
        url = URL(text.strip())
    except ValueError:
        raise ConfigError(f"{shown(text)!r} is not an http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{shown(text)!r} is not an http(s) URL")
    if url.user is not None or url.password is not None:
        raise ConfigError(f"{shown(text)!r} must not carry a user name or password")
    if url.query_string or url.fragment:
        raise ConfigError(f"{shown(text)!r} must not carry a query or fragment")
    return url.with_path(url.path.rstrip("/"))


def _size(text: str) -> int:
    size = text.strip().upper()
    number, unit = (size[:-1], _SIZE_UNITS[size[-1]]) if size[-1] in _SIZE_UNITS else (size, 1)
    if not number.isdigit() or int(number) == 0:
        raise ConfigError(f"{text.strip()!r} is not a positive size such as 33554432 or 32M")
    return int(number) * unit


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{text!r} is not a positive number of seconds")
    return seconds


def _count(text: str, *, zero_allowed: bool = False) -> int:
    text = text.strip()
    if not text.isdigit() or (int(text) == 0 and not zero_allowed):
        raise ConfigError(f"{text!r} is not a {'' if zero_allowed else 'positive '}whole number")
    return int(text)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{text!r} is not true or false")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{text!r} is not DEBUG, INFO, WARNING or ERROR")
    return level


def _dns_names(text: str) -> tuple[str, ...]:
    hosts = tuple(dict.fromkeys(host.lower().rstrip(".") for host in _entries(text)))
    for host in hosts:
        if not _HOST_NAME.fullmatch(host):
            raise ConfigError(f"{shown(host)!r} is not a DNS host name")
    return hosts


def _host_names(text: str) -> tuple[str, ...]:
    """DNS names or IP addresses as a Host header carries them, without port; IPv6 without brackets."""
    hosts = tuple(dict.fromkeys(host.lower().rstrip(".").strip("[]") for host in _entries(text)))
    for host in hosts:
        if not _HOST_NAME.fullmatch(host) and not _is_ip(host):
            raise ConfigError(f"{shown(host)!r} is not a host name or IP address (give no port)")
    return hosts


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _tunnel_targets(text: str) -> tuple[AllowedTarget, ...]:
    """`host`, `host:port` or `[v6]:port`, comma-separated."""
    targets = []
    for entry in (entry.lower() for entry in _entries(text)):
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":")
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:
            host, port = entry, ""
        if not host or (port and (not port.isdigit() or not 0 < int(port) < 65536)):
            raise ConfigError(f"entry {shown(entry)!r} is not host, host:port or [v6]:port")
        targets.append(AllowedTarget(host, int(port) if port else None))
    return tuple(targets)


def _networks(text: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(entry) for entry in _entries(text))
    except ValueError as exc:
        raise ConfigError(f"{exc} (give addresses or networks such as 10.0.0.0/8)") from None


def _origins(text: str) -> tuple[str, ...]:
    """`*` or `scheme://host[:port]`, as browsers send Origin: no path, lower case."""
    origins = tuple(dict.fromkeys(entry.lower().rstrip("/") for entry in _entries(text)))
    for origin in origins:
        if origin != "*" and not _is_origin(origin):
            raise ConfigError(f"{shown(origin)!r} is not an origin such as https://chat.example.com or *")
    return origins


def _is_origin(origin: str) -> bool:
    try:
        url = URL(origin)
    except ValueError:
        return False
    bare = not (url.raw_path.strip("/") or url.query_string or url.fragment or url.user)
    return url.scheme in ("http", "https") and bool(url.host) and bare


def _proxy_auth(text: str) -> Secret:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ConfigError("expected user:password (both non-empty)")
    return Secret(text.strip())


def _existing_file(text: str) -> Path:
    path = Path(text.strip()).expanduser()
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    return path


TEXT: Final = Parser(str.strip)
PATH: Final = Parser(lambda text: Path(text.strip()).expanduser())
EXISTING_FILE: Final = Parser(_existing_file)
SECRET: Final = Parser(lambda text: Secret(text.strip()))
PROXY_AUTH: Final = Parser(_proxy_auth)
BOOL: Final = Parser(_bool, (bool,))
COUNT: Final = Parser(_count, (int,))
COUNT_OR_ZERO: Final = Parser(lambda text: _count(text, zero_allowed=True), (int,))
SIZE: Final = Parser(_size, (int, str))
SECONDS: Final = Parser(_seconds, (int, float))
URL_: Final = Parser(_url)
ADDRESS: Final = Parser(parse_address)
API_VERSION: Final = Parser(_api_version)
LOG_LEVEL: Final = Parser(_log_level)
HEADER_NAME: Final = Parser(header_name)
MODEL_MAP: Final = Parser(parse_model_map, (str, dict))
VERSION_OVERRIDES: Final = Parser(_version_overrides, (str, dict))
DNS_NAMES: Final = Parser(_dns_names, (str, list))
HOST_NAMES: Final = Parser(_host_names, (str, list))
TUNNEL_TARGETS: Final = Parser(_tunnel_targets, (str, list))
NETWORKS: Final = Parser(_networks, (str, list))
ORIGINS: Final = Parser(_origins, (str, list))
