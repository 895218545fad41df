"""systemd's notify protocol (`Type=notify`), standard library only: one datagram per message to the Unix
socket systemd names in NOTIFY_SOCKET, so it knows when azproxy listens, when it drains, how it is doing, and
that it is still alive (the watchdog).

Outside systemd (no NOTIFY_SOCKET) every call does nothing. Sending is best effort: a lost datagram must never
stop azproxy serving, so failures are logged and swallowed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

#: Seconds a datagram may wait for room in systemd's queue before it is dropped.
_SEND_TIMEOUT: Final = 1.0


@dataclass(frozen=True, slots=True)
class NotifyEnvironment:
    """What systemd told this process through its environment (read by the command line, the one place besides
    config.py that reads the environment)."""

    #: A socket path, or an abstract name starting with `@`; None outside systemd.
    socket: str | None = None
    #: Microseconds within which systemd expects a WATCHDOG=1; None when the unit has no WatchdogSec.
    watchdog_usec: int | None = None
    #: The process the watchdog is meant for; None means whoever got the variables.
    watchdog_pid: int | None = None

    @classmethod
    def from_text(
        cls, socket_text: str | None, watchdog_usec: str | None, watchdog_pid: str | None
    ) -> NotifyEnvironment:
        """The variables as systemd writes them; a value that is not a positive number counts as unset."""
        return cls(socket_text or None, _positive(watchdog_usec), _positive(watchdog_pid))


def _positive(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


class Notifier:
    """Sends notify messages for the process that owns it (azproxy's main process)."""

    def __init__(self, environment: NotifyEnvironment) -> None:
        self._environment = environment
        address = environment.socket
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._socket: socket.socket | None = None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half of what systemd waits), or None when none are wanted."""
        usec, pid = self._environment.watchdog_usec, self._environment.watchdog_pid
        if self._address is None or usec is None or (pid is not None and pid != os.getpid()):
            return None
        return usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """azproxy serves: at start-up once it listens, and again when a reload is done."""
        self._send("READY=1", status=status)

    def reloading(self, status: str | None = None) -> None:
        """A reload begins; systemd wants the monotonic clock with it, and READY=1 (`ready`) when it is done."""
        self._send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", status=status)

    def stopping(self, status: str | None = None) -> None:
        """azproxy drains: it accepts no new connections and finishes those under way."""
        self._send("STOPPING=1", status=status)

    def status(self, status: str) -> None:
        self._send(status=status)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, *fields: str, status: str | None = None) -> None:
        if self._address is None:
            return
        lines = [*fields, f"STATUS={status}"] if status else list(fields)
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.settimeout(_SEND_TIMEOUT)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("could not tell systemd %s: %s", lines, exc)
