"""Processes of the bench and what /proc says about them; installing the tools the bench needs."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tools


def ensure_os_tools(tools: dict[str, str]) -> list[str]:
    """Installs the Debian packages of `tools` (command -> package) that are missing, with apt-get."""
    missing = sorted({pkg for cmd, pkg in tools.items() if not shutil.which(cmd)})
    if not missing:
        return []
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise SystemExit(
            f"bench needs {', '.join(missing)}: install them (apt-get install {' '.join(missing)})"
        )
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    return missing


def ensure_pip(modules: dict[str, str]) -> list[str]:
    """Installs into this Python's environment the pip packages of `modules` (import name -> package) that
    it cannot import; returns those it could not install (the bench then goes without them)."""
    import importlib.util

    def lacks(mod: str) -> bool:
        if mod.startswith("bin:"):  # a command in this Python's bin folder, not a module
            return not (Path(sys.executable).parent / mod[4:]).exists()
        return importlib.util.find_spec(mod) is None

    missing = [pkg for mod, pkg in modules.items() if lacks(mod)]
    if not missing:
        return []
    log(f"installing {' '.join(missing)} with pip")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log(f"pip failed, going without {' '.join(missing)}: {done.stderr.strip()[-300:]}")
        return missing
    importlib.invalidate_caches()
    return [pkg for mod, pkg in modules.items() if lacks(mod)]


def raise_nofile(want: int = 200_000) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def sh(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else ""


def machine(azproxy_path: Path | None = None) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    py = sh(
        [
            sys.executable,
            "-c",
            "import aiohttp,uvloop,sys;print(sys.version.split()[0],aiohttp.__version__,uvloop.__version__)",
        ]
    )
    versions = py.split() + ["?"] * 3
    return {
        "cpu": model.group(1).strip() if model else "?",
        "cores": CORES,
        "memory_gb": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": os.uname().release,
        "os": next(
            (
                ln.split("=", 1)[1].strip('"')
                for ln in Path("/etc/os-release").read_text().splitlines()
                if ln.startswith("PRETTY_NAME=")
            ),
            "?",
        ),
        "python": versions[0],
        "aiohttp": versions[1],
        "uvloop": versions[2],
        "nginx": sh(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": sh(["wrk", "-v"]).split(" [")[0],
        "azproxy_commit": sh(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"]),
        "azproxy_dirty": bool(sh(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "azproxy"])),
        "azproxy_path": bool(azproxy_path),  # measured a copy given with --azproxy-path
    }


# ---------------------------------------------------------------- /proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_kb_each(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
        out[pid] = int(match.group(1)) if match else 0
    return out


def mb(kb: float) -> float:
    return round(kb / 1024, 1)


def listen_drops() -> int:
    rows = [
        ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines() if ln.startswith("TcpExt:")
    ]
    return int(dict(zip(rows[0], rows[1], strict=True)).get("ListenDrops", 0)) if len(rows) == 2 else 0


def machine_busy_seconds() -> float:
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / CLOCK_TICKS


def machine_busy(seconds: float) -> float:
    busy0 = machine_busy_seconds()
    time.sleep(seconds)
    return round(100 * (machine_busy_seconds() - busy0) / (seconds * CORES), 1)


def wait_quiet(limit_pct: float, max_wait: float) -> float:
    """Waits (at most `max_wait` s) until the machine, with the bench's servers idle, is under `limit_pct` busy."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy(0.5)
    while busy > limit_pct and time.monotonic() < deadline:
        busy = machine_busy(1)
    return busy


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_OPENAI_", "AZPROXY_"))}


class Server:
    """A subprocess leading a process group of its own (so it and its children stop together), started in
    `workdir` without the caller's azproxy settings; only `env` configures it."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.started = time.monotonic()
        with self.log.open("ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**clean_environ(), **(env or {})},
                cwd=workdir,
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc.poll() is None else []

    def tail(self, n: int = 800) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float) -> float:
        """Seconds from start until `port` accepts; raises if the server exits or the time runs out."""
        deadline = self.started + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return time.monotonic() - self.started
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} did not listen on {port}:\n{self.tail()}")

    def wait_http(self, url: str, timeout: float) -> float:
        """Seconds from start until `url` answers 200 (polled every 5 ms)."""
        deadline = self.started + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} did not answer {url}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


class Watch:
    """While the `with` block runs: peak RSS (summed and of the largest single process) of a server's tree,
    sampled every 50 ms, and CPU of the tree, of the listed other processes, and of the machine."""

    def __init__(self, server: Server | None, others: list[Server] = ()) -> None:  # type: ignore[assignment]
        self.server, self.others = server, list(others)
        self.pids = server.pids() if server else []
        self.peak_kb = self.peak_one_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        each = rss_kb_each(self.pids)
        self.peak_kb = max(self.peak_kb, sum(each.values()))
        self.peak_one_kb = max([self.peak_one_kb, *each.values()])

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> Watch:
        self._sample()
        self.cpu0 = cpu_seconds(self.pids)
        self.others0 = [cpu_seconds(o.pids()) for o in self.others]
        self.busy0, self.t0, self.drops0 = machine_busy_seconds(), time.monotonic(), listen_drops()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = cpu_seconds(self.pids) - self.cpu0
        self.others_cpu_s = [
            cpu_seconds(o.pids()) - c for o, c in zip(self.others, self.others0, strict=True)
        ]
        wall = time.monotonic() - self.t0
        self.machine_busy_pct = round(100 * (machine_busy_seconds() - self.busy0) / (wall * CORES), 1)
        self.listen_drops = listen_drops() - self.drops0

    def figures(self) -> dict[str, Any]:
        return {
            "cpu_s": round(self.cpu_s, 2),
            "peak_rss_mb": mb(self.peak_kb),
            "peak_rss_one_process_mb": mb(self.peak_one_kb),
            "upstream_cpu_s": round(sum(self.others_cpu_s), 2),
            "machine_busy_pct": self.machine_busy_pct,
            "listen_drops": self.listen_drops,
        }


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    """Runs a load generator to completion: its JSON result (its last stdout line) plus its CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"{Path(argv[1]).name} failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["loadgen_cpu_s"] = round(cpu, 2)
    return result
