"""The parent of several workers (AZPROXY_WORKERS > 1): it forks them, restarts the ones that die with a
back-off, passes reloads on, and drains them all on SIGTERM or SIGINT. Only this process talks to systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from .config import Settings
from .metrics import forget_worker_metrics
from .server import new_event_loop
from .serving import STOP_SIGNALS, ReloadSettings, StartupError, read_new_settings, serve, serving_status
from .systemd import Notifier

log = logging.getLogger(__name__)

#: Seconds before restarting a worker that died: its how-manieth quick death in a row picks the delay.
RESTART_DELAYS: Final = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A worker that served this many seconds before it died starts the back-off from the beginning again.
STABLE_AFTER: Final = 30.0
#: Seconds after the grace period before the parent kills a worker that still has not exited.
KILL_MARGIN: Final = 10.0

_PARENT_SIGNALS: Final = (signal.SIGCHLD, signal.SIGHUP, *STOP_SIGNALS)


@dataclass(slots=True)
class _Worker:
    """One forked worker, as the parent knows it."""

    slot: int
    pid: int
    #: The read end of the worker's pipe: `ready`, or `error MESSAGE`, one line each.
    pipe: int
    started: float
    #: The supervisor's reload count when it was forked: one forked before the last reload must reload too.
    generation: int = 0
    ready: bool = False
    error: str | None = None
    received: bytes = b""


class _Reporter:
    """A worker's side of its pipe."""

    def __init__(self, pipe: int) -> None:
        self._pipe = pipe

    def listening(self) -> None:
        self._say("ready")

    def reloading(self) -> None:
        """The parent told systemd already: it forwarded the signal."""

    def reloaded(self) -> None:
        self._say("reloaded")

    def draining(self) -> None:
        """The parent told systemd already: it sent the signal."""

    def failed(self, message: str) -> None:
        self._say(f"error {message}")

    def _say(self, line: str) -> None:
        os.write(self._pipe, line.replace("\n", " ").encode() + b"\n")


