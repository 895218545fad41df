"""The real commands as a user runs them: `azproxy demo`, and `azproxy serve` in front of `azproxy emulator`
with curl, requests and httpx as clients."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import requests

from .conftest import free_port

AZPROXY = [sys.executable, "-m", "azproxy"]
KEY = "process-test-key"


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on {port}")


@contextmanager
def running_emulator(*options: str) -> Iterator[str]:
    """`azproxy emulator` as a process on a free loopback port, with `options`; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [*AZPROXY, "emulator", "--address", f"127.0.0.1:{port}", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def clean_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    keep = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return keep | {"AZPROXY_ENV_FILE": str(tmp_path / "empty.env")} | extra


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """`azproxy emulator` and `azproxy serve` as processes; yields the proxy's base URL."""
    (tmp_path / "empty.env").write_text("")
    proxy_port = free_port()
    with running_emulator("--api-key", KEY, "--chunks", "5") as emulator_url:
        proxy = subprocess.Popen(
            [*AZPROXY, "serve", "--address", f"127.0.0.1:{proxy_port}"],
            env=clean_environment(tmp_path, AZURE_OPENAI_ENDPOINT=emulator_url, AZURE_OPENAI_TOKEN=KEY),
        )
        try:
            wait_for_port(proxy_port, proxy)
            yield f"http://127.0.0.1:{proxy_port}"
        finally:
            proxy.terminate()
            proxy.wait(10)


STREAM = json.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_through_served_proxy(served: str) -> None:
    result = subprocess.run(
        [
            "curl",
            "-sSN",
            "--max-time",
            "10",
            f"{served}/v1/chat/completions",
            "-H",
            "Authorization: Bearer x",
            "-H",
            "Content-Type: application/json",
            "-d",
            STREAM,
        ],
        capture_output=True,
        check=True,
        timeout=20,
    )
    events = [line for line in result.stdout.split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]"
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[2:-2]]
    assert contents == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 "]


def test_requests_and_httpx_through_served_proxy(served: str) -> None:
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
    answer = requests.post(f"{served}/v1/chat/completions", json=body, headers={"api-key": "x"}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["model"] == "gpt-35-turbo"
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{served}/healthz").json() == {"status": "ok"}
        missing = client.post(f"{served}/v1/chat/completions", content=b"{}")
        assert missing.status_code == 400
        assert missing.json()["error"]["param"] == "model"


def test_demo_runs_requests_through_the_proxy(tmp_path: Path) -> None:
    result = subprocess.run(
        [*AZPROXY, "demo", "--once", "--address", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert (
        "chat answer:     Hello from the Azure OpenAI emulator. You said: What does azproxy do?"
        in result.stdout
    )
    assert "/openai/deployments/gpt-35-turbo/chat/completions?api-version=2024-10-21" in result.stdout
    assert "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21" in result.stdout
