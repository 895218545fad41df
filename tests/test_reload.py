"""Live reload: new requests use the new configuration at once, requests under way finish on theirs, a broken
configuration is refused and the old one keeps serving, and restart-only settings keep their old value."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp.test_utils import TestServer

from azproxy.config import Settings, load_settings
from azproxy.emulator import Emulator
from azproxy.process import PID_FILE
from azproxy.server import build_app, reload_app
from azproxy.serving import keep_restart_only
from azproxy.state import STATE
from azproxy.usage import Metered

from .conftest import AZURE_KEY, ServerFactory, free_port
from .test_processes import AZPROXY, clean_environment, running_emulator, wait_for_port

HEADERS = {"Authorization": f"Bearer {AZURE_KEY}"}
#: The emulator answers with the model behind the deployment it was asked for.
MODEL_OF = {"gpt-4o": "gpt-4o-2024-08-06", "gpt-4o-mini": "gpt-4o-mini-2024-07-18"}


def chat(stream: bool = False) -> dict[str, object]:
    return {"model": "house", "stream": stream, "messages": [{"role": "user", "content": "one two three"}]}


async def test_next_request_uses_the_new_settings_while_a_stream_finishes_on_its_own(
    emulator: Emulator, emulator_server: TestServer, start_server: ServerFactory
) -> None:
    endpoint = str(emulator_server.make_url("")).rstrip("/")

    def settings(deployment: str) -> Settings:
        return load_settings(
            {
                "AZURE_OPENAI_ENDPOINT": endpoint,
                "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",
                "AZURE_OPENAI_MODEL_MAPPER": f"house={deployment}",
            }
        )

    app = build_app(settings("gpt-4o"))
    url = (await start_server(app)).make_url("/v1/chat/completions")
    seen: list[Metered] = []
    app[STATE].usage.add(seen.append)
    emulator.stream_gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat(stream=True), headers=HEADERS) as stream:
            assert stream.status == 200
            assert (await stream.content.readline()).startswith(b"data: ")  # held at the gate from here on
            replaced = app[STATE].current
            await reload_app(app, settings("gpt-4o-mini"))
            async with session.post(url, json=chat(), headers=HEADERS) as answer:
                assert (await answer.json())["model"] == MODEL_OF["gpt-4o-mini"]
            assert emulator.received[-1].path == "/openai/deployments/gpt-4o-mini/chat/completions"
            assert replaced.upstream.session is not None  # still open: the stream uses it
            emulator.stream_gate.set()
            rest = await stream.read()
        events = [json.loads(line[6:]) for line in rest.split(b"\n\n") if line.startswith(b"data: {")]
        assert events
        assert {event["model"] for event in events if event.get("model")} == {MODEL_OF["gpt-4o"]}
        assert rest.rstrip().endswith(b"data: [DONE]")
    assert [metered.model for metered in seen] == ["house", "house"]  # subscribers outlive the snapshot
    for _ in range(100):  # the replaced pool closes once its last request is done
        try:
            _ = replaced.upstream.session
        except RuntimeError:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the replaced snapshot's pool was never closed")
    assert app[STATE].bodies is replaced.bodies
    assert app[STATE].current.tunnels is replaced.tunnels


def test_restart_only_settings_keep_their_old_value() -> None:
    base = {"AZURE_OPENAI_ENDPOINT": "https://e.example", "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080"}
    old = load_settings(base)
    new = load_settings(
        base
        | {
            "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:9090",
            "AZPROXY_INTERCEPT_HOSTS": "api.openai.com,example.org",
            "AZPROXY_KEEPALIVE_TIMEOUT": "5",
            "AZURE_OPENAI_APIVERSION": "2025-04-01-preview",
        }
    )
    kept, changed = keep_restart_only(old, new)
    assert changed == ["AZURE_OPENAI_PROXY_ADDRESS", "AZPROXY_INTERCEPT_HOSTS", "AZPROXY_KEEPALIVE_TIMEOUT"]
    assert (kept.address, kept.forward.intercept_hosts) == (old.address, old.forward.intercept_hosts)
    assert kept.limits == old.limits
    assert kept.api_version == "2025-04-01-preview"  # everything else is the new configuration
    assert keep_restart_only(old, old) == (old, [])


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    with running_emulator() as url:
        yield url


class Served:
    """`azproxy serve` with a config file of [[backend]] and [[model]] tables; its log in a file."""

    def __init__(self, tmp_path: Path, emulator_url: str) -> None:
        self.emulator_url = emulator_url
        self.config = tmp_path / "azproxy.toml"
        self.log = tmp_path / "azproxy.log"
        self.state_dir = tmp_path / "state"
        (tmp_path / "empty.env").write_text("")
        self.env = clean_environment(
            tmp_path,
            AZPROXY_CONFIG=str(self.config),
            AZPROXY_STATE_DIR=str(self.state_dir),
            AZPROXY_LOG_FORMAT="text",
            AZPROXY_ACCESS_LOG="false",
        )
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, deployment: str, port: int | None = None) -> None:
        self.config.write_text(
            f'[server]\naddress = "127.0.0.1:{port or self.port}"\n\n'
            f'[[backend]]\nname = "east"\nendpoint = "{self.emulator_url}"\n\n'
            f'[[model]]\nname = "house"\ndeployments = {{ east = "{deployment}" }}\n'
        )

    def start(self, **environment: str) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*AZPROXY, "serve"], env=self.env | environment, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port, self.process)
        return self.process

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    def wait_for(self, text: str, count: int = 1) -> None:
        wait_until(lambda: len(self.lines(text)) >= count)

    def model(self) -> str:
        """The model that answered one chat on a new connection."""
        answer = httpx.post(
            f"http://127.0.0.1:{self.port}/v1/chat/completions", json=chat(), headers=HEADERS, timeout=10
        )
        assert answer.status_code == 200, answer.text
        model: str = answer.json()["model"]
        return model

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def served(tmp_path: Path, emulator_url: str) -> Iterator[Served]:
    served = Served(tmp_path, emulator_url)
    yield served
    served.stop()


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def reload_command(served: Served) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AZPROXY, "reload"], env=served.env, capture_output=True, text=True, timeout=30, check=False
    )


def test_reload_through_the_pid_file_and_sighup(served: Served) -> None:
    served.write("gpt-4o")
    process = served.start()
    assert (served.state_dir / PID_FILE).read_text().strip() == str(process.pid)
    assert served.model() == MODEL_OF["gpt-4o"]

    served.write("gpt-4o-mini")
    result = reload_command(served)
    assert result.returncode == 0, result.stderr
    assert f"process {process.pid}" in result.stdout
    served.wait_for("reloaded the configuration")
    assert served.model() == MODEL_OF["gpt-4o-mini"]

    served.config.write_text('[[model]\nname = "house"\n')  # not TOML
    os.kill(process.pid, signal.SIGHUP)
    served.wait_for("reload refused")
    assert len(served.lines("reload refused")) == 1
    assert str(served.config) in served.lines("reload refused")[0]
    assert served.model() == MODEL_OF["gpt-4o-mini"]  # the old configuration keeps serving

    served.write("gpt-4o", port=free_port())
    os.kill(process.pid, signal.SIGHUP)
    served.wait_for("reloaded the configuration", 2)
    (warning,) = served.lines("only a restart applies")
    assert "AZURE_OPENAI_PROXY_ADDRESS" in warning
    assert served.model() == MODEL_OF["gpt-4o"]  # on the port it listened on from the start

    process.terminate()
    assert process.wait(10) == 0
    assert not (served.state_dir / PID_FILE).exists()
    result = reload_command(served)
    assert result.returncode == 1
    assert "not running" in result.stderr


def test_workers_reload_and_systemd_hears_reloading_then_ready(served: Served) -> None:
    name = f"@azproxy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:])
        listener.settimeout(10)
        served.write("gpt-4o")
        process = served.start(AZPROXY_WORKERS="2", NOTIFY_SOCKET=name)
        messages: list[list[str]] = []

        def receive_until(line: str) -> list[str]:
            while True:
                message = listener.recv(4096).decode().split("\n")
                messages.append(message)
                if line in message:
                    return message

        receive_until("READY=1")
        assert served.model() == MODEL_OF["gpt-4o"]
        served.write("gpt-4o-mini")
        os.kill(process.pid, signal.SIGHUP)
        reloading = receive_until("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        receive_until("READY=1")
        assert served.lines("reloaded the configuration")  # logged by each worker before it reported
        assert {served.model() for _ in range(8)} == {MODEL_OF["gpt-4o-mini"]}
        process.terminate()
        assert process.wait(10) == 0, served.log.read_text()[-3000:]
