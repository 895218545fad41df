"""`azproxy check`: one cheap real call per configured model, to learn before clients do that a key, a deployment
or an api-version is wrong, and what to change.

Start-up checks only the shape of each setting; this asks Azure. It also names what start-up accepts but every
request would trip on: an endpoint with the portal's `/openai` path, a deployment name that cannot be a path
segment, an api-version that is no dated version. Secrets never reach the output: only Azure's own error text,
endpoints without credentials, and names.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Final

import aiohttp
from yarl import URL

from .backends import Backend, backends_from
from .config import BUILTIN_MODEL_MAP, ApiStyle, Mode, Secret, Settings
from .credentials import ApiKey, Credential
from .errors import ProxyError
from .listing import LISTING_PATH
from .operations import OPERATIONS
from .resolver import Resolver
from .setting_values import shown
from .translate import api_version_for

#: translate.py's rule: what Azure accepts as a deployment name and what stays one path segment.
_DEPLOYMENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,255}")
#: The classic data plane takes dated versions only; `v1`, `latest` and `preview` belong to the v1 API.
_DATED_VERSION: Final = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
#: Reasoning models refuse `max_tokens` and want `max_completion_tokens`.
_REASONING: Final = re.compile(r"(o\d|gpt-5|codex)", re.IGNORECASE)
_CHAT: Final = OPERATIONS["chat/completions"]
_NO_MODEL: Final = "-"


class Result(StrEnum):
    OK = "ok"
    WRONG_KEY = "wrong key"
    NO_KEY = "no key"
    UNKNOWN_DEPLOYMENT = "unknown deployment"
    RETIRED = "api-version retired"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    BAD_ENDPOINT = "bad endpoint"
    BAD_NAME = "bad deployment name"
    BAD_VERSION = "bad api-version"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Row:
    """One model (or one backend-wide check) and what became of it; `fix` is empty when nothing needs changing."""

    backend: str
    model: str
    deployment: str
    result: Result
    reason: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.result is Result.OK


async def check(settings: Settings, *, key: Secret | None = None, seconds: float = 10) -> list[Row]:
    """Every backend's rows, each call bounded by `seconds`. `key` stands in for the client's key where no
    server-side credential is set."""
    rows: list[Row] = []
    backends = backends_from(settings)
    resolver = Resolver().for_connector(settings.strict_endpoints)
    limit = aiohttp.ClientTimeout(total=seconds, sock_connect=min(seconds, settings.timeouts.connect))
    connector = aiohttp.TCPConnector(resolver=resolver)
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=limit, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            configured = _configured_endpoints(settings)
            for backend in backends:
                problem = _endpoint_problem(backend, configured.get(backend.name))
                if problem is not None:
                    rows.append(problem)
                    continue
                rows += await _check_backend(session, backend, backend.credential or _key(key, backend))
    finally:
        # Backends may share one credential (an Entra sign-in): close each once.
        for credential in {id(b.credential): b.credential for b in backends if b.credential}.values():
            await credential.close()
    return rows


def exit_code(rows: Sequence[Row]) -> int:
    return 0 if rows and all(row.ok for row in rows) else 1


def as_json(rows: Sequence[Row]) -> str:
    return json.dumps(
        {"ok": exit_code(rows) == 0, "rows": [asdict(row) | {"ok": row.ok} for row in rows]}, indent=2
    )


def as_table(rows: Sequence[Row]) -> str:
    """Aligned columns, then what to change for each row that is not ok."""
    head = ("BACKEND", "MODEL", "DEPLOYMENT", "RESULT", "REASON")
    cells = [head, *((row.backend, row.model, row.deployment, str(row.result), row.reason) for row in rows)]
    widths = [max(len(line[column]) for line in cells) for column in range(len(head) - 1)]
    lines = [
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[-1]]
        ).rstrip()
        for line in cells
    ]
    fixes = [f"  {row.backend} {row.model}: {row.fix}" for row in rows if row.fix]
    verdict = "all ok" if exit_code(rows) == 0 else f"{sum(not row.ok for row in rows)} of {len(rows)} not ok"
    return "\n".join([*lines, "", *(["What to change:", *fixes, ""] if fixes else []), verdict])


def _key(key: Secret | None, backend: Backend) -> Credential | None:
    return (
        ApiKey(key, as_bearer=backend.kind is Mode.OPENAI, header=backend.api_key_header)
        if key is not None
        else None
    )


def _user_models(backend: Backend) -> Mapping[str, str]:
    """The mapper's own entries that this backend serves: the built-in gpt-3.5 spellings are offered to everyone,
    configured by no one."""
    return {m: d for m, d in backend.model_map.items() if BUILTIN_MODEL_MAP.get(m) != d and backend.serves(m)}


async def _check_backend(
    session: aiohttp.ClientSession, backend: Backend, credential: Credential | None
) -> list[Row]:
    if backend.kind is Mode.OPENAI:
        return [await _probe(session, backend, credential, _NO_MODEL, _NO_MODEL, "GET", "/v1/models", None)]
    version = api_version_for(_CHAT, backend)
    if backend.style is ApiStyle.DEPLOYMENTS and not _DATED_VERSION.fullmatch(version):
        return [
            Row(
                backend.name,
                _NO_MODEL,
                _NO_MODEL,
                Result.BAD_VERSION,
                f"api-version {version!r} is no dated version, which the classic data plane needs",
                "set AZURE_OPENAI_APIVERSION to a version such as 2024-10-21, "
                "or AZPROXY_AZURE_API=v1 for Azure's v1 API",
            )
        ]
    models = _user_models(backend)
    if not models:
        # Clients' model names then go out as deployment names: show which ones exist, and (the listing has a
        # version of its own) whether the configured api-version is still answered.
        rows = [await _probe(session, backend, credential, _NO_MODEL, "(listing)", "GET", LISTING_PATH, None)]
        if rows[0].ok and backend.style is ApiStyle.DEPLOYMENTS:
            path = f"/openai/models?api-version={version}"
            rows.append(
                await _probe(session, backend, credential, _NO_MODEL, "(api-version)", "GET", path, None)
            )
        return rows
    rows = []
    for model, deployment in models.items():
        if not _DEPLOYMENT_NAME.fullmatch(deployment):
            rows.append(
                Row(
                    backend.name,
                    model,
                    deployment,
                    Result.BAD_NAME,
                    "not a valid Azure deployment name: every request for this model would get 400",
                    "use the deployment's name as the portal shows it (letters, digits, '.', '_', '-', ':')",
                )
            )
            continue
        method, path, body = _chat_call(backend, model, deployment, version)
        rows.append(await _probe(session, backend, credential, model, deployment, method, path, body))
    return rows


def _configured_endpoints(settings: Settings) -> dict[str, URL]:
    """Each backend's endpoint as written in the settings (backends_from drops a trailing `/openai`)."""
    if settings.backends:
        return {spec.name: spec.url for spec in settings.backends if spec.kind is Mode.AZURE}
    return {"azure": settings.azure_endpoint} if settings.azure_endpoint is not None else {}


