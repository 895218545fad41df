"""Headless Chromium driven over the DevTools protocol, with nothing but aiohttp's WebSocket client.

Debian's `chromium` package is the browser (`.ci/run` installs it); no browser is downloaded. It is started
headless, without a sandbox (containers have no user namespaces) and with every background connection off, so
it only ever talks to the loopback pages a test names.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--remote-debugging-port=0",
)


def chromium_binary() -> str | None:
    """The Chromium on PATH (Debian names it `chromium`), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevToolsError(Exception):
    pass


Event = dict[str, Any]


@dataclass
class DevTools:
    """One DevTools WebSocket: commands by id, and every event kept in order (flattened target sessions)."""

    socket: aiohttp.ClientWebSocketResponse
    events: list[Event] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            document = json.loads(message.data)
            waiting = self._pending.pop(document.get("id", -1), None)
            if waiting is None:
                self.events.append(document)
                self._arrived.set()
            elif not waiting.done():
                if "error" in document:
                    waiting.set_exception(DevToolsError(json.dumps(document["error"])))
                else:
                    waiting.set_result(document.get("result", {}))
        for waiting in self._pending.values():
            if not waiting.done():
                waiting.set_exception(DevToolsError("the browser closed its DevTools connection"))

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        number = next(self._ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[number] = answer
        command: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        await self.socket.send_str(json.dumps(command))
        return await answer

    async def wait_for(self, match: Callable[[Event], bool]) -> Event:
        """The first event (already received or still to come) that `match` accepts; bound it with a timeout."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            self._arrived.clear()
            await self._arrived.wait()

    async def close(self) -> None:
        await self.socket.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


@dataclass
class Page:
    """One tab, attached as a flattened session of the browser's DevTools connection."""

    devtools: DevTools
    session: str

    async def call(self, method: str, **params: Any) -> Any:
        return await self.devtools.call(method, self.session, **params)

    def events(self, method: str) -> list[dict[str, Any]]:
        return [
            event["params"]
            for event in self.devtools.events
            if event.get("sessionId") == self.session and event.get("method") == method
        ]

    async def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        await self.call("Page.navigate", url=url)
        await self.devtools.wait_for(
            lambda event: (
                event.get("sessionId") == self.session and event.get("method") == "Page.loadEventFired"
            )
        )

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (a promise is awaited), as JSON; a thrown exception fails."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise DevToolsError(json.dumps(result["exceptionDetails"]))
        return result["result"].get("value")


@dataclass
class Browser:
    devtools: DevTools

    async def new_page(self) -> Page:
        target = await self.devtools.call("Target.createTarget", url="about:blank")
        attached = await self.devtools.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self.devtools, attached["sessionId"])
        for domain in ("Page", "Runtime", "Network"):
            await page.call(f"{domain}.enable")
        return page


@contextlib.asynccontextmanager
async def chromium(binary: str, profile: Path, *, start_timeout: float = 10.0) -> AsyncIterator[Browser]:
    """A headless Chromium with its own profile directory; stopped, with every process it started, on exit."""
    log = (profile.parent / f"{profile.name}.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its own process group: renderers and helpers are stopped with it
    )
    try:
        async with asyncio.timeout(start_timeout):
            port_file = profile / "DevToolsActivePort"
            while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
                if process.returncode is not None:
                    raise DevToolsError(f"chromium exited with {process.returncode}; see {log.name}")
                await asyncio.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
        async with aiohttp.ClientSession() as http:
            socket = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
            devtools = DevTools(socket)
            devtools.start()
            try:
                yield Browser(devtools)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await devtools.call("Browser.close")
                await devtools.close()
    finally:
        await _stop(process)
        log.close()


async def _stop(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(3):
            await process.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(3):
                await process.wait()
                if sig is signal.SIGTERM:
                    break
