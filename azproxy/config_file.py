"""The TOML config file (`AZPROXY_CONFIG`): each setting under its key from the settings table, plus
`[[client]]`, `[[backend]]` and `[[model]]` tables. Values become the same text the environment would carry,
so one set of parsers reads both.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .backend_config import BackendSpec, ModelSpec, parse_tables
from .clients import Client, ClientConfigError, clients_from_table
from .setting_values import ConfigError
from .settings_table import BY_KEY, FILE_TABLES, Setting

_TOML_TYPES: Final[Mapping[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
}


@dataclass(frozen=True, slots=True)
class SettingText:
    """A setting's text, and how an error names where it came from: the variable, or the file's line and key."""

    text: str
    origin: str


@dataclass(frozen=True, slots=True)
class ConfigFile:
    #: By variable name.
    texts: Mapping[str, SettingText] = field(default_factory=dict)
    clients: tuple[Client, ...] = ()
    backends: tuple[BackendSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()


def read_config_file(path: Path, environ: Mapping[str, str]) -> ConfigFile:
    """Refuse whatever the file holds that no setting reads: a typo must not pass for a setting."""
    try:
        content = path.read_text()
    except OSError as exc:
        raise ConfigError(f"AZPROXY_CONFIG: cannot read {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    places = _Places(path, content)
    texts: dict[str, SettingText] = {}
    clients: tuple[Client, ...] = ()
    for table, entries in document.items():
        if table == "client":
            try:
                clients = clients_from_table(entries, environ, base=path.parent)
            except ClientConfigError as exc:
                raise ConfigError(f"{path}: [[client]]: {exc}") from None
        elif table in ("backend", "model"):
            continue  # read together below: a model names backends
        elif table in FILE_TABLES and isinstance(entries, dict):
            texts |= _table_texts(table, entries, places, environ, path.parent)
        else:
            raise ConfigError(f"{places.table(table)}: {_not_a_table(table)}")
    backends, models = parse_tables(
        document.get("backend"),
        document.get("model"),
        path,
        lambda reference, origin: _secret(reference, origin, environ, path.parent),
    )
    return ConfigFile(texts, clients, backends, models)


def _table_texts(
    table: str, entries: Mapping[str, Any], places: _Places, environ: Mapping[str, str], base: Path
) -> dict[str, SettingText]:
    texts = {}
    for key, value in entries.items():
        origin = places.key(table, key)
        row = BY_KEY.get(f"{table}.{key}")
        if row is None:
            known = ", ".join(name.partition(".")[2] for name in BY_KEY if name.startswith(f"{table}."))
            raise ConfigError(f"{origin}: unknown key (known in [{table}]: {known})")
        texts[row.env] = SettingText(_text(row, value, origin, environ, base), origin)
    return texts


def _not_a_table(name: str) -> str:
    """Most often a setting written outside its table: then say which table it belongs in."""
    homes = [key.replace(".", "] ", 1) for key in BY_KEY if key.partition(".")[2] == name]
    if homes:
        return f"settings go in their table: [{homes[0]}"
    tables = ", ".join(f"[{table}]" for table in FILE_TABLES)
    return f"not a settings table (known: {tables}, [[client]], [[backend]], [[model]])"


def _text(row: Setting, value: Any, origin: str, environ: Mapping[str, str], base: Path) -> str:
    """The value as the environment would spell it: arrays and tables comma-separated, booleans lower-case."""
    if type(value) not in row.parser.file_types:
        expected = " or ".join(_TOML_TYPES[kind] for kind in row.parser.file_types)
        raise ConfigError(
            f"{origin}: expected {expected}, not {_TOML_TYPES.get(type(value), 'a date or time')}"
        )
    entries = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    if not all(isinstance(entry, str) for entry in entries):
        raise ConfigError(f"{origin}: every entry must be a string")
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = ",".join(value)
    elif isinstance(value, dict):
        text = ",".join(f"{name}={entry}" for name, entry in value.items())
    else:
        text = str(value)
    return _secret(text, origin, environ, base) if row.secret and text.strip() else text


def _secret(reference: str, origin: str, environ: Mapping[str, str], base: Path) -> str:
    """A file that may be shared or committed only points at a credential, as `[[client]]` keys do."""
    kind, _, name = reference.strip().partition(":")
    if kind == "env":
        if not environ.get(name, "").strip():
            raise ConfigError(f"{origin}: environment variable {name!r} is not set")
        return environ[name]
    if kind == "file":
        try:
            secret = (base / name).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read {name}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"{origin}: {name} is empty")
        return secret
    raise ConfigError(f"{origin}: give env:NAME or file:/path here, never the secret itself")


class _Places:
    """Names a place in the file as `path:line: [table] key`; tomllib keeps no lines, so they are looked up."""

    _HEADER: Final = re.compile(r"\s*\[\[?\s*([\w.-]+)\s*\]")

    def __init__(self, path: Path, content: str) -> None:
        self._path = path
        self._lines = content.splitlines()

    def key(self, table: str, key: str) -> str:
        return f"{self._where(table, key)} [{table}] {key}"

    def table(self, table: str) -> str:
        return f"{self._where(table, None)} {table!r}"

    def _where(self, table: str, key: str | None) -> str:
        line = self._line(table, key)
        return f"{self._path}:{line}:" if line else f"{self._path}:"

    def _line(self, table: str, key: str | None) -> int | None:
        """The table's header, or the key's line inside it; either may also be written dotted at the root."""
        name = re.escape(table) + (rf"\s*\.\s*['\"]?{re.escape(key)}" if key else "")
        at_root = re.compile(rf"\s*{name}['\"]?\s*[=.]")
        in_table = re.compile(rf"\s*['\"]?{re.escape(key)}['\"]?\s*[=.]") if key else None
        current = ""
        for number, line in enumerate(self._lines, 1):
            header = self._HEADER.match(line)
            if header:
                current = header[1]
                if key is None and current == table:
                    return number
            elif (not current and at_root.match(line)) or (
                current == table and in_table is not None and in_table.match(line)
            ):
                return number
        return None
