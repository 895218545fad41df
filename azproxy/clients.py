"""Client keys: who may use azproxy, with which models, at what rate.

Keys come from `AZPROXY_API_KEYS` or a `[[client]]` table (in `AZPROXY_CLIENTS_FILE`, and later any TOML config),
never as plain text in a file: an entry names an environment variable (`env:NAME`), a file (`file:/path`) or
the key's SHA-256 (`sha256:HEX`). Only digests are kept in memory. A key shorter than `MIN_KEY_LENGTH` is
refused at start-up (a digest's key cannot be measured).
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .setting_values import ConfigError

#: Characters a client key needs at least: short keys fall to guessing, however slow it is made.
MIN_KEY_LENGTH: Final = 16


class ClientConfigError(ValueError):
    """A client entry is malformed; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    key_digest: bytes
    #: Models (as the client names them) this client may use; None allows all.
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    #: Sees every stored object (files, assistants, responses, ...), whoever created it: for operators.
    shared_objects: bool = False

    def may_use(self, model: str | None) -> bool:
        return self.models is None or model is None or model in self.models


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def short_hash(key: str) -> str:
    """How a key may appear in logs: never itself, only the start of its hash."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def find_client(clients: Iterable[Client], key: str) -> Client | None:
    """The client holding `key`; every entry is compared, in constant time, whatever matches first."""
    presented = digest(key)
    found = None
    for client in clients:
        if hmac.compare_digest(client.key_digest, presented):
            found = client
    return found


def clients_from_keys(text: str) -> tuple[Client, ...]:
    """`AZPROXY_API_KEYS=k1,k2`: each key a client named by its short hash."""
    keys = [key.strip() for key in text.split(",") if key.strip()]
    for key in keys:
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(f"key key-{short_hash(key)} is {_too_short(key)}")
    return tuple(Client(f"key-{short_hash(key)}", digest(key)) for key in keys)


def clients_from_file(path: Path, environ: Mapping[str, str]) -> tuple[Client, ...]:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ClientConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClientConfigError(f"{path} is not valid TOML: {exc}") from None
    return clients_from_table(document.get("client", []), environ, base=path.parent)


def clients_from_table(entries: Any, environ: Mapping[str, str], base: Path) -> tuple[Client, ...]:
    """The `[[client]]` array of tables: name, key, optional models, rpm, tpm, shared_objects."""
    if not isinstance(entries, list):
        raise ClientConfigError("'client' must be an array of tables: [[client]]")
    clients = tuple(_client(index, entry, environ, base) for index, entry in enumerate(entries, 1))
    names = [client.name for client in clients]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ClientConfigError(f"client names must be unique; repeated: {duplicates}")
    return clients


def _client(index: int, entry: Any, environ: Mapping[str, str], base: Path) -> Client:
    where = f"client #{index}"
    if not isinstance(entry, dict):
        raise ClientConfigError(f"{where} is not a table")
    unknown = set(entry) - {"name", "key", "models", "rpm", "tpm", "shared_objects"}
    if unknown:
        raise ClientConfigError(f"{where}: unknown fields {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ClientConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"client {name!r}"
    models = entry.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ClientConfigError(f"{where}: 'models' must be a list of model names")
    shared = entry.get("shared_objects", False)
    if not isinstance(shared, bool):
        raise ClientConfigError(f"{where}: 'shared_objects' must be true or false")
    return Client(
        name=name,
        key_digest=_key_digest(where, entry.get("key"), environ, base),
        models=frozenset(models) if models is not None else None,
        rpm=_limit(where, "rpm", entry.get("rpm")),
        tpm=_limit(where, "tpm", entry.get("tpm")),
        shared_objects=shared,
    )


def _key_digest(where: str, source: Any, environ: Mapping[str, str], base: Path) -> bytes:
    if not isinstance(source, str):
        raise ClientConfigError(f"{where}: 'key' must be a string: env:NAME, file:/path or sha256:HEX")
    kind, _, value = source.partition(":")
    if kind == "env":
        key = environ.get(value, "").strip()
        if not key:
            raise ClientConfigError(f"{where}: environment variable {value!r} is not set")
        if len(key) < MIN_KEY_LENGTH:
            raise ClientConfigError(
                f"{where}: the key in environment variable {value!r} is {_too_short(key)}"
            )
        return digest(key)
    if kind == "file":
        try:
            key = (base / value).read_text().strip()
        except OSError as exc:
            raise ClientConfigError(f"{where}: cannot read key file {value!r}: {exc.strerror}") from None
        if not key:
            raise ClientConfigError(f"{where}: key file {value!r} is empty")
        if len(key) < MIN_KEY_LENGTH:
            raise ClientConfigError(f"{where}: the key in file {value!r} is {_too_short(key)}")
        return digest(key)
    if kind == "sha256":
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ClientConfigError(f"{where}: sha256: needs 64 hex digits")
        return raw
    raise ClientConfigError(
        f"{where}: 'key' must be env:NAME, file:/path or sha256:HEX, never the key itself"
    )


def _too_short(key: str) -> str:
    return f"shorter than {MIN_KEY_LENGTH} characters ({len(key)}), the least a client key needs"


def _limit(where: str, field: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ClientConfigError(f"{where}: {field!r} must be a positive whole number")
    return value
