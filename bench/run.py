"""azproxy's load harness: azproxy beside nginx (the ceiling) and the mock upstream alone (the floor).

    python bench/run.py            # everything, about 7 minutes; writes bench/RESULTS.md, .json and .png
    python bench/run.py --quick    # about a minute; writes bench/out/quick.md and .json
    python bench/run.py --only plain,tunnel --duration 5

Installs what it lacks (nginx and wrk with apt-get, py-spy and matplotlib with pip into this Python's
environment), starts the mocks, then runs the scenarios of scenarios.py in order, each starting and stopping
the servers it measures, all on 127.0.0.1. Prints the tables (stdout) and progress (stderr). Exits 1 only if a
scenario errored; targets missed are reported, never fatal. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from procs import CORES, HERE, ensure_os_tools, ensure_pip, log, machine, raise_nofile

QUICK = {
    "duration": 2,
    "warmup": 0,
    "low_duration": 1,
    "short": 1,
    "streams": 1000,
    "stream_chunks": 20,
    "many_streams": 5000,
    "many_chunks": 2,
    "mock_streams": 1000,
    "starts": 3,
    "quiet_wait": 0.5,
}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add = ap.add_argument
    add("--quick", action="store_true", help="the 1-minute version: shorter loads, no curve/capacity/profile")
    add("--only", default="", help="comma-separated scenarios to run (default: all; see scenarios.py)")
    add("--workers", type=int, default=CORES, help="N of the N-worker rows (default: the cores, %(default)s)")
    add("--duration", type=float, default=10, help="seconds of each measured non-streamed run")
    add("--warmup", type=float, default=2, help="seconds of warm-up before it")
    add("--connections", type=int, default=64)
    add("--low-connections", type=int, default=4, help="the latency run's connections")
    add("--low-duration", type=float, default=5)
    add("--short", type=float, default=5, help="seconds of the mock-alone run")
    add("--curve", default="4,16,64,256,1024", help="connection counts of the curve")
    add("--curve-duration", type=float, default=4)
    add("--streams", type=int, default=1000, help="concurrent streams, 50 ms between chunks")
    add("--stream-chunks", type=int, default=40)
    add("--many-streams", type=int, default=5000, help="concurrent streams, 1 s between chunks")
    add("--many-chunks", type=int, default=10)
    add("--mock-streams", type=int, default=2000, help="streams of the stream-mock-alone run")
    add("--capacity-steps", default="250,500,750,1000,1500,2000,3000,4000")
    add("--starts", type=int, default=5, help="azproxy start-ups timed per worker count")
    add("--mock-workers", type=int, default=2, help="nginx mock worker processes")
    add("--quiet-pct", type=float, default=15, help="other load above which a measurement waits to start")
    add("--quiet-wait", type=float, default=5, help="longest such wait, s")
    add(
        "--azproxy-path",
        type=Path,
        help="measure the azproxy package in this folder (e.g. an exported commit)",
    )
    add("--out", type=Path, help="results JSON; .md and .png beside it (default: see above)")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in sys.argv:
                setattr(args, k, v)
    if args.out is None:
        args.out = HERE / "out" / "quick.json" if args.quick else HERE / "RESULTS.json"
    return args


def terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse()
    args.out = args.out.resolve()
    if args.azproxy_path:
        args.azproxy_path = args.azproxy_path.resolve()
    os.chdir(HERE.parent)
    signal.signal(signal.SIGTERM, terminate)
    installed = ensure_os_tools({"nginx": "nginx-light", "wrk": "wrk"})
    lacking = ensure_pip({"uvloop": "uvloop", "bin:py-spy": "py-spy", "matplotlib": "matplotlib"})
    if "uvloop" in lacking:
        raise SystemExit("bench needs uvloop (pip install uvloop)")
    nofile = raise_nofile()
    import report  # after the installs: it imports matplotlib when it plots
    import scenarios

    names = [n for n in scenarios.SCENARIOS if not args.quick or scenarios.SCENARIOS[n][1]]
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - set(scenarios.SCENARIOS)
        if unknown:
            raise SystemExit(
                f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(scenarios.SCENARIOS)}"
            )
        names = [n for n in scenarios.SCENARIOS if n in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="azproxy-bench-"))
    previous = load_previous(args.out)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": {k: str(v) for k, v in vars(args).items() if k != "azproxy_path"},
        "machine": machine(args.azproxy_path),
        "installed": installed,
        "nofile": nofile,
        "scenarios": {},
    }
    failed = False
    t0 = time.monotonic()
    bench = None
    try:
        bench = scenarios.Bench(args, workdir)
        results["workers_flag"] = bench.workers_supported
        if not bench.workers_supported:
            log(f"azproxy serve has no --workers yet: the {args.workers}-worker rows are not run")
        for name in names:
            log(f"scenario {name}")
            t = time.monotonic()
            try:
                results["scenarios"][name] = scenarios.SCENARIOS[name][0](bench)
            except Exception as e:
                failed = True
                results["scenarios"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                log(f"scenario {name} errored:\n{traceback.format_exc()}")
            log(f"scenario {name} done in {time.monotonic() - t:.0f}s")
    except KeyboardInterrupt:
        failed = True
        results["interrupted"] = True
        log("interrupted")
    except Exception as e:
        failed = True
        results["setup_error"] = f"{type(e).__name__}: {e}"
        log(f"setup failed:\n{traceback.format_exc()}")
    finally:
        if bench is not None:
            bench.stop_all()
    results["seconds"] = round(time.monotonic() - t0)
    results["targets"] = report.targets(results, args) if results["scenarios"] else []
    if previous and "profile" in results["scenarios"]:
        results["profile_before"] = previous
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # paths relative to the repository, so results read the same on every machine
    args.out.write_text(
        json.dumps(results, indent=1, ensure_ascii=False).replace(f"{HERE.parent}/", "") + "\n"
    )
    png = args.out.with_suffix(".png")
    plotted = report.plot(results, png)
    text = report.render(results, args)
    if results.get("profile_before"):
        before = results["profile_before"]
        when = f"{before['started']}, azproxy {before['commit']}"
        text += f"\n### Profile before (the previous run written here, {when})\n\n"
        text += "\n".join(report.profile_lines(before["profile"])) + "\n"
    if plotted:
        text += f"\n![throughput and p99 against connections; chunk lateness against streams]({png.name})\n"
    if results.get("setup_error"):
        text += f"\nSetup failed: {results['setup_error']}\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    kept = f"; logs in {workdir}" if failed else ""
    log(f"{results['seconds']}s; results in {args.out} (.md{', .png' if plotted else ''}){kept}")
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def load_previous(path: Path) -> dict[str, Any] | None:
    """The profile of the previous full run at `path`, shown as "before" beside this run's."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    prof = old.get("scenarios", {}).get("profile")
    if not isinstance(prof, dict) or "error" in prof:
        return None
    m = old.get("machine", {})
    source = (
        "(--azproxy-path copy)" if m.get("azproxy_path") else "working tree" if m.get("azproxy_dirty") else ""
    )
    commit = f"{m.get('azproxy_commit')} {source}".strip()
    return {"started": old.get("started"), "commit": commit, "profile": prof}


if __name__ == "__main__":
    sys.exit(main())
