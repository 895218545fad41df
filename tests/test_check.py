"""`azproxy check` against the emulator on loopback: each way a configuration can be wrong gets its own result,
the exit code says whether every row is ok, and no key ever reaches the output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from azproxy.check import Result, Row, as_table, check, exit_code
from azproxy.cli import main
from azproxy.config import Secret, load_settings
from azproxy.emulator import Emulator

from .conftest import AZURE_KEY, SECRETS

WRONG_KEY = "not-the-azure-key-for-check"
SECRETS.add(WRONG_KEY)


def _endpoint(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def _source(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "AZURE_OPENAI_ENDPOINT": endpoint,
        "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",
        "AZURE_OPENAI_TOKEN": AZURE_KEY,
        "AZURE_OPENAI_MODEL_MAPPER": "gpt-4o=gpt-4o",
    } | extra


async def _rows(endpoint: str, **extra: str) -> list[Row]:
    return await check(load_settings(_source(endpoint, **extra)), seconds=2)


async def _only(endpoint: str, **extra: str) -> Row:
    (row,) = await _rows(endpoint, **extra)
    return row


async def _cli(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], *args: str) -> int:
    """The command as a shell runs it: settings from the environment (no stray .env), in a thread of its own
    because the command runs its own event loop."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return await asyncio.to_thread(main, ["check", *args])