def _endpoint_problem(backend: Backend, configured: URL | None) -> Row | None:
    """The portal shows `https://R.openai.azure.com/openai/...` URLs; azproxy adds `/openai` itself and drops a
    copied one with a warning at start-up, but the setting should say what is meant. A path prefix of API
    Management (`https://NAME.azure-api.net/openai-prod`) is no problem."""
    if configured is None or not configured.path.rstrip("/").endswith("/openai"):
        return None
    return Row(
        backend.name,
        _NO_MODEL,
        _NO_MODEL,
        Result.BAD_ENDPOINT,
        f"the endpoint ends in /openai, which azproxy adds itself (it uses {shown(backend.origin)} meanwhile)",
        f"set the endpoint to {shown(backend.origin)}",
    )


def _chat_call(
    backend: Backend, model: str, deployment: str, version: str
) -> tuple[str, str, dict[str, Any]]:
    """A one-token chat, in the URL style the backend uses; reasoning models take `max_completion_tokens`."""
    limit = (
        "max_completion_tokens" if _REASONING.match(model) or _REASONING.match(deployment) else "max_tokens"
    )
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "ping"}], limit: 1}
    if backend.style is ApiStyle.V1:
        return "POST", "/openai/v1/chat/completions", body | {"model": deployment}
    return "POST", f"/openai/deployments/{deployment}/chat/completions?api-version={version}", body


