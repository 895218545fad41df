"""azproxy's processes as systemd or a terminal runs them: workers on one port, restarts, the drain on SIGTERM,
the notify protocol, and start-up failures as one line with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port
from .test_processes import AZPROXY, clean_environment, running_emulator, wait_for_port

STREAM = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    """One emulator for the module, streaming six chunks half a second apart (a 3 s stream)."""
    with running_emulator("--chunks", "6", "--chunk-delay", "0.5") as url:
        yield url


Start = Callable[..., tuple[subprocess.Popen[bytes], int]]


@pytest.fixture
def start(tmp_path: Path, emulator: str) -> Iterator[Start]:
    """`azproxy serve` in front of the emulator; keyword arguments are extra environment variables."""
    (tmp_path / "empty.env").write_text("")
    started: list[subprocess.Popen[bytes]] = []

    def run(*flags: str, **environment: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        env = clean_environment(
            tmp_path,
            AZURE_OPENAI_ENDPOINT=emulator,
            AZPROXY_STATE_DIR=str(tmp_path / "state"),
            AZPROXY_LOG_LEVEL="WARNING",
            **environment,
        )
        process = subprocess.Popen(
            [*AZPROXY, "serve", "--address", f"127.0.0.1:{port}", *flags], env=env, stderr=subprocess.PIPE
        )
        started.append(process)
        wait_for_port(port, process)
        return process, port

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()


def children(pid: int) -> set[int]:
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_workers_share_the_port_and_a_dead_one_is_restarted(start: Start) -> None:
    process, port = start("--workers", "2")
    wait_until(lambda: len(children(process.pid)) == 2)
    workers = children(process.pid)
    for _ in range(4):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(process.pid)) == 2 and victim not in children(process.pid), seconds=20)
    assert workers - {victim} <= children(process.pid)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    process.terminate()
    assert process.stderr is not None
    errors = process.stderr.read().decode()
    assert process.wait(15) == 0, errors
    assert "restarting it in 0 s" in errors


def test_metrics_of_every_worker_on_their_own_address(start: Start) -> None:
    metrics_port = free_port()
    process, port = start("--workers", "2", AZPROXY_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}")
    wait_until(lambda: len(children(process.pid)) == 2)
    wait_for_port(metrics_port, process)
    for _ in range(12):  # SO_REUSEPORT spreads new connections over both workers
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404  # moved away
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    served = [line for line in text.splitlines() if line.startswith("azproxy_requests_total{")]
    healthz = [line for line in served if 'model=""' in line and 'status="200"' in line]
    assert (
        sum(float(line.rpartition(" ")[2]) for line in healthz) == 12
    )  # both workers' requests, whichever answers
    process.terminate()
    assert process.wait(15) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_lets_a_stream_finish_and_refuses_new_connections(start: Start, workers: str) -> None:
    process, port = start("--workers", workers)
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=STREAM,
            headers={"api-key": "k"},
            timeout=10,
        ) as answer:
            for line in answer.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(5)
    started = time.monotonic()
    process.terminate()
    time.sleep(0.3)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    reader.join(10)
    assert events[-1] == "data: [DONE]"
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[2:-2]]
    assert contents == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 ", "w5 "]
    assert process.wait(10) == 0
    assert time.monotonic() - started < 5


def test_systemd_notify_from_the_main_process_only(start: Start) -> None:
    name = f"@azproxy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:])
        listener.settimeout(10)
        process, _ = start("--workers", "2", NOTIFY_SOCKET=name, WATCHDOG_USEC="200000")
        messages: list[tuple[str, ...]] = []

        def receive_until(line: str) -> None:
            while not any(line in message for message in messages):
                messages.append(tuple(listener.recv(4096).decode().split("\n")))

        receive_until("READY=1")
        ready = next(message for message in messages if "READY=1" in message)
        assert any(line.startswith("STATUS=serving on http://127.0.0.1:") for line in ready)
        assert any(line.endswith("with 2 workers") for line in ready)
        pings = len([m for m in messages if m == ("WATCHDOG=1",)])
        time.sleep(0.5)
        process.terminate()
        receive_until("STOPPING=1")
        assert len([m for m in messages if m == ("WATCHDOG=1",)]) >= pings + 3
        assert process.wait(10) == 0
        listener.setblocking(False)
        while True:
            try:
                messages.append(tuple(listener.recv(4096).decode().split("\n")))
            except BlockingIOError:
                break
        assert len([m for m in messages if "READY=1" in m]) == 1


def fails_to_start(tmp_path: Path, address: str, *flags: str, **environment: str) -> str:
    (tmp_path / "empty.env").write_text("")
    env = clean_environment(
        tmp_path,
        **{"AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9", "AZPROXY_STATE_DIR": str(tmp_path / "state")}
        | environment,
    )
    result = subprocess.run(
        [*AZPROXY, "serve", "--address", address, *flags], env=env, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_address_in_use(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = fails_to_start(tmp_path, f"127.0.0.1:{port}", "--workers", workers)
    assert error == f"azproxy: AZURE_OPENAI_PROXY_ADDRESS: 127.0.0.1:{port} is already in use"


@pytest.mark.parametrize(
    ("address", "cause"),
    [
        ("192.0.2.1:8080", "192.0.2.1 is not an address of this host"),
        ("no-such-host.invalid:8080", "cannot resolve no-such-host.invalid"),
    ],
)
def test_address_not_here_or_unresolvable(tmp_path: Path, address: str, cause: str) -> None:
    error = fails_to_start(tmp_path, address, AZPROXY_ALLOW_ANONYMOUS="true")
    assert error.startswith(f"azproxy: AZURE_OPENAI_PROXY_ADDRESS: {cause}")


def test_tls_file_that_is_no_certificate(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    error = fails_to_start(
        tmp_path,
        f"127.0.0.1:{free_port()}",
        "--workers",
        "2",
        AZPROXY_TLS_CERT=str(tmp_path / "cert.pem"),
        AZPROXY_TLS_KEY=str(tmp_path / "key.pem"),
    )
    assert error.startswith(f"azproxy: AZPROXY_TLS_CERT: {tmp_path / 'cert.pem'} and ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_tls_file_that_cannot_be_read(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "key.pem").chmod(0)
    error = fails_to_start(
        tmp_path,
        f"127.0.0.1:{free_port()}",
        AZPROXY_TLS_CERT=str(tmp_path / "cert.pem"),
        AZPROXY_TLS_KEY=str(tmp_path / "key.pem"),
    )
    assert error.startswith(f"azproxy: AZPROXY_TLS_KEY: cannot read {tmp_path / 'key.pem'}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_state_directory_that_cannot_be_made(tmp_path: Path, workers: str) -> None:
    (tmp_path / "file").write_text("")
    error = fails_to_start(
        tmp_path,
        f"127.0.0.1:{free_port()}",
        "--workers",
        workers,
        AZPROXY_STATE_DIR=str(tmp_path / "file" / "state"),
    )
    assert error.startswith("azproxy: AZPROXY_STATE_DIR: ")


def test_rate_limits_with_workers_need_redis(tmp_path: Path) -> None:
    (tmp_path / "clients.toml").write_text('[[client]]\nname = "web"\nkey = "env:WEB_KEY"\nrpm = 60\n')
    error = fails_to_start(
        tmp_path,
        f"127.0.0.1:{free_port()}",
        "--workers",
        "2",
        AZURE_OPENAI_TOKEN="server-side-key-for-lifecycle",
        AZPROXY_CLIENTS_FILE=str(tmp_path / "clients.toml"),
        WEB_KEY="a-client-key-of-enough-length",
    )
    assert error.startswith("azproxy: configuration error: AZPROXY_WORKERS: 2 workers would each count")
    assert "web" in error
