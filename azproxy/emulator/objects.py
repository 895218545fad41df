"""What the stored objects have in common: OpenAI-style ids, cursor-paged lists, lookups that 404 like Azure."""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Mapping
from typing import Any, Final

from multidict import MultiMapping

from .calls import AzureError, not_found

Obj = dict[str, Any]
_ALPHABET: Final = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """Ids as the service makes them: `file-<32 hex>`, `ftjob-<32 hex>`, else `asst_<24 alphanumerics>`."""
    if prefix.endswith("-"):
        return prefix + secrets.token_hex(16)
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def now() -> int:
    return int(time.time())


def find(store: Mapping[str, Obj], kind: str, object_id: str) -> Obj:
    found = store.get(object_id)
    if found is None:
        raise not_found(kind, object_id)
    return found


def page(items: list[Obj], query: MultiMapping[str], default_order: str = "desc") -> Obj:
    """A cursor page (`limit`, `order`, `after`), shaped as the SDK's auto-pagination expects."""
    try:
        limit = min(max(int(query.get("limit", "20")), 1), 100)
    except ValueError:
        raise AzureError(400, "BadRequest", "limit must be an integer.") from None
    ordered = items if query.get("order", default_order) == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


def deleted(object_id: str, object_name: str) -> Obj:
    """The answer to a delete: `{"id", "object": "assistant.deleted", "deleted": true}` and the like."""
    return {"id": object_id, "object": object_name, "deleted": True}
