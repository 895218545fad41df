"""The log handler `azproxy serve` gives its access log: the lines of one event-loop turn are written together,
in order, in the same format as every other log line, in writes of whole lines within PIPE_BUF; and the access
log of a served proxy has one line per request."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from azproxy import logs
from azproxy.logs import LINE_FORMAT, TurnBatchingHandler

from .conftest import free_port
from .test_processes import AZPROXY, KEY, clean_environment, running_emulator, wait_for_port

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


class Recorder:
    """A text stream that remembers each write call."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def handler() -> Iterator[tuple[TurnBatchingHandler, Recorder, logging.Logger]]:
    stream = Recorder()
    handler = TurnBatchingHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    logger = logging.getLogger("azproxy.test-batching")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield handler, stream, logger
    logger.removeHandler(handler)


async def test_the_lines_of_one_turn_go_out_in_one_write_in_order(
    handler: tuple[TurnBatchingHandler, Recorder, logging.Logger],
) -> None:
    batching, stream, logger = handler
    for index in range(3):
        logger.info("line %d", index)
    batching.write_info("azproxy.access", "direct")
    assert stream.writes == []  # still this turn
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    lines = stream.writes[0].splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2", "direct"]
    assert re.fullmatch(rf"{STAMP} INFO azproxy.test-batching: line 0", lines[0])
    assert re.fullmatch(rf"{STAMP} INFO azproxy.access: direct", lines[3])
    logger.info("next turn")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2


def test_without_a_loop_each_line_goes_out_at_once(
    handler: tuple[TurnBatchingHandler, Recorder, logging.Logger],
) -> None:
    _, stream, logger = handler
    logger.info("a")
    logger.info("b")
    assert len(stream.writes) == 2


async def test_no_write_passes_max_pending_and_lines_stay_whole(
    handler: tuple[TurnBatchingHandler, Recorder, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "MAX_PENDING", 100)
    _, stream, logger = handler
    for _ in range(5):
        logger.info("x" * 40)  # 93 characters a line: one per write
    assert len(stream.writes) == 4  # each line goes once the next would pass 100; the 5th at the turn's end
    await asyncio.sleep(0)
    assert len(stream.writes) == 5
    assert all(len(text) <= 100 for text in stream.writes)


async def test_the_write_bound_counts_bytes_not_characters(
    handler: tuple[TurnBatchingHandler, Recorder, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "MAX_PENDING", 200)
    batching, stream, _ = handler
    batching.write_info("azproxy.access", "é" * 50)  # 96 characters with the prefix, but 146 bytes
    batching.write_info("azproxy.access", "é" * 50)
    assert len(stream.writes) == 1  # the first went before the second would pass 200 bytes
    assert len(stream.writes[0].encode()) <= 200


def test_write_info_writes_what_logging_would(
    handler: tuple[TurnBatchingHandler, Recorder, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    batching, stream, _ = handler
    now = time.time()
    monkeypatch.setattr(logs.time, "time", lambda: now)
    batching.write_info("azproxy.access", '{"a":1}')
    record = logging.LogRecord("azproxy.access", logging.INFO, "", 0, '{"a":1}', None, None)
    record.created, record.msecs = now, int((now - int(now)) * 1000) + 0.0
    assert stream.writes == [logging.Formatter(LINE_FORMAT).format(record) + "\n"]


def test_a_served_proxy_logs_every_request_once_in_the_common_format(tmp_path: Path) -> None:
    (tmp_path / "empty.env").write_text("")
    proxy_port = free_port()
    log_path = tmp_path / "serve.log"
    with running_emulator("--api-key", KEY) as emulator_url, log_path.open("wb") as log_file:
        proxy = subprocess.Popen(
            [*AZPROXY, "serve", "--address", f"127.0.0.1:{proxy_port}"],
            env=clean_environment(tmp_path, AZURE_OPENAI_ENDPOINT=emulator_url, AZURE_OPENAI_TOKEN=KEY),
            stderr=log_file,
        )
        try:
            wait_for_port(proxy_port, proxy)
            chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(base_url=f"http://127.0.0.1:{proxy_port}") as client:
                for _ in range(5):
                    assert client.post("/v1/chat/completions", json=chat).status_code == 200
        finally:
            proxy.terminate()
            proxy.wait(10)
    lines = log_path.read_text().splitlines()
    access = [line for line in lines if " INFO azproxy.access: " in line]
    assert len(access) == 5, lines
    for line in access:
        assert re.match(rf"{STAMP} INFO azproxy.access: \{{", line)
        fields = json.loads(line.split(": ", 1)[1])
        assert (fields["path"], fields["status"], fields["model"]) == ("/v1/chat/completions", 200, "gpt-4o")
