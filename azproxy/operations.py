"""The table of OpenAI operations azproxy translates, and how an incoming path finds its row."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Final


class Scope(Enum):
    """Where Azure serves an operation: under a deployment, or on the resource itself."""

    DEPLOYMENT = "deployment"
    RESOURCE = "resource"


class BodyKind(Enum):
    JSON = "json"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Operation:
    """One OpenAI operation: its path after `/v1/`, the methods it takes, and how Azure wants it."""

    path: str
    methods: frozenset[str]
    scope: Scope
    body: BodyKind


def _deployment_json(path: str) -> Operation:
    return Operation(path, frozenset({"POST"}), Scope.DEPLOYMENT, BodyKind.JSON)


OPERATIONS: Final[Mapping[str, Operation]] = MappingProxyType(
    {
        op.path: op
        for op in (
            _deployment_json("chat/completions"),
            _deployment_json("completions"),
            _deployment_json("embeddings"),
        )
    }
)


def operation_path(path: str) -> str:
    """The operation part of a client path: `/v1/chat/completions` and `/chat/completions` alike."""
    return path.removeprefix("/v1/") if path.startswith("/v1/") else path.lstrip("/")


def find_operation(path: str) -> Operation | None:
    return OPERATIONS.get(operation_path(path))