async def _probe(
    session: aiohttp.ClientSession,
    backend: Backend,
    credential: Credential | None,
    model: str,
    deployment: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> Row:
    def row(result: Result, reason: str, fix: str = "") -> Row:
        return Row(backend.name, model, deployment, result, reason, fix)

    if credential is None:
        return row(
            Result.NO_KEY,
            "no server-side credential: clients bring their own keys, so there is none to check with",
            "pass --key-env NAME, NAME being a variable that holds an Azure key, or set AZURE_OPENAI_TOKEN",
        )
    try:
        headers = dict(await credential.headers())
    except ProxyError as exc:
        return row(Result.WRONG_KEY, exc.message, "check the Entra ID identity azproxy runs as")
    started = time.monotonic()
    try:
        async with session.request(method, backend.origin + path, json=body, headers=headers) as response:
            text = await response.text(errors="replace")
            status = response.status
    except (TimeoutError, aiohttp.ServerTimeoutError):
        return row(
            Result.TIMEOUT,
            f"no answer from {shown(backend.origin)} in time",
            "check the endpoint, firewalls and proxies between here and Azure",
        )
    except aiohttp.ClientError as exc:
        return row(
            Result.UNREACHABLE,
            f"could not connect to {shown(backend.origin)} ({type(exc).__name__})",
            "check the endpoint's host name and port, DNS and firewalls",
        )
    elapsed = round((time.monotonic() - started) * 1000)
    return row(*_judged(status, _error(text), path, elapsed, text))


def _judged(
    status: int, error: tuple[str, str], path: str, elapsed: int, text: str
) -> tuple[Result, str, str]:
    """Azure's answer into a result, reason and fix. Anything past the key, deployment and version checks proves
    them right."""
    code, message = error
    said = f"Azure answered {status}" + (f" {code}" if code and code != str(status) else "")
    said += f": {message}" if message else ""
    if status == 200 and path == LISTING_PATH:
        names = ", ".join(_deployment_ids(text)) or "none"
        return Result.OK, f"no model mapped; the resource lists these deployments: {names}", ""
    if status == 200 and path.startswith("/openai/models"):
        return Result.OK, "the api-version is answered", ""
    if status == 200:
        return Result.OK, f"answered in {elapsed} ms", ""
    if status == 429 or (status == 400 and code == "OperationNotSupported"):
        return Result.OK, f"reached the deployment ({said})", ""
    if status in (401, 403):
        return Result.WRONG_KEY, said, "use a key of this resource (portal: Keys and Endpoint)"
    if status == 404 and path == LISTING_PATH:
        return (
            Result.REFUSED,
            f"{said}: the resource does not list its deployments on the data plane",
            "map the models clients use (AZURE_OPENAI_MODEL_MAPPER), so that each one is checked",
        )
    if status == 404 and code == "DeploymentNotFound":
        return (
            Result.UNKNOWN_DEPLOYMENT,
            said,
            "map the model to a deployment that exists (AZURE_OPENAI_MODEL_MAPPER=model=deployment)",
        )
    if status == 404 or (status == 400 and "api version" in message.lower()):
        return (
            Result.RETIRED,
            f"{said}: the api-version is retired or was never offered",
            "set AZURE_OPENAI_APIVERSION to a current version such as 2024-10-21",
        )
    return Result.REFUSED, said, "see Azure's message"


def _error(text: str) -> tuple[str, str]:
    """Azure's `{"error": {"code", "message"}}`, or nothing when the body is something else."""
    try:
        document = json.loads(text)
    except ValueError:
        return "", ""
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code") or ""), " ".join(str(error.get("message") or "").split())[:300]


def _deployment_ids(text: str) -> list[str]:
    try:
        document = json.loads(text)
    except ValueError:
        return []
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return []
    return sorted({str(item["id"]) for item in data if isinstance(item, dict) and "id" in item})


def run_check(settings: Settings, *, key: Secret | None, timeout: float, json_output: bool) -> int:
    """The command: rows printed as a table or as JSON; 0 only when every row is ok."""
    rows = asyncio.run(check(settings, key=key, seconds=timeout))
    print(as_json(rows) if json_output else as_table(rows))
    return exit_code(rows)


def health_url(settings: Settings) -> str:
    """Where this host reaches azproxy's own /healthz: a wildcard address through the loopback of its family."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        settings.address.host, settings.address.host
    )
    shown_host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{shown_host}:{settings.address.port}/healthz"


async def healthy(settings: Settings, seconds: float = 3) -> bool:
    """Whether azproxy answers 200 on /healthz. Its certificate is not verified: this asks whether the process
    serves, not who it is, and a self-signed certificate is common on an own listener."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session,
            session.get(health_url(settings), ssl=False, allow_redirects=False) as response,
        ):
            return response.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False
