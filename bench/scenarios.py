"""The scenarios: each starts what it measures, runs bounded loads, and returns its rows.

A scenario is a function `(bench: Bench) -> dict` registered with `@scenario(name)`; `run.py` runs them in
the order they are defined here. To add one, write the function: start the servers it needs with
`bench.azproxy(...)` / `bench.nginx_proxy(...)` (stopped when the scenario ends), measure with
`bench.measure(...)`, return a dict. Raising marks the scenario as errored (the run then exits 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loaders
import nginx
from loaders import KEY
from procs import Server, Watch, free_port, log, mb, rss_kb_each, wait_quiet

Scenario = Callable[["Bench"], dict[str, Any]]
SCENARIOS: dict[str, tuple[Scenario, bool]] = {}
BEARER = f"Authorization: Bearer {KEY}"
API_KEY = f"api-key: {KEY}"
DEPLOYMENT_PATH = f"/openai/deployments/{nginx.DEPLOYMENT}/chat/completions?api-version={nginx.API_VERSION}"
PROXY_PATH = "/v1/chat/completions"
#: `python -m azproxy`, less the garbage collector tuning serve does once started (azproxy/serving.py).
UNTUNED_GC = (
    "import runpy, sys, azproxy.serving as s; s.tune_gc = lambda: None; "
    "sys.argv[0] = 'azproxy'; runpy.run_module('azproxy', run_name='__main__')"
)


def scenario(name: str, quick: bool = True) -> Callable[[Scenario], Scenario]:
    """Registers a scenario; `quick=False` leaves it out of `--quick`."""

    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = (fn, quick)
        return fn

    return register


@dataclass
class Target:
    """Something to send load to: its URL, the credential header it takes, and its server (None: the mock)."""

    name: str
    url: str
    header: str
    server: Server | None
    port: int = 0
    start_s: float | None = None
    idle: dict[str, Any] | None = None


class Bench:
    """The mock upstreams (up for the whole run) and the helpers scenarios share."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.wrk = loaders.Wrk(workdir)
        self.servers: list[Server] = []
        self.env_path = {"PYTHONPATH": str(args.azproxy_path)} if args.azproxy_path else {}
        help_text = subprocess.run(
            [sys.executable, "-m", "azproxy", "serve", "--help"],
            capture_output=True,
            text=True,
            check=False,
            env={**_clean(), **self.env_path},
            cwd=workdir,  # not the repo: `-m` would put its azproxy/ first on the path
        ).stdout
        self.workers_supported = "--workers" in help_text
        self.plain_port, self.stream_port = free_port(), free_port()
        conf = nginx.mock_conf(workdir, self.plain_port, args.mock_workers)
        self.plain_mock = self.start("nginx-mock", nginx.argv(conf), self.plain_port)
        mock_argv = [sys.executable, str(Path(__file__).parent / "upstream.py"), str(self.stream_port)]
        self.stream_mock = self.start("stream-mock", mock_argv, self.stream_port)
        self.plain_up = f"127.0.0.1:{self.plain_port}"
        self.stream_up = f"127.0.0.1:{self.stream_port}"
        self.ca = workdir / "ca.pem"
        state = workdir / "state"
        state.mkdir(exist_ok=True)
        env = {"AZPROXY_STATE_DIR": str(state), "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:1"}
        pem = subprocess.run(
            [sys.executable, "-m", "azproxy", "ca", "--pem"],
            capture_output=True,
            text=True,
            check=True,
            env={**_clean(), **env, **self.env_path},
            cwd=workdir,
        ).stdout
        self.ca.write_text(pem)

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        server = Server(name, argv, self.workdir, env)
        self.servers.append(server)
        server.wait_port(port, 20)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def direct(self, stream: bool = False) -> Target:
        port = self.stream_port if stream else self.plain_port
        return Target("direct", f"http://127.0.0.1:{port}{DEPLOYMENT_PATH}", API_KEY, None)

    @contextmanager
    def nginx_proxy(self, stream: bool = False) -> Iterator[Target]:
        port = free_port()
        conf = nginx.proxy_conf(self.workdir, port, self.stream_up if stream else self.plain_up)
        server = self.start("nginx-proxy", nginx.argv(conf), port)
        try:
            target = Target("nginx", f"http://127.0.0.1:{port}{PROXY_PATH}", BEARER, server, port)
            self.check(target, stream)
            yield target
        finally:
            server.stop()

    @contextmanager
    def azproxy(
        self,
        workers: int = 1,
        stream: bool = False,
        name: str = "",
        env: dict[str, str] | None = None,
        untuned_gc: bool = False,
    ) -> Iterator[Target]:
        """azproxy serve on a free port in front of a mock; `workers` > 1 passes --workers; `env` adds to (or
        overrides) its settings, e.g. `AZPROXY_CONFIG`; `untuned_gc` leaves out its start-up tuning of the
        garbage collector (for the before/after of that tuning)."""
        port = free_port()
        argv = [sys.executable, "-m", "azproxy", "serve"]
        if untuned_gc:
            argv[1:3] = ["-c", UNTUNED_GC]
        if workers > 1:
            argv.append(f"--workers={workers}")
        env = {
            "AZURE_OPENAI_PROXY_ADDRESS": f"127.0.0.1:{port}",
            "AZURE_OPENAI_ENDPOINT": f"http://{self.stream_up if stream else self.plain_up}",
            "AZURE_OPENAI_APIVERSION": nginx.API_VERSION,
            "AZPROXY_STATE_DIR": str(self.workdir / "state"),
            "AZPROXY_MAX_CONNECTIONS": "100000",
            "AZPROXY_MAX_CONNECTIONS_PER_IP": "100000",
            "AZPROXY_AUTH_FAILURE_LIMIT": "0",
            "AZPROXY_LOG_LEVEL": "WARNING",  # no access-log line, like nginx here (access_log off)
            **self.env_path,
            **(env or {}),
        }
        name = name or f"azproxy-{workers}w"
        server = Server(name, argv, self.workdir, env)
        self.servers.append(server)
        try:
            ready = server.wait_http(f"http://127.0.0.1:{port}/healthz", 60)
            target = Target(
                name, f"http://127.0.0.1:{port}{PROXY_PATH}", BEARER, server, port, round(ready, 3)
            )
            self.check(target, stream)
            time.sleep(0.5)
            each = rss_kb_each(server.pids())
            target.idle = {
                "processes": len(each),
                "idle_rss_mb": mb(sum(each.values())),
                "idle_rss_max_process_mb": mb(max(each.values(), default=0)),
            }
            yield target
        finally:
            server.stop()

    def check(self, target: Target, stream: bool) -> None:
        """One whole request (or stream) through `target` before any load: a bench that measures errors is
        no bench."""
        if stream:
            r = loaders.streams(target.url, target.header, 1, 3, 0.01, 10)
            ok = r["errors"] == 0 and r["chunks_lost"] == 0
        else:
            r = loaders.python_plain(target.url, target.header, 1, 0.2)
            ok = r["errors"] == 0 and r["requests"] > 0
        if not ok:
            lines = (target.server.tail(4000) if target.server else "").strip().splitlines()
            last = lines[-1] if lines else ""
            raise RuntimeError(
                f"{target.name}: check request failed: {r.get('error_kinds')}; its log ends: {last}"
            )

    def quiet(self) -> float:
        return wait_quiet(self.args.quiet_pct, self.args.quiet_wait)

    def measure(
        self,
        target: Target,
        load: Callable[[], dict[str, Any]],
        stream: bool = False,
        mocks: list[Server] | None = None,
    ) -> dict[str, Any]:
        """Runs `load` while watching the target's process tree and the mock's (or those of `mocks`)."""
        background = self.quiet()
        mock = self.stream_mock if stream else self.plain_mock
        with Watch(target.server, mocks or [mock]) as watch:
            result = load()
        result.update(watch.figures())
        result["background_busy_pct"] = background
        if target.server is None:  # direct: the tree watched is nobody's
            for k in ("cpu_s", "peak_rss_mb", "peak_rss_one_process_mb"):
                result.pop(k)
        return result

    def n_workers(self) -> list[int]:
        return [1] + ([self.args.workers] if self.args.workers > 1 else [])

    def workers_rows(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """1 and N: N yields None (not run) when azproxy does not take --workers yet."""
        for n in self.n_workers():
            yield n, (None if n > 1 and not self.workers_supported else {})


def _clean() -> dict[str, str]:
    from procs import clean_environ

    return clean_environ()


NOT_RUN = {"not_run": "no --workers yet"}


def per_1k(cpu_s: float | None, count: int | None) -> float | None:
    return round(cpu_s / count * 1e6, 1) if cpu_s is not None and count else None


# ---------------------------------------------------------------- the scenarios


@scenario("mock")
def mock_capacity(b: Bench) -> dict[str, Any]:
    """The mocks alone, harder than any proxy row drives them: they must not be what limits a row."""
    a = b.args
    direct = b.direct()
    plain = b.measure(direct, lambda: b.wrk(direct.url, direct.header, 128, a.short))
    plain["mock_cpu_us_per_req"] = per_1k(plain["upstream_cpu_s"], plain["requests"])
    sdirect = b.direct(stream=True)
    n = a.mock_streams
    stream = b.measure(
        sdirect, lambda: loaders.streams(sdirect.url, sdirect.header, n, 40, 0.05, 60), stream=True
    )
    stream["mock_cpu_us_per_chunk"] = per_1k(stream["upstream_cpu_s"], stream["chunks_received"])
    return {"nginx_mock_c128": plain, f"stream_mock_{n}x40": stream}


def plain_rows(b: Bench, t: Target) -> dict[str, Any]:
    a = b.args
    if a.warmup:
        b.wrk(t.url, t.header, a.connections, a.warmup)
    row = b.measure(t, lambda: b.wrk(t.url, t.header, a.connections, a.duration))
    row["cpu_us_per_req"] = per_1k(row.get("cpu_s"), row["requests"])
    low = b.measure(t, lambda: b.wrk(t.url, t.header, a.low_connections, a.low_duration))
    row["c4"] = {k: low[k] for k in ("rps", "p50_ms", "p99_ms", "errors")}
    row["start_s"], row["idle"] = t.start_s, t.idle
    return row


@scenario("plain")
def plain(b: Bench) -> dict[str, Any]:
    """Non-streamed chat at 64 keep-alive connections (and a latency run at 4): direct, nginx, azproxy."""
    rows: dict[str, Any] = {"direct": plain_rows(b, b.direct())}
    with b.nginx_proxy() as t:
        rows["nginx"] = plain_rows(b, t)
    for n, skip in b.workers_rows():
        if skip is None:
            rows[f"azproxy-{n}w"] = NOT_RUN
            continue
        with b.azproxy(n) as t:
            rows[t.name] = plain_rows(b, t)
    return rows


@scenario("curve", quick=False)
def curve(b: Bench) -> dict[str, Any]:
    """Throughput and p99 as concurrency rises, for nginx and azproxy."""
    a = b.args
    levels = [int(x) for x in a.curve.split(",")]

    def sweep(t: Target) -> dict[str, Any]:
        b.wrk(t.url, t.header, 64, 1)
        out = {}
        for c in levels:
            r = b.measure(t, lambda c=c: b.wrk(t.url, t.header, c, a.curve_duration))
            out[str(c)] = {k: r.get(k) for k in ("rps", "p50_ms", "p99_ms", "errors", "cpu_s", "requests")}
        return out

    rows: dict[str, Any] = {}
    with b.nginx_proxy() as t:
        rows["nginx"] = sweep(t)
    for n, skip in b.workers_rows():
        if skip is None:
            rows[f"azproxy-{n}w"] = NOT_RUN
            continue
        with b.azproxy(n) as t:
            rows[t.name] = sweep(t)
    return rows


def stream_row(b: Bench, t: Target, n: int, chunks: int, delay: float) -> dict[str, Any]:
    timeout = chunks * delay + 60
    row = b.measure(t, lambda: loaders.streams(t.url, t.header, n, chunks, delay, timeout), stream=True)
    row["cpu_us_per_chunk"] = per_1k(row.get("cpu_s"), row["chunks_received"])
    row["start_s"], row["idle"] = t.start_s, t.idle
    return row


@scenario("streams")
def streams(b: Bench) -> dict[str, Any]:
    """1,000 streams of 40 chunks 50 ms apart, all started at once."""
    a = b.args
    n, chunks, delay = a.streams, a.stream_chunks, 0.05
    rows = {"direct": stream_row(b, b.direct(stream=True), n, chunks, delay)}
    with b.nginx_proxy(stream=True) as t:
        rows["nginx"] = stream_row(b, t, n, chunks, delay)
    for w, skip in b.workers_rows():
        if skip is None:
            rows[f"azproxy-{w}w"] = NOT_RUN
            continue
        with b.azproxy(w, stream=True) as t:
            rows[t.name] = stream_row(b, t, n, chunks, delay)
    return rows


@scenario("streams-5k")
def streams_5k(b: Bench) -> dict[str, Any]:
    """5,000 concurrent streams, chunks 1 s apart, through one worker: nothing lost, RSS per stream."""
    a = b.args
    n, chunks = a.many_streams, a.many_chunks
    rows = {} if a.quick else {"direct": stream_row(b, b.direct(stream=True), n, chunks, 1.0)}
    with b.azproxy(1, stream=True) as t:
        row = stream_row(b, t, n, chunks, 1.0)
        idle = (t.idle or {}).get("idle_rss_mb") or 0
        row["rss_kb_per_stream"] = round((row["peak_rss_mb"] - idle) * 1024 / n, 1)
        rows[t.name] = row
    return rows


@scenario("stream-capacity", quick=False)
def stream_capacity(b: Bench) -> dict[str, Any]:
    """Concurrent streams (20 chunks 50 ms apart) one worker holds before chunk p99 lateness passes 50 ms."""
    a = b.args
    steps = [int(x) for x in a.capacity_steps.split(",")]
    out: dict[str, Any] = {"steps": {}, "held": 0, "limit_ms": 50}
    with b.azproxy(1, stream=True) as t:
        for n in steps:
            r = b.measure(t, lambda n=n: loaders.streams(t.url, t.header, n, 20, 0.05, 60), stream=True)
            keep = (
                "streams",
                "errors",
                "chunks_lost",
                "late_p50_ms",
                "late_p99_ms",
                "late_max_ms",
                "ttfc_p99_ms",
            )
            out["steps"][str(n)] = {k: r.get(k) for k in (*keep, "cpu_s", "peak_rss_mb", "loadgen_cpu_s")}
            log(f"  {n} streams: late p99 {r.get('late_p99_ms')} ms, lost {r.get('chunks_lost')}")
            if r["errors"] or r["chunks_lost"] or (r.get("late_p99_ms") or 1e9) > 50:
                break
            out["held"] = n
    # the client and mock alone at the last step: is the limit azproxy's?
    last = max(int(s) for s in out["steps"])
    d = b.direct(stream=True)
    r = b.measure(d, lambda: loaders.streams(d.url, d.header, last, 20, 0.05, 60), stream=True)
    out["direct_at_last_step"] = {k: r.get(k) for k in ("streams", "errors", "chunks_lost", "late_p99_ms")}
    return out


@scenario("tunnel")
def tunnel(b: Bench) -> dict[str, Any]:
    """Non-streamed chat through an intercepted CONNECT tunnel (keep-alive, TLS to azproxy's local CA) against
    the same azproxy in reverse mode, both with bench/client.py at 64 connections. Forward-proxy clients get
    OpenAI's answer shape by default (AZPROXY_FORWARD_RESPONSE_SHAPE), so reverse clients get it too here
    (AZPROXY_RESPONSE_SHAPE=openai): both rows do the same work on the answer, and the ratio is the tunnel's."""
    a = b.args
    rows: dict[str, Any] = {}
    with b.azproxy(1, name="azproxy-1w-tunnel", env={"AZPROXY_RESPONSE_SHAPE": "openai"}) as t:
        if a.warmup:
            loaders.python_plain(t.url, t.header, a.connections, a.warmup)
        rows["reverse"] = b.measure(
            t, lambda: loaders.python_plain(t.url, t.header, a.connections, a.duration)
        )
        url = "https://api.openai.com/v1/chat/completions"
        proxy = f"127.0.0.1:{t.port}"
        if a.warmup:
            loaders.python_plain(url, t.header, a.connections, a.warmup, proxy, b.ca)
        rows["tunnel"] = b.measure(
            t, lambda: loaders.python_plain(url, t.header, a.connections, a.duration, proxy, b.ca)
        )
    for row in rows.values():
        row["cpu_us_per_req"] = per_1k(row.get("cpu_s"), row["requests"])
        row["client_cpu_us_per_req"] = per_1k(row.get("loadgen_cpu_s"), row["requests"])
    return rows


@scenario("gc", quick=False)
def gc_tuning(b: Bench) -> dict[str, Any]:
    """One worker at 64 connections with and without the garbage collector tuning of start-up (gc.freeze()
    and a gen-0 threshold of 50,000), each three times, interleaved; counts summed, CPU per request of the sums
    (the difference is a few per cent, well inside one run's noise on a shared machine)."""
    a = b.args
    rows: dict[str, Any] = {}
    for _ in range(3):
        for untuned in (False, True):
            name = "untuned" if untuned else "tuned"
            with b.azproxy(1, name=f"azproxy-1w-gc-{name}", untuned_gc=untuned) as t:
                if a.warmup:
                    b.wrk(t.url, t.header, a.connections, a.warmup)
                r = b.measure(t, lambda t=t: b.wrk(t.url, t.header, a.connections, a.duration))
            row = rows.setdefault(name, {"requests": 0, "cpu_s": 0.0, "errors": 0, "seconds": 0.0, "p99": []})
            row["requests"] += r["requests"]
            row["cpu_s"] += r.get("cpu_s") or 0.0
            row["errors"] += r["errors"]
            row["seconds"] += a.duration
            row["p99"].append(r["p99_ms"])
    for row in rows.values():
        row["rps"] = row["requests"] / row["seconds"]
        row["cpu_us_per_req"] = per_1k(row["cpu_s"], row["requests"])
        row["p99_ms"] = max(row.pop("p99"))
    return rows


FAILOVER_BACKENDS = ("steady", "flaky")  # in the config file's order: round-robin starts with "steady"
FAILOVER_HEADERS = ("x-azproxy-backend", "x-azproxy-attempts")
FAILOVER_TOML = """\
# written by bench/scenarios.py (failover): two mock backends, equal weight, same priority
[[backend]]
name = "{0}"
endpoint = "http://127.0.0.1:{2}"
api_key = "env:BENCH_BACKEND_KEY"
weight = 1
priority = 0

[[backend]]
name = "{1}"
endpoint = "http://127.0.0.1:{3}"
api_key = "env:BENCH_BACKEND_KEY"
weight = 1
priority = 0
"""


def mock_counts(port: int) -> dict[str, int]:
    """The chat requests a bench/upstream.py mock answered 200 and 429 since it started."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_mock/counts", timeout=5) as r:
        counts: dict[str, int] = json.loads(r.read())
        return counts


def failover_run(
    b: Bench, t: Target, mocks: dict[str, tuple[Server, int]], connections: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop run of bench/client.py through `t`, its answers counted and timed per backend and per
    attempts, beside what each mock counted and the 429 warnings azproxy logged meanwhile."""
    before = {name: mock_counts(port) for name, (_, port) in mocks.items()}
    assert t.server is not None
    logged = t.server.log.read_bytes().count(b"answered 429")
    r = b.measure(
        t,
        lambda: loaders.python_plain(t.url, t.header, connections, seconds, group_by=FAILOVER_HEADERS),
        mocks=[server for server, _ in mocks.values()],
    )
    r["connections"] = connections
    r["cpu_us_per_req"] = per_1k(r.get("cpu_s"), r["requests"])
    r["warnings_logged"] = t.server.log.read_bytes().count(b"answered 429") - logged
    after = {name: mock_counts(port) for name, (_, port) in mocks.items()}
    r["mock_counts"] = {n: {k: after[n][k] - before[n].get(k, 0) for k in after[n]} for n in after}
    by_backend = r["groups"]["x-azproxy-backend"]
    by_attempts = r["groups"]["x-azproxy-attempts"]
    total = r["requests"] or 1
    r["served"] = {name: by_backend.get(name, {}).get("requests", 0) for name in FAILOVER_BACKENDS}
    r["served_pct"] = {name: round(100 * n / total, 1) for name, n in r["served"].items()}
    first, again = by_attempts.get("1", {}), by_attempts.get("2", {})
    r["failovers"] = again.get("requests", 0)
    r["failovers_pct"] = round(100 * r["failovers"] / total, 1)
    r["other_attempts"] = {k: v["requests"] for k, v in by_attempts.items() if k not in ("1", "2")}
    for p in ("p50", "p99"):
        r[f"first_{p}_ms"] = first.get(f"{p}_ms")
        r[f"failover_{p}_ms"] = again.get(f"{p}_ms")
        if first.get(f"{p}_ms") is not None and again.get(f"{p}_ms") is not None:
            r[f"added_{p}_ms"] = round(again[f"{p}_ms"] - first[f"{p}_ms"], 3)
    return r


@scenario("failover")
def failover(b: Bench) -> dict[str, Any]:
    """Two backends in azproxy's config file (equal weight, same priority), each a bench/upstream.py mock;
    "flaky" answers 429 with `retry-after-ms: 0` to every second request it gets. Measured with
    bench/client.py (it reads `x-azproxy-backend` / `x-azproxy-attempts` on every answer) at 64 connections
    (the client must see no error) and at 4, where nothing queues (the latency a failover adds).

    `retry-after-ms: 0` makes azproxy's cooldown of "flaky" end at once, so every request round-robin gives
    it is really sent there and every second one fails over: failover is what is measured, not the cooldown
    (any longer value would let requests skip "flaky" while it cools down, and the share of failovers would
    depend on the request rate)."""
    a = b.args
    mock_py = str(Path(__file__).parent / "upstream.py")
    mocks: dict[str, tuple[Server, int]] = {}
    rows: dict[str, Any] = {}
    try:
        for name in FAILOVER_BACKENDS:
            port = free_port()
            argv = [sys.executable, mock_py, str(port)]
            if name == "flaky":
                argv += ["--fail-every=2", "--retry-after-ms=0"]
            mocks[name] = (b.start(f"mock-{name}", argv, port), port)
        conf = b.workdir / "failover.toml"
        conf.write_text(FAILOVER_TOML.format(*FAILOVER_BACKENDS, *(port for _, port in mocks.values())))
        env = {"AZPROXY_CONFIG": str(conf), "BENCH_BACKEND_KEY": KEY}
        for n, skip in b.workers_rows():
            if skip is None:
                rows[f"azproxy-{n}w"] = NOT_RUN
                continue
            with b.azproxy(n, name=f"azproxy-{n}w-failover", env=env) as t:
                if a.warmup:
                    loaders.python_plain(t.url, t.header, a.connections, a.warmup)
                rows[f"azproxy-{n}w"] = {
                    f"c{a.connections}": failover_run(b, t, mocks, a.connections, a.duration),
                    f"c{a.low_connections}": failover_run(b, t, mocks, a.low_connections, a.low_duration),
                    "start_s": t.start_s,
                    "idle": t.idle,
                }
    finally:
        for server, _ in mocks.values():
            server.stop()
    return rows


@scenario("startup")
def startup(b: Bench) -> dict[str, Any]:
    """Start-up to ready (spawn to the first 200 from /healthz) and idle RSS, five starts per worker count."""
    out: dict[str, Any] = {}
    for n, skip in b.workers_rows():
        if skip is None:
            out[f"azproxy-{n}w"] = NOT_RUN
            continue
        starts, idles = [], []
        for _ in range(b.args.starts):
            with b.azproxy(n) as t:
                starts.append(t.start_s)
                idles.append(t.idle)
        starts.sort()
        out[f"azproxy-{n}w"] = {
            "start_s": starts,
            "start_median_s": starts[len(starts) // 2],
            "idle": idles[-1],
        }
    return out


@scenario("profile", quick=False)
def profile(b: Bench) -> dict[str, Any]:
    """py-spy on one azproxy worker during the 64-connection non-streamed load: where its CPU goes."""
    a = b.args
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        raise RuntimeError("py-spy is not installed (pip install py-spy failed?)")
    raw = (
        Path(__file__).parent / "out" / f"{Path(a.out).stem}.profile.txt"
    )  # collapsed stacks, for flame graphs
    raw.parent.mkdir(exist_ok=True)
    with b.azproxy(1) as t:
        b.wrk(t.url, t.header, a.connections, a.warmup)
        pid = str(t.server.proc.pid) if t.server else ""
        spy = subprocess.Popen(
            [
                str(pyspy),
                "record",
                "--pid",
                pid,
                "--duration",
                str(max(1, round(a.duration))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--full-filenames",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        r = b.wrk(t.url, t.header, a.connections, a.duration)
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-400:]}")
    return {"rps_while_profiled": r["rps"], **summarise_profile(raw)}


def summarise_profile(raw: Path, top: int = 20) -> dict[str, Any]:
    """Collapsed stacks -> the share of samples by innermost Python function and by the area it is in (time in
    C code counts for the Python function that called it)."""
    own: dict[str, int] = {}
    by_area: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = stack.split(";")
        leaf = frames[-1].split(" (")[0] + " (" + _module(frames[-1]) + ")"
        own[leaf] = own.get(leaf, 0) + count
        area = _area(frames[-1])
        by_area[area] = by_area.get(area, 0) + count

    def pct(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "own_top": pct(own), "self_by_area": pct(by_area), "raw": str(raw)}


def _module(frame: str) -> str:
    path = frame.rpartition(" (")[2].rstrip(")").split(":")[0]
    parts = path.split("/")
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    if "azproxy" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("azproxy") :])
    return parts[-1]


def _area(frame: str) -> str:
    module = _module(frame)
    if module.startswith("azproxy/"):
        return "azproxy (own code)"
    if module.startswith(("aiohttp/", "multidict/", "yarl/")):
        return "aiohttp " + module.split("/")[-1]
    if module in ("events.py", "base_events.py", "runners.py", "tasks.py") or module.startswith("uvloop"):
        return "event loop"
    return module.split("/")[0]
