"""azproxy benchmark: the same load straight to the Azure OpenAI emulator and through azproxy, side by side.

    python bench/run.py [--duration 10] [--connections 64] [--streams 200] [--chunks 50] [--chunk-delay 0.02]
                        [--out results.json]

Starts `azproxy emulator` and `azproxy serve` (with this Python) on free 127.0.0.1 ports, checks one request
through the proxy, then measures non-streamed chat (wrk when installed, else bench/load.py) and bursts of
concurrent streams (bench/load.py). CPU and RSS come from /proc. Prints Markdown tables; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from load import chat_body  # bench/load.py, beside this script

HERE = Path(__file__).resolve().parent
API_VERSION = "2024-10-21"
KEY = "sk-bench-key"
MODEL = "gpt-3.5-turbo"
DEPLOYMENT_PATH = f"/openai/deployments/gpt-35-turbo/chat/completions?api-version={API_VERSION}"
PROXY_PATH = "/v1/chat/completions"
BODY = chat_body(MODEL, stream=False)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
AZPROXY = [sys.executable, "-m", "azproxy"]
LOAD_PY = [sys.executable, str(HERE / "load.py")]
TARGETS = ("direct", "azproxy")


# ---------------------------------------------------------------- processes and /proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
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
    """utime + stime of `pids` from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_kb(pids: list[int]) -> int:
    """Summed VmRSS of `pids` in KiB."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
        total += int(match.group(1)) if match else 0
    return total


def listen_drops() -> int:
    """The kernel's count of connections dropped because an accept queue was full (TcpExt ListenDrops)."""
    rows = [
        line.split()
        for line in Path("/proc/net/netstat").read_text().splitlines()
        if line.startswith("TcpExt:")
    ]
    return int(dict(zip(rows[0], rows[1], strict=True)).get("ListenDrops", 0)) if len(rows) == 2 else 0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy, all cores together (from /proc/stat)."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / CLOCK_TICKS  # all but idle and iowait


def machine_busy(seconds: float) -> float:
    """Percent of all cores busy over the next `seconds`."""
    busy0 = machine_busy_seconds()
    time.sleep(seconds)
    return round(100 * (machine_busy_seconds() - busy0) / (seconds * CORES), 1)


