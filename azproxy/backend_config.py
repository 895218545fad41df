"""The config file's `[[backend]]` and `[[model]]` tables: several upstream resources behind one endpoint.

Pure parsing into specs; `backends.py` turns them into live backends. Every mistake is one ConfigError line
naming the file, the table (and which one) and the key, because a half-understood backend list would send
traffic somewhere nobody meant.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from yarl import URL

from .setting_values import (
    API_VERSION,
    HEADER_NAME,
    SECONDS,
    URL_,
    VERSION_OVERRIDES,
    ApiStyle,
    AuthMode,
    ConfigError,
    Mode,
    Secret,
    choice,
)

_NAME: Final = re.compile(r"[A-Za-z0-9_-]+")
_COMMON_KEYS: Final = frozenset(
    {"name", "kind", "api_key", "weight", "priority", "connect_timeout", "first_byte_timeout", "idle_timeout"}
)
_KEYS: Final[Mapping[Mode, frozenset[str]]] = MappingProxyType(
    {
        Mode.AZURE: _COMMON_KEYS
        | {"endpoint", "auth", "entra_scope", "api_version", "style", "version_overrides", "api_key_header"},
        Mode.OPENAI: _COMMON_KEYS | {"base_url"},
    }
)
_MODEL_KEYS: Final = frozenset({"name", "deployments"})
DEFAULT_OPENAI_URL: Final = URL("https://api.openai.com")

#: Resolves a credential reference (`env:NAME`, `file:/path`) given where it is written; raises ConfigError.
SecretReader = Callable[[str, str], str]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One `[[backend]]` table; None means "as the global setting says"."""

    name: str
    kind: Mode
    url: URL
    api_key: Secret | None = None
    auth: AuthMode = AuthMode.KEY
    #: The Entra ID scope; None: the credential's default (Cognitive Services).
    entra_scope: str | None = None
    weight: int = 1
    priority: int = 0
    api_version: str | None = None
    style: ApiStyle | None = None
    version_overrides: Mapping[str, str] | None = None
    connect_timeout: float | None = None
    first_byte_timeout: float | None = None
    idle_timeout: float | None = None
    #: The header its key goes under (API Management's `Ocp-Apim-Subscription-Key`); None: the global one.
    api_key_header: str | None = None

    @property
    def has_credential(self) -> bool:
        return self.api_key is not None or self.auth is AuthMode.ENTRA


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One `[[model]]` table: the model is served only by these backends, under these deployment names."""

    name: str
    deployments: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def parse_tables(
    backends: Any, models: Any, path: Path, secret: SecretReader
) -> tuple[tuple[BackendSpec, ...], tuple[ModelSpec, ...]]:
    """Both tables together: a model's deployments must name backends that exist."""
    specs = tuple(
        _backend(index, entry, path, secret)
        for index, entry in enumerate(_array(backends, "backend", path), 1)
    )
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: [[backend]] name: names must be unique; repeated: {repeated}")
    models_ = tuple(
        _model(index, entry, path, frozenset(names))
        for index, entry in enumerate(_array(models, "model", path), 1)
    )
    named = [model.name for model in models_]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: [[model]] name: each model is named once; repeated: {repeated}")
    return specs, models_


def _array(entries: Any, table: str, path: Path) -> list[dict[str, Any]]:
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{path}: {table!r}: must be an array of tables: [[{table}]]")
    return entries


class _Where:
    """How errors name one table: `file: [[backend]] 'east': key: ...` (its position until its name is known)."""

    def __init__(self, path: Path, table: str, index: int, entry: Mapping[str, Any]) -> None:
        name = entry.get("name")
        shown = repr(name) if isinstance(name, str) and name else f"#{index}"
        self._prefix = f"{path}: [[{table}]] {shown}"

    def place(self, key: str) -> str:
        return f"{self._prefix}: {key}"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.place(key)}: {problem}")