class Supervisor:
    """The parent of several workers: starts them, restarts the ones that die, drains them all on request."""

    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        *,
        new_ca: Path | None,
        reload_settings: ReloadSettings | None = None,
        metrics_dir: Path | None = None,
    ) -> None:
        self._settings = settings
        self._notifier = notifier
        self._new_ca = new_ca
        self._reload_settings = reload_settings
        self._metrics_dir = metrics_dir
        #: Successful reloads so far; workers forked since start on the settings of the last one.
        self._generation = 0
        #: Workers told to reload that have not reported back yet (systemd hears READY=1 when none is left).
        self._reloading: set[int] = set()
        self._workers: dict[int, _Worker] = {}
        #: Quick deaths in a row, per slot.
        self._failures = [0] * settings.workers
        #: Slots waiting to be restarted, and when.
        self._restarts: dict[int, float] = {}
        self._serving = False
        self._draining = False
        self._kill_at: float | None = None
        self._interval = notifier.watchdog_interval
        self._next_ping = time.monotonic() + (self._interval or 0)
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup, False)
        os.set_blocking(self._wakeup_write, False)
        self._selector.register(self._wakeup, selectors.EVENT_READ)

    def run(self) -> None:
        previous = {sig: signal.signal(sig, _note_signal) for sig in _PARENT_SIGNALS}
        signal.set_wakeup_fd(self._wakeup_write)
        try:
            for slot in range(self._settings.workers):
                self._spawn(slot)
            while self._workers or (self._restarts and not self._draining):
                self._step()
        finally:
            self._kill_all()
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            os.close(self._wakeup)
            os.close(self._wakeup_write)

    def _step(self) -> None:
        now = time.monotonic()
        deadlines = [*self._restarts.values()]
        if self._interval is not None:
            deadlines.append(self._next_ping)
        if self._kill_at is not None:
            deadlines.append(self._kill_at)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wakeup:
                self._signals()
            elif key.data is not None and self._selector.get_map().get(key.fd) is key:
                # (a worker reaped earlier in this batch has had its pipe closed, or its descriptor reused)
                self._read(key.data)
        self._timers(time.monotonic())

    def _signals(self) -> None:
        try:
            received = os.read(self._wakeup, 512)
        except BlockingIOError:
            return
        for number in received:
            if number == signal.SIGCHLD:
                self._reap()
            elif number == signal.SIGHUP:
                self._reload()
            elif number in STOP_SIGNALS:
                self._drain()

    def _reload(self) -> None:
        """Read the settings once here (a refusal or a warning is logged once), then let every listening worker
        reload itself; one still starting is told once it listens (see `_ready`)."""
        if self._reload_settings is None or self._draining:
            return
        self._notifier.reloading("reloading the configuration")
        new = read_new_settings(self._settings, self._reload_settings)
        if new is not None:
            self._settings = new
            self._generation += 1
            for worker in self._workers.values():
                if worker.ready:
                    self._tell_reload(worker)
        self._reloaded()

    def _tell_reload(self, worker: _Worker) -> None:
        worker.generation = self._generation
        self._reloading.add(worker.pid)
        os.kill(worker.pid, signal.SIGHUP)

    def _reloaded(self, pid: int | None = None) -> None:
        """`pid` reported its reload (or died); READY=1 once no worker is left reloading."""
        if pid is not None:
            if pid not in self._reloading:
                return
            self._reloading.discard(pid)
        if not self._reloading and self._serving and not self._draining:
            self._notifier.ready(serving_status(self._settings))

    def _timers(self, now: float) -> None:
        if self._interval is not None and now >= self._next_ping:
            self._notifier.watchdog()
            self._next_ping = now + self._interval
        for slot, due in list(self._restarts.items()):
            if now >= due:
                del self._restarts[slot]
                self._spawn(slot)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for worker in self._workers.values():
                log.warning(
                    "worker %d (pid %d) is still busy after the grace period: killing it", *_who(worker)
                )
                os.kill(worker.pid, signal.SIGKILL)

    def _spawn(self, slot: int) -> None:
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals wait until the child has put its own handlers in place (pending ones are not inherited).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
        pid = os.fork()
        if pid == 0:
            os.close(read)
            self._become_worker(write, blocked)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write)
        worker = self._workers[pid] = _Worker(slot, pid, read, time.monotonic(), self._generation)
        self._selector.register(read, selectors.EVENT_READ, worker)

    def _become_worker(self, pipe: int, mask: set[int | signal.Signals]) -> NoReturn:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, *STOP_SIGNALS):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._selector.close()
            for fd in (self._wakeup, self._wakeup_write, *(w.pipe for w in self._workers.values())):
                os.close(fd)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            reporter = _Reporter(pipe)
            try:
                with asyncio.Runner(loop_factory=new_event_loop) as runner:
                    runner.run(
                        serve(
                            self._settings,
                            reporter,
                            reuse_port=True,
                            reload_settings=self._reload_settings,
                            warn=False,
                            metrics_dir=self._metrics_dir,
                        )
                    )
                status = 0
            except StartupError as exc:
                reporter.failed(str(exc))
                status = 2
        except BaseException:
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(status)

    def _read(self, worker: _Worker) -> None:
        data = os.read(worker.pipe, 4096)
        if not data:
            self._selector.unregister(worker.pipe)
            return
        *lines, worker.received = (worker.received + data).split(b"\n")
        for line in lines:
            kind, _, message = line.decode(errors="replace").partition(" ")
            if kind == "ready":
                self._ready(worker)
            elif kind == "reloaded":
                self._reloaded(worker.pid)
            elif kind == "error":
                worker.error = message
                if not self._serving and not self._draining:
                    raise StartupError(message)
                log.error("worker %d (pid %d) could not start: %s", *_who(worker), message)

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        status = serving_status(self._settings)
        if worker.generation < self._generation and not self._draining:
            self._tell_reload(worker)  # forked on the settings before a reload that happened while it started
        if self._serving:
            log.info("worker %d (pid %d) listening", *_who(worker))
            self._notifier.status(status)
        elif all(w.ready for w in self._workers.values()) and not self._draining:
            self._serving = True
            log.info("azproxy %s mode %s", self._settings.mode, status)
            if self._new_ca is not None:
                log.info("made a new local CA: %s (azproxy ca says how clients trust it)", self._new_ca)
            self._notifier.ready(status)

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if self._metrics_dir is not None:
                forget_worker_metrics(self._metrics_dir, pid)
            if worker is not None:
                self._exited(worker, wait_status)
                self._reloaded(pid)

    def _exited(self, worker: _Worker, wait_status: int) -> None:
        self._drain_pipe(worker)
        code = os.waitstatus_to_exitcode(wait_status)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if self._draining:
            if code != 0:
                log.warning("worker %d (pid %d) ended with %s while draining", *_who(worker), how)
            return
        if not self._serving:
            raise StartupError(worker.error or f"AZPROXY_WORKERS: a worker ended ({how}) before it listened")
        now = time.monotonic()
        slot = worker.slot
        quick = worker.error is not None or now - worker.started < STABLE_AFTER
        self._failures[slot] = self._failures[slot] + 1 if quick else 1
        delay = RESTART_DELAYS[min(self._failures[slot] - 1, len(RESTART_DELAYS) - 1)]
        log.warning("worker %d (pid %d) ended (%s); restarting it in %g s", *_who(worker), how, delay)
        self._notifier.status(f"{serving_status(self._settings)}; restarting worker {slot}")
        self._restarts[slot] = now + delay

    def _drain_pipe(self, worker: _Worker) -> None:
        """The rest of what a dead worker wrote (its error, say): its end is closed, so this cannot block."""
        if worker.pipe in self._selector.get_map():
            self._selector.unregister(worker.pipe)
            while data := os.read(worker.pipe, 4096):
                worker.received += data
            for line in worker.received.split(b"\n"):
                kind, _, message = line.decode(errors="replace").partition(" ")
                if kind == "error":
                    worker.error = message
        os.close(worker.pipe)

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        self._restarts.clear()
        grace = self._settings.shutdown_grace
        log.info("stopping: the workers finish requests under way (up to %g s)", grace)
        self._notifier.stopping(f"draining for up to {grace:g} s")
        for worker in self._workers.values():
            os.kill(worker.pid, signal.SIGTERM)
        self._kill_at = time.monotonic() + grace + KILL_MARGIN

    def _kill_all(self) -> None:
        """Start-up failed, or the supervisor itself did: no worker may outlive it."""
        for worker in self._workers.values():
            os.kill(worker.pid, signal.SIGKILL)
        for worker in list(self._workers.values()):
            os.waitpid(worker.pid, 0)
            del self._workers[worker.pid]
            os.close(worker.pipe)


def _note_signal(_number: int, _frame: object) -> None:
    """The signal's number reaches the supervisor through the wakeup pipe; nothing to do here."""


def _who(worker: _Worker) -> tuple[int, int]:
    return worker.slot, worker.pid