def wait_quiet(limit_pct: float, max_wait: float) -> float:
    """Waits (at most `max_wait` s) until the machine, with our servers idle, is under `limit_pct` busy."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy(1)
    while busy > limit_pct and time.monotonic() < deadline:
        busy = machine_busy(2)
    return busy


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_OPENAI_", "AZPROXY_"))}


class Server:
    """A subprocess leading a process group of its own, so it and anything it starts stop together.

    It runs in `logdir`, without the caller's azproxy settings (AZURE_OPENAI_*, AZPROXY_*, a .env file):
    only `env` configures it.
    """

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**clean_environ(), **(env or {})},
                cwd=logdir,
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc.poll() is None else []

    def wait_ready(self, url: str, timeout: float) -> None:
        """Polls `url` until it answers at all; raises with the log's tail if the server exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} did not come up at {url}:\n{self.log.read_text(errors='replace')[-800:]}"
        )

    def exit_note(self) -> str:
        """'' while it runs, else how it ended (a server must not end before the bench stops it)."""
        code = self.proc.poll()
        if code is None:
            return ""
        return f"{self.name} had exited ({f'signal {-code}' if code < 0 else f'code {code}'}). "

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class RssSampler:
    """Peak summed VmRSS of `pids`, sampled every 50 ms while the `with` block runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.peak_kb = pids, rss_kb(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- load generators


def own_cpu(who: int = resource.RUSAGE_SELF) -> float:
    """CPU seconds of this process (or, with RUSAGE_CHILDREN, of its finished children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    return own_cpu(resource.RUSAGE_CHILDREN)


def run_load(argv: list[str], timeout: float) -> dict[str, Any]:
    """Runs a load generator to completion; its JSON result plus the CPU it used."""
    before = children_cpu()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadgen_cpu_s"] = round(children_cpu() - before, 2)
    return result


def wrk_output(text: str) -> dict[str, Any]:
    """The figures load.py reports, read from `wrk --latency` output."""

    def latency_ms(p: int) -> float | None:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\b", text, re.M)
        return round(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 3) if m else None

    requests = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not (requests and rps):
        raise RuntimeError(f"unexpected wrk output: {text[-800:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    kinds = {"non-2xx": int(non2xx.group(1))} if non2xx else {}
    if sockets:
        kinds.update(
            {
                f"socket {k}": int(v)
                for k, v in zip(("connect", "read", "write", "timeout"), sockets.groups(), strict=True)
                if int(v)
            }
        )
    return {
        "requests": int(requests.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": latency_ms(50),
        "p99_ms": latency_ms(99),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
    }


class PlainLoad:
    """Closed-loop non-streamed load: wrk when it is installed (and not refused), else bench/load.py."""

    def __init__(self, use_wrk: bool, workdir: Path) -> None:
        self.wrk = shutil.which("wrk") if use_wrk else None
        self.script = workdir / "post.lua"
        self.script.write_text(
            f"wrk.method = 'POST'\nwrk.body = {json.dumps(json.dumps(BODY))}\n"
            "wrk.headers['Content-Type'] = 'application/json'\n"
        )

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "bench/load.py"

    def __call__(self, url: str, header: str, connections: int, seconds: float) -> dict[str, Any]:
        if not self.wrk:
            argv = [*LOAD_PY, "plain", url, "-H", header, f"--connections={connections}"]
            return run_load([*argv, f"--duration={seconds}"], seconds + 60)
        before = children_cpu()
        argv = [self.wrk, f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout=10s"]
        argv += ["--latency", f"--script={self.script}", "-H", header, url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        return {**wrk_output(done.stdout + done.stderr), "loadgen_cpu_s": round(children_cpu() - before, 2)}


def stream_load(url: str, header: str, args: argparse.Namespace, streams: int, rounds: int) -> dict[str, Any]:
    """Opens `rounds` bursts of `streams` concurrent streams with bench/load.py, one burst after another."""
    argv = [*LOAD_PY, "stream", url, "-H", header, f"--streams={streams}", f"--rounds={rounds}"]
    return run_load([*argv, f"--chunks={args.chunks}", "--timeout=60"], rounds * 60 + 60)


# ---------------------------------------------------------------- the run


class Bench:
    """The emulator and azproxy, and the measurements of both phases against each."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.plain = PlainLoad(not args.no_wrk, workdir)
        emu_port, proxy_port = free_port(), free_port()
        emulator = [f"--address=127.0.0.1:{emu_port}", f"--chunks={args.chunks}"]
        emulator.append(f"--chunk-delay={args.chunk_delay}")
        self.emulator = Server("emulator", [*AZPROXY, "emulator", *emulator], workdir)
        self.proxy = Server(
            "azproxy",
            [*AZPROXY, "serve"],
            workdir,
            {
                "AZURE_OPENAI_PROXY_ADDRESS": f"127.0.0.1:{proxy_port}",
                "AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{emu_port}",
                "AZURE_OPENAI_APIVERSION": API_VERSION,
            },
        )
        self.urls = {
            "direct": f"http://127.0.0.1:{emu_port}{DEPLOYMENT_PATH}",
            "azproxy": f"http://127.0.0.1:{proxy_port}{PROXY_PATH}",
        }
        self.headers = {"direct": f"api-key: {KEY}", "azproxy": f"Authorization: Bearer {KEY}"}
        self.ready_urls = (f"http://127.0.0.1:{emu_port}/", f"http://127.0.0.1:{proxy_port}/healthz")

    def stop(self) -> None:
        self.proxy.stop()
        self.emulator.stop()

    def check(self) -> None:
        """Waits for both servers; then one real request and one stream through azproxy must succeed."""
        self.emulator.wait_ready(self.ready_urls[0], 30)
        self.proxy.wait_ready(self.ready_urls[1], 30)
        request = urllib.request.Request(
            self.urls["azproxy"],
            data=json.dumps(BODY).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = json.loads(answer.read())
        if not body.get("choices"):
            raise RuntimeError(f"azproxy answered without choices: {body}")
        one = stream_load(self.urls["azproxy"], self.headers["azproxy"], self.args, 1, 1)
        if one["errors"] or one["chunks_lost"]:
            raise RuntimeError(f"a stream through azproxy failed: {one}")

    def measure(self, target: str, load: Callable[[], dict[str, Any]], work: str) -> dict[str, Any]:
        """Runs `load` once, with the servers' CPU, the proxy's peak RSS and the kernel's listen drops
        around it; `work` names the result's count (requests or chunks) that CPU is divided by.

        `other_busy_pct` is the share of the machine that processes other than the servers, the load
        generator and the bench itself used meanwhile.
        """
        background = wait_quiet(self.args.quiet_pct, self.args.quiet_wait)
        proxy_pids, emu_pids = self.proxy.pids(), self.emulator.pids()
        proxy0, emu0, drops0 = cpu_seconds(proxy_pids), cpu_seconds(emu_pids), listen_drops()
        busy0, own0, start = machine_busy_seconds(), own_cpu(), time.monotonic()
        with RssSampler(proxy_pids) as rss:
            result = load()
        if gone := self.emulator.exit_note() + self.proxy.exit_note():
            raise RuntimeError(f"a server ended during the {target} run: {gone}")
        proxy_cpu, emu_cpu = cpu_seconds(proxy_pids) - proxy0, cpu_seconds(emu_pids) - emu0
        ours = proxy_cpu + emu_cpu + result["loadgen_cpu_s"] + own_cpu() - own0
        other = machine_busy_seconds() - busy0 - ours
        count = max(1, result[work])
        result.update(
            {
                "listen_drops": listen_drops() - drops0,
                "background_busy_pct": background,
                "other_busy_pct": round(max(0.0, 100 * other / ((time.monotonic() - start) * CORES)), 1),
                "emulator_cpu_s": round(emu_cpu, 2),
                "emulator_cpu_ms_per_1k": round(emu_cpu / count * 1e6, 1),
            }
        )
        if target == "azproxy":
            result.update(
                {
                    "proxy_cpu_s": round(proxy_cpu, 2),
                    "proxy_cpu_ms_per_1k": round(proxy_cpu / count * 1e6, 1),
                    "proxy_peak_rss_mb": round(rss.peak_kb / 1024, 1),
                }
            )
        return result

    def plain_phase(self) -> dict[str, Any]:
        a, out = self.args, {}
        for target in TARGETS:
            url, header = self.urls[target], self.headers[target]
            self.plain(url, header, a.connections, a.warmup)
            out[target] = self.measure(
                target, partial(self.plain, url, header, a.connections, a.duration), "requests"
            )
            out[target]["low_load"] = self.plain(url, header, a.low_connections, min(5, a.duration))
            log(f"non-streamed {target}: {json.dumps(out[target])}")
        return out

    def stream_phase(self) -> dict[str, Any]:
        a, out = self.args, {}
        for target in TARGETS:
            url, header = self.urls[target], self.headers[target]
            stream_load(url, header, a, a.stream_warmup, 1)
            out[target] = self.measure(
                target, partial(stream_load, url, header, a, a.streams, a.rounds), "chunks_received"
            )
            log(f"streamed {target}: {json.dumps(out[target])}")
        return out


def cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return match.group(1).strip() if match else platform.machine()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def tables(results: dict[str, Any]) -> str:
    a, plain, streams = results["args"], results["plain"], results["stream"]
    low = a["low_connections"]
    lines = [
        f"Non-streamed chat, {a['connections']} connections for {a['duration']} s after {a['warmup']} s "
        f"of warm-up ({results['plain_load']}); p50@c{low}: median latency of a separate "
        f"{min(5, a['duration'])} s run at {low} connections.",
        "",
        f"| target | req/s | x direct | p50 ms | p99 ms | p50@c{low} ms | +p50@c{low} ms | errors "
        "| proxy CPU ms/1k req | emulator CPU ms/1k req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    d = plain["direct"]
    for target in TARGETS:
        r = plain[target]
        lines.append(
            f"| {target} | {fmt(r['rps'], ',.0f')} | {fmt(ratio(r['rps'], d['rps']), '.2f')} "
            f"| {fmt(r['p50_ms'], '.2f')} | {fmt(r['p99_ms'], '.2f')} "
            f"| {fmt(r['low_load']['p50_ms'], '.2f')} "
            f"| {fmt(diff(r['low_load']['p50_ms'], d['low_load']['p50_ms']), '.2f')} | {r['errors']} "
            f"| {fmt(r.get('proxy_cpu_ms_per_1k'))} | {fmt(r['emulator_cpu_ms_per_1k'])} |"
        )
    lines += [
        "",
        f"Streamed chat: {a['rounds']} round(s) of {a['streams']} concurrent streams x {a['chunks']} "
        f"chunks {a['chunk_delay'] * 1000:g} ms apart, after a {a['stream_warmup']}-stream warm-up; "
        "TTFC: connect to first content chunk.",
        "",
        "| target | TTFC p50 ms | TTFC p99 ms | +TTFC p50 ms | total p50 ms | total p99 ms | chunks lost "
        "| errors | listen drops | proxy peak RSS MB | proxy CPU ms/1k chunks | emulator CPU ms/1k chunks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    d = streams["direct"]
    for target in TARGETS:
        r = streams[target]
        lines.append(
            f"| {target} | {fmt(r['ttfc_p50_ms'])} | {fmt(r['ttfc_p99_ms'])} "
            f"| {fmt(diff(r['ttfc_p50_ms'], d['ttfc_p50_ms']))} | {fmt(r['total_p50_ms'])} "
            f"| {fmt(r['total_p99_ms'])} | {r['chunks_lost']} | {r['errors']} | {r['listen_drops']} "
            f"| {fmt(r.get('proxy_peak_rss_mb'))} "
            f"| {fmt(r.get('proxy_cpu_ms_per_1k'), '.2f')} | {fmt(r['emulator_cpu_ms_per_1k'], '.2f')} |"
        )
    measured = [r for phase in (plain, streams) for r in phase.values()]
    before = max(r["background_busy_pct"] for r in measured)
    during = max(r["other_busy_pct"] for r in measured)
    noisy = max(before, during) > a["quiet_pct"]
    lines += [
        "",
        f"Idle RSS of azproxy after start-up and one request: {results['proxy_idle_rss_mb']} MB. "
        f"Other load on the machine: at most {before}% just before a measured run, {during}% during one"
        + (" (above the quiet limit: treat these figures as noisy)." if noisy else "."),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds of measured non-streamed load")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of non-streamed warm-up")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--low-connections", type=int, default=4, help="connections of the low-load latency run")
    ap.add_argument("--streams", type=int, default=200, help="concurrent streams per round")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds of --streams streams")
    ap.add_argument("--stream-warmup", type=int, default=20, help="streams of one unmeasured round first")
    ap.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    ap.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between chunks")
    ap.add_argument("--no-wrk", action="store_true", help="use bench/load.py even when wrk is installed")
    ap.add_argument(
        "--quiet-pct", type=float, default=15, help="other machine load under which a measurement starts"
    )
    ap.add_argument("--quiet-wait", type=float, default=30, help="longest wait for that, in seconds")
    ap.add_argument("--out", type=Path, help="also write all results as JSON here")
    args = ap.parse_args()

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="azproxy-bench-"))
    bench, keep_logs = None, False
    try:
        bench = Bench(args, workdir)
        if not bench.plain.wrk:
            log("wrk not found (Debian: apt-get install wrk); bench/load.py generates the non-streamed load.")
        bench.check()
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {
                "cpu": cpu_model(),
                "cores": CORES,
                "python": platform.python_version(),
                "kernel": platform.release(),
            },
            "plain_load": bench.plain.name,
            "proxy_idle_rss_mb": round(rss_kb(bench.proxy.pids()) / 1024, 1),
        }
        results["plain"] = bench.plain_phase()
        results["stream"] = bench.stream_phase()
    except KeyboardInterrupt:
        raise SystemExit("bench: interrupted") from None
    except RuntimeError as exc:
        keep_logs = True
        raise SystemExit(f"bench failed: {exc}\n(server logs in {workdir})") from None
    finally:
        if bench is not None:
            bench.stop()
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(tables(results))


if __name__ == "__main__":
    main()
