"""Parameters a deployment refuses, fixed on the client's behalf (AZPROXY_FIX_PARAMETERS).

Azure's reasoning deployments (o-series, gpt-5) answer a chat that sends `max_tokens` or a sampling parameter
with 400 `unsupported_parameter` naming it, where OpenAI's own API renames or ignores it. Clients written for
older models then fail; azproxy instead renames `max_tokens` to `max_completion_tokens` or drops the sampling
parameter, sends the request again, and remembers the fix for that deployment so later requests go out fixed.
Pure: reading Azure's 400, choosing the fix, applying it to a body; the pipeline does the sending.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from . import bodies

#: Parameters a newer one replaces, and what Azure wants instead.
RENAMED: Final = {"max_tokens": "max_completion_tokens"}
#: Parameters reasoning models do not take at all (Azure's "reasoning models" guide): dropped.
DROPPED: Final = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs"})
#: Re-sends of one request at most: one per parameter Azure names.
MAX_RETRIES: Final = 3
#: Deployments remembered at most (the oldest is forgotten first).
MAX_REMEMBERED: Final = 1024
#: Names what was changed in the request an answer answers.
ADJUSTED_HEADER: Final = "x-azproxy-adjusted"
#: Azure's message when it names no `param`: "Unsupported parameter: 'max_tokens' is not supported ...".
_NAMED: Final = re.compile(r"[Uu]nsupported parameter: '([a-z_]+)'")


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One parameter renamed (`to` set) or dropped."""

    parameter: str
    to: str | None = None

    def __str__(self) -> str:
        return f"{self.parameter}->{self.to}" if self.to else self.parameter


def refused(status: int, body: bytes) -> Adjustment | None:
    """The fix for the parameter Azure's answer refuses, or None when it is no such refusal (or none we fix)."""
    if status != 400:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict) or error.get("code") != "unsupported_parameter":
        return None
    parameter = error.get("param")
    if not isinstance(parameter, str):
        named = _NAMED.search(str(error.get("message", "")))
        parameter = named[1] if named else None
    if parameter in RENAMED:
        return Adjustment(parameter, RENAMED[parameter])
    return Adjustment(parameter) if parameter in DROPPED else None


def apply(body: bytes, adjustments: Iterable[Adjustment]) -> tuple[bytes, tuple[Adjustment, ...]]:
    """`body` (a JSON object) with each adjustment whose parameter it holds, and the adjustments made.

    A rename whose new name the body already holds drops the old parameter instead (the client said both).
    Every other byte stays as sent.
    """
    made: list[Adjustment] = []
    for adjustment in dict.fromkeys(adjustments):
        if not bodies.has_member(body, adjustment.parameter):
            continue
        if adjustment.to is not None and not bodies.has_member(body, adjustment.to):
            body = bodies.rename_member(body, adjustment.parameter, adjustment.to)
        else:
            body = bodies.remove_member(body, adjustment.parameter)
        made.append(adjustment)
    return body, tuple(made)


def header_value(adjustments: Iterable[Adjustment]) -> str:
    """`max_tokens->max_completion_tokens,temperature`."""
    return ",".join(str(adjustment) for adjustment in adjustments)


class ParameterMemory:
    """The fixes each backend's deployment needed, so later requests are sent fixed (one upstream call)."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._fixes: OrderedDict[tuple[str, str], tuple[Adjustment, ...]] = OrderedDict()

    def get(self, backend: str, deployment: str) -> tuple[Adjustment, ...]:
        key = (backend, deployment)
        fixes = self._fixes.get(key, ())
        if fixes:
            self._fixes.move_to_end(key)
        return fixes

    def remember(self, backend: str, deployment: str, adjustment: Adjustment) -> None:
        key = (backend, deployment)
        known = self._fixes.pop(key, ())
        self._fixes[key] = known if adjustment in known else (*known, adjustment)
        while len(self._fixes) > self._limit:
            self._fixes.popitem(last=False)