def _backend(index: int, entry: dict[str, Any], path: Path, secret: SecretReader) -> BackendSpec:
    where = _Where(path, "backend", index, entry)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise where.error("name", "required: letters, digits, '_' and '-'")
    kind = _parsed(where, "kind", entry.get("kind", "azure"), choice(Mode).read)
    unknown = sorted(set(entry) - _KEYS[kind])
    if unknown:
        raise where.error(
            unknown[0], f"unknown key (known for kind = {str(kind)!r}: {', '.join(sorted(_KEYS[kind]))})"
        )
    url_key = "endpoint" if kind is Mode.AZURE else "base_url"
    if url_key in entry:
        url = _parsed(where, url_key, _string(where, url_key, entry[url_key]), URL_.read)
    elif kind is Mode.OPENAI:
        url = DEFAULT_OPENAI_URL
    else:
        raise where.error("endpoint", "required: https://RESOURCE.openai.azure.com")
    auth = _parsed(where, "auth", entry.get("auth", "key"), choice(AuthMode).read)
    if auth is AuthMode.ENTRA:
        if "api_key" in entry:
            raise where.error("api_key", 'give either api_key or auth = "entra", not both')
        if importlib.util.find_spec("azure.identity") is None:
            raise where.error("auth", "entra needs azure-identity: pip install 'azproxy[entra]'")
    api_key = entry.get("api_key")
    if api_key is not None:
        api_key = Secret(secret(_string(where, "api_key", api_key), where.place("api_key")))
    return BackendSpec(
        name=name,
        kind=kind,
        url=url,
        api_key=api_key,
        auth=auth,
        entra_scope=_string(where, "entra_scope", entry["entra_scope"]) if "entra_scope" in entry else None,
        weight=_whole(where, "weight", entry.get("weight", 1), least=1),
        priority=_whole(where, "priority", entry.get("priority", 0), least=0),
        api_version=_optional(where, entry, "api_version", API_VERSION.read),
        style=_optional(where, entry, "style", choice(ApiStyle).read),
        version_overrides=_overrides(where, entry.get("version_overrides")),
        connect_timeout=_seconds(where, entry, "connect_timeout"),
        first_byte_timeout=_seconds(where, entry, "first_byte_timeout"),
        idle_timeout=_seconds(where, entry, "idle_timeout"),
        api_key_header=_optional(where, entry, "api_key_header", HEADER_NAME.read),
    )


def _model(index: int, entry: dict[str, Any], path: Path, backends: frozenset[str]) -> ModelSpec:
    where = _Where(path, "model", index, entry)
    unknown = sorted(set(entry) - _MODEL_KEYS)
    if unknown:
        raise where.error(unknown[0], f"unknown key (known: {', '.join(sorted(_MODEL_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise where.error("name", "required: the model name clients send")
    deployments = entry.get("deployments")
    if not isinstance(deployments, dict) or not deployments:
        raise where.error(
            "deployments", 'required: a table of backend = "deployment", e.g. { east = "gpt-4o" }'
        )
    for backend, deployment in deployments.items():
        if backend not in backends:
            known = ", ".join(sorted(backends)) or "none"
            raise where.error("deployments", f"no [[backend]] is named {backend!r} (known: {known})")
        if not isinstance(deployment, str) or not deployment.strip():
            raise where.error("deployments", f"{backend}: the deployment name must be a non-empty string")
    return ModelSpec(name, MappingProxyType(dict(deployments)))


def _parsed(where: _Where, key: str, value: Any, read: Callable[[str], Any]) -> Any:
    try:
        return read(_string(where, key, value))
    except ConfigError as exc:
        raise where.error(key, str(exc)) from None


def _optional(where: _Where, entry: Mapping[str, Any], key: str, read: Callable[[str], Any]) -> Any:
    return _parsed(where, key, entry[key], read) if key in entry else None


def _string(where: _Where, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise where.error(key, "must be a string")
    return value


def _whole(where: _Where, key: str, value: Any, *, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        wanted = "a positive integer" if least > 0 else "a whole number, 0 or more"
        raise where.error(key, f"must be {wanted}, not {value!r}")
    return value


def _seconds(where: _Where, entry: Mapping[str, Any], key: str) -> float | None:
    if key not in entry:
        return None
    value = entry[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise where.error(key, "must be a number of seconds")
    seconds: float = _parsed(where, key, str(value), SECONDS.read)
    return seconds


def _overrides(where: _Where, value: Any) -> Mapping[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(entry, str) for entry in value.values()):
        raise where.error(
            "version_overrides", 'must be a table of strings: { responses = "2025-04-01-preview" }'
        )
    overrides: Mapping[str, str] = _parsed(
        where, "version_overrides", ",".join(f"{k}={v}" for k, v in value.items()), VERSION_OVERRIDES.read
    )
    return overrides
