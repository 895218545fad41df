"""The load generators: wrk for non-streamed load, bench/client.py for streams and CONNECT tunnels."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from procs import HERE, run_json

MODEL = "gpt-3.5-turbo"
KEY = "sk-bench-client-key"
BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write one sentence about proxies, please."},
    ],
    "max_tokens": 64,
}
CLIENT = [sys.executable, str(HERE / "client.py")]


def wrk_figures(text: str) -> dict[str, Any]:
    def latency_ms(p: int) -> float | None:
        m = re.search(rf"^\s+{p}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\b", text, re.M)
        return round(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 3) if m else None

    requests = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not (requests and rps):
        raise RuntimeError(f"unexpected wrk output: {text[-800:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    kinds = {"non-2xx": int(non2xx.group(1))} if non2xx else {}
    if sockets:
        names = ("connect", "read", "write", "timeout")
        kinds.update({f"socket {k}": int(v) for k, v in zip(names, sockets.groups(), strict=True) if int(v)})
    return {
        "requests": int(requests.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": latency_ms(50),
        "p99_ms": latency_ms(99),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
    }


class Wrk:
    """Closed-loop keep-alive POSTs of BODY with wrk: C connections for S seconds."""

    def __init__(self, workdir: Path) -> None:
        self.script = workdir / "post.lua"
        self.script.write_text(
            f"wrk.method = 'POST'\nwrk.body = {json.dumps(json.dumps(BODY))}\n"
            "wrk.headers['Content-Type'] = 'application/json'\n"
        )

    def __call__(self, url: str, header: str, connections: int, seconds: float) -> dict[str, Any]:
        threads = min(2, connections)
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout=10s",
            "--latency",
        ]
        argv += [f"--script={self.script}", "-H", header, url]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return {**wrk_figures(done.stdout + done.stderr), "loadgen_cpu_s": round(cpu, 2), "loadgen": "wrk"}


def python_plain(
    url: str,
    header: str,
    connections: int,
    seconds: float,
    proxy: str | None = None,
    ca: Path | None = None,
    group_by: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The same closed loop with bench/client.py; with `proxy`, through a CONNECT tunnel and TLS; with
    `group_by`, answers counted and timed per value of those response headers."""
    argv = [*CLIENT, "plain", url, "-H", header, f"--connections={connections}", f"--duration={seconds}"]
    if proxy:
        argv += [f"--proxy={proxy}", f"--ca={ca}"]
    argv += [f"--group-by={h}" for h in group_by]
    return {**run_json(argv, seconds + 90), "loadgen": "client.py"}


def streams(url: str, header: str, n: int, chunks: int, delay: float, timeout: float) -> dict[str, Any]:
    """`n` streams of `chunks` chunks `delay` s apart, all opened at once (bench/client.py)."""
    argv = [
        *CLIENT,
        "stream",
        url,
        "-H",
        header,
        f"--streams={n}",
        f"--chunks={chunks}",
        f"--timeout={timeout}",
    ]
    argv += ["-H", f"x-mock-chunks: {chunks}", "-H", f"x-mock-delay: {delay}"]
    return run_json(argv, timeout * 2 + 60)