@pytest.fixture(autouse=True)
def _no_stray_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("AZURE_OPENAI_TOKEN", "AZURE_OPENAI_APIVERSION", "AZPROXY_CONFIG", "AZPROXY_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)


async def test_all_well_exits_0_and_says_so(
    emulator_server: TestServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mapper = "gpt-4o=gpt-4o,gpt-4.1=gpt-4.1-mini"
    assert await _cli(monkeypatch, _source(_endpoint(emulator_server), AZURE_OPENAI_MODEL_MAPPER=mapper)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["BACKEND", "MODEL", "DEPLOYMENT", "RESULT", "REASON"]
    assert "gpt-4.1-mini" in out
    assert out.rstrip().endswith("all ok")
    assert AZURE_KEY not in out


async def test_wrong_key(emulator_server: TestServer) -> None:
    row = await _only(_endpoint(emulator_server), AZURE_OPENAI_TOKEN=WRONG_KEY)
    assert row.result is Result.WRONG_KEY
    assert "401" in row.reason
    assert "Keys and Endpoint" in row.fix
    assert WRONG_KEY not in as_table([row])


async def test_unknown_deployment(emulator_server: TestServer) -> None:
    row = await _only(_endpoint(emulator_server), AZURE_OPENAI_MODEL_MAPPER="gpt-4o=no-such-deployment")
    assert (row.model, row.deployment, row.result) == (
        "gpt-4o",
        "no-such-deployment",
        Result.UNKNOWN_DEPLOYMENT,
    )
    assert "DeploymentNotFound" in row.reason
    assert "AZURE_OPENAI_MODEL_MAPPER" in row.fix


async def test_retired_api_version(emulator_server: TestServer) -> None:
    row = await _only(_endpoint(emulator_server), AZURE_OPENAI_APIVERSION="2023-03-15-preview")
    assert row.result is Result.RETIRED
    assert "AZURE_OPENAI_APIVERSION" in row.fix


async def test_unreachable_backend(closed_port: int) -> None:
    row = await _only(f"http://127.0.0.1:{closed_port}")
    assert row.result is Result.UNREACHABLE
    assert f"127.0.0.1:{closed_port}" in row.reason


async def test_silent_backend_is_a_timeout() -> None:
    """A listener that accepts and never answers: the call gives up after its own short timeout."""

    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = load_settings(_source(f"http://127.0.0.1:{port}"))
        (row,) = await check(settings, seconds=0.3)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert row.result is Result.TIMEOUT


@pytest.mark.parametrize(
    ("extra", "result"),
    [
        ({"AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9/openai"}, Result.BAD_ENDPOINT),
        ({"AZURE_OPENAI_MODEL_MAPPER": "gpt-4o=my deployment"}, Result.BAD_NAME),
        ({"AZURE_OPENAI_APIVERSION": "latest"}, Result.BAD_VERSION),
    ],
)
async def test_what_start_up_accepts_but_every_request_trips_on(
    extra: dict[str, str], result: Result
) -> None:
    """Found without a call (port 9 would refuse one): each gets its own row and its own fix."""
    row = await _only("http://127.0.0.1:9", **extra)
    assert row.result is result
    assert row.fix


async def test_reasoning_models_get_max_completion_tokens(
    emulator_server: TestServer, emulator: Emulator
) -> None:
    rows = await _rows(_endpoint(emulator_server), AZURE_OPENAI_MODEL_MAPPER="gpt-4o=gpt-4o,o3=o3-mini")
    assert [row.result for row in rows] == [Result.OK, Result.OK]
    bodies = [request.json() for request in emulator.received]
    assert bodies[0]["max_tokens"] == 1
    assert "max_completion_tokens" not in bodies[0]
    assert bodies[1]["max_completion_tokens"] == 1
    assert "max_tokens" not in bodies[1]


async def test_no_mapped_model_lists_the_deployments(emulator_server: TestServer, emulator: Emulator) -> None:
    """The built-in gpt-3.5 spellings are no one's configuration, so they are not called; the listing has a
    version of its own, so the configured one is asked separately."""
    listing, version = await _rows(_endpoint(emulator_server), AZURE_OPENAI_MODEL_MAPPER="")
    assert (listing.deployment, listing.result) == ("(listing)", Result.OK)
    assert "gpt-4o-mini" in listing.reason
    assert "gpt-35-turbo" in listing.reason
    assert (version.deployment, version.result) == ("(api-version)", Result.OK)
    assert not any("/chat/completions" in request.path for request in emulator.received)


async def test_no_mapped_model_still_finds_a_retired_api_version(emulator_server: TestServer) -> None:
    rows = await _rows(
        _endpoint(emulator_server), AZURE_OPENAI_MODEL_MAPPER="", AZURE_OPENAI_APIVERSION="2023-03-15-preview"
    )
    assert [row.result for row in rows] == [Result.OK, Result.RETIRED]


async def test_a_key_from_the_environment_stands_in_for_clients(
    emulator_server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a server-side key there is nothing to check with, unless a variable names one."""
    settings = load_settings(_source(_endpoint(emulator_server), AZURE_OPENAI_TOKEN=""))
    (row,) = await check(settings, seconds=2)
    assert row.result is Result.NO_KEY
    assert "--key-env" in row.fix
    (row,) = await check(settings, key=Secret(AZURE_KEY), seconds=2)
    assert row.ok


async def test_json_shape(
    emulator_server: TestServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment = _source(_endpoint(emulator_server), AZURE_OPENAI_MODEL_MAPPER="gpt-4o=gpt-4o,x=missing")
    assert await _cli(monkeypatch, environment, "--json") == 1
    out = capsys.readouterr().out
    document = json.loads(out)
    assert document["ok"] is False
    assert [row["model"] for row in document["rows"]] == ["gpt-4o", "x"]
    for row in document["rows"]:
        assert set(row) == {"backend", "model", "deployment", "result", "ok", "reason", "fix"}
    assert [(row["result"], row["ok"]) for row in document["rows"]] == [
        ("ok", True),
        ("unknown deployment", False),
    ]
    assert AZURE_KEY not in out


async def test_configuration_error_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _cli(monkeypatch, _source("ftp://nowhere"), "--json") == 2
    assert json.loads(capsys.readouterr().out)["error"].startswith(
        "configuration error: AZURE_OPENAI_ENDPOINT"
    )
    assert await _cli(monkeypatch, _source("ftp://nowhere")) == 2


def test_no_rows_is_not_ok() -> None:
    assert exit_code([]) == 1
