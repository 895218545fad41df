"""The report: Markdown tables with ratios, the targets met or missed, and the concurrency plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def f(v: Any, fmt: str = "{:.1f}") -> str:
    return fmt.format(v) if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def not_run(name: str, r: Row, width: int) -> list[str] | None:
    if "not_run" in r:
        return [name, f"not run ({r['not_run']})", *[""] * (width - 2)]
    return None


def plain_table(res: Row) -> list[str]:
    d, n = res.get("direct", {}), res.get("nginx", {})
    head = [
        "target",
        "req/s",
        "x nginx",
        "x direct",
        "p50 ms",
        "p99 ms",
        "errors",
        "CPU µs/req",
        "x nginx CPU",
        "p50@c4 ms",
        "+p50@c4 ms",
        "idle RSS MB",
        "start ms",
    ]
    rows = []
    for name, r in res.items():
        skip = not_run(name, r, len(head))
        if skip:
            rows.append(skip)
            continue
        c4 = r.get("c4", {})
        add = c4.get("p50_ms") - d["c4"]["p50_ms"] if c4.get("p50_ms") is not None and d.get("c4") else None
        idle = r.get("idle") or {}
        rows.append(
            [
                name,
                f(r.get("rps"), "{:,.0f}"),
                f(ratio(r.get("rps"), n.get("rps")), "{:.3f}"),
                f(ratio(r.get("rps"), d.get("rps")), "{:.3f}"),
                f(r.get("p50_ms"), "{:.2f}"),
                f(r.get("p99_ms"), "{:.2f}"),
                str(r.get("errors", "-")),
                f(r.get("cpu_us_per_req")),
                f(ratio(r.get("cpu_us_per_req"), n.get("cpu_us_per_req")), "{:.2f}"),
                f(c4.get("p50_ms"), "{:.3f}"),
                f(add, "{:+.3f}") if name != "direct" else "0",
                f(idle.get("idle_rss_mb")),
                f(r["start_s"] * 1000 if r.get("start_s") else None, "{:.0f}"),
            ]
        )
    return table(head, rows)


def stream_table(res: Row) -> list[str]:
    d = res.get("direct", {})
    head = [
        "target",
        "streams",
        "errors",
        "chunks lost",
        "reordered",
        "TTFC p50 ms",
        "TTFC p99 ms",
        "TTFC p99 limit ms",
        "late p99 ms",
        "late max ms",
        "total p99 ms",
        "peak RSS MB",
        "peak RSS 1 proc MB",
        "CPU µs/chunk",
        "listen drops",
    ]
    limit = 2 * d["ttfc_p99_ms"] + 50 if isinstance(d.get("ttfc_p99_ms"), int | float) else None
    rows = []
    for name, r in res.items():
        skip = not_run(name, r, len(head))
        if skip:
            rows.append(skip)
            continue
        rows.append(
            [
                name,
                str(r.get("streams")),
                str(r.get("errors")),
                str(r.get("chunks_lost")),
                str(r.get("chunks_reordered")),
                f(r.get("ttfc_p50_ms")),
                f(r.get("ttfc_p99_ms")),
                f(limit) if name != "direct" else "",
                f(r.get("late_p99_ms")),
                f(r.get("late_max_ms")),
                f(r.get("total_p99_ms")),
                f(r.get("peak_rss_mb")),
                f(r.get("peak_rss_one_process_mb")),
                f(r.get("cpu_us_per_chunk")),
                str(r.get("listen_drops")),
            ]
        )
    out = table(head, rows)
    notes = [
        f"{name}: {r['rss_kb_per_stream']} KB of RSS per open stream (peak minus idle, over {r['streams']:,})"
        for name, r in res.items()
        if "rss_kb_per_stream" in r
    ]
    return out + (["", *notes] if notes else [])


def curve_table(res: Row) -> list[str]:
    levels = next((list(r) for r in res.values() if "not_run" not in r), [])
    head = ["target", *[f"c{c} req/s" for c in levels], *[f"c{c} p99 ms" for c in levels], "errors"]
    rows = []
    for name, r in res.items():
        skip = not_run(name, r, len(head))
        if skip:
            rows.append(skip)
            continue
        rows.append(
            [
                name,
                *[f(r[c]["rps"], "{:,.0f}") for c in levels],
                *[f(r[c]["p99_ms"], "{:.2f}") for c in levels],
                str(sum(r[c]["errors"] for c in levels)),
            ]
        )
    return table(head, rows)


def capacity_lines(res: Row) -> list[str]:
    head = [
        "streams",
        "errors",
        "lost",
        "late p50 ms",
        "late p99 ms",
        "late max ms",
        "TTFC p99 ms",
        "CPU s",
        "peak RSS MB",
    ]
    rows = [
        [
            n,
            str(r["errors"]),
            str(r["chunks_lost"]),
            f(r["late_p50_ms"]),
            f(r["late_p99_ms"]),
            f(r["late_max_ms"]),
            f(r["ttfc_p99_ms"]),
            f(r["cpu_s"], "{:.2f}"),
            f(r["peak_rss_mb"]),
        ]
        for n, r in res["steps"].items()
    ]
    d = res.get("direct_at_last_step", {})
    return [
        f"One worker held **{res['held']:,}** concurrent streams with chunk lateness p99 ≤ 50 ms.",
        "",
        *table(head, rows),
        "",
        f"Mock and client alone at the last step: late p99 {f(d.get('late_p99_ms'))} ms, lost "
        f"{d.get('chunks_lost')}, errors {d.get('errors')}.",
    ]


def tunnel_lines(res: Row) -> list[str]:
    rev = res["reverse"]
    head = ["mode", "req/s", "x reverse", "p50 ms", "p99 ms", "errors", "CPU µs/req", "client CPU µs/req"]
    rows = [
        [
            name,
            f(r["rps"], "{:,.0f}"),
            f(ratio(r["rps"], rev["rps"]), "{:.3f}"),
            f(r["p50_ms"], "{:.2f}"),
            f(r["p99_ms"], "{:.2f}"),
            str(r["errors"]),
            f(r.get("cpu_us_per_req")),
            f(r.get("client_cpu_us_per_req")),
        ]
        for name, r in res.items()
    ]
    return table(head, rows)


def gc_lines(res: Row) -> list[str]:
    tuned = res["tuned"]
    head = ["garbage collector", "req/s", "x tuned", "CPU µs/req", "worst p99 ms", "errors"]
    rows = [
        [
            name,
            f(r["rps"], "{:,.0f}"),
            f(ratio(r["rps"], tuned["rps"]), "{:.3f}"),
            f(r.get("cpu_us_per_req")),
            f(r["p99_ms"], "{:.2f}"),
            str(r["errors"]),
        ]
        for name, r in res.items()
    ]
    return table(head, rows)


def failover_lines(res: Row) -> list[str]:
    head = [
        "target",
        "conns",
        "req/s",
        "errors",
        "served by steady",
        "served by flaky",
        "failovers",
        "p50 first ms",
        "p50 failover ms",
        "+p50 ms",
        "p99 first ms",
        "p99 failover ms",
        "+p99 ms",
        "flaky 429s (mock)",
        "CPU µs/req",
    ]
    rows = []
    for name, r in res.items():
        skip = not_run(name, r, len(head))
        if skip:
            rows.append(skip)
            continue
        for run in (v for v in r.values() if isinstance(v, dict) and "served" in v):
            share = run["served_pct"]
            rows.append(
                [
                    name,
                    str(run["connections"]),
                    f(run["rps"], "{:,.0f}"),
                    str(run["errors"]),
                    f"{share['steady']:.1f} %",
                    f"{share['flaky']:.1f} %",
                    f"{run['failovers']:,} ({run['failovers_pct']:.1f} %)",
                    f(run.get("first_p50_ms"), "{:.3f}"),
                    f(run.get("failover_p50_ms"), "{:.3f}"),
                    f(run.get("added_p50_ms"), "{:+.3f}"),
                    f(run.get("first_p99_ms"), "{:.2f}"),
                    f(run.get("failover_p99_ms"), "{:.2f}"),
                    f(run.get("added_p99_ms"), "{:+.2f}"),
                    f"{run['mock_counts']['flaky'].get('429', 0):,}",
                    f(run.get("cpu_us_per_req")),
                ]
            )
    return [
        *table(head, rows),
        "",
        "Two mock backends, equal weight, same priority; flaky answers 429 with `retry-after-ms: 0` to every second "
        "request it gets (so its cooldown ends at once and round-robin keeps sending it half the requests). "
        "Served by: `x-azproxy-backend` of the 200s; failovers: those with `x-azproxy-attempts: 2`; first / "
        "failover: latency of the 200s with 1 / 2 attempts, and +: the difference. Expected: 75 % / 25 % / 25 %.",
    ]


def mock_lines(res: Row) -> list[str]:
    p = next(v for k, v in res.items() if k.startswith("nginx"))
    s = next(v for k, v in res.items() if k.startswith("stream"))
    return [
        f"- nginx mock alone, wrk c128: **{f(p['rps'], '{:,.0f}')} req/s**, {f(p['mock_cpu_us_per_req'])} µs "
        f"CPU per request, {p['errors']} errors.",
        f"- stream mock alone, {s['streams']:,} streams x 40 chunks 50 ms apart: **{f(s['chunks_per_s'], '{:,.0f}')}"
        f" chunks/s**, {f(s['mock_cpu_us_per_chunk'])} µs CPU per chunk, lost {s['chunks_lost']}, "
        f"late p99 {f(s['late_p99_ms'])} ms, errors {s['errors']}.",
    ]


def startup_lines(res: Row) -> list[str]:
    head = [
        "target",
        "start-up to ready ms (median)",
        "all starts ms",
        "processes",
        "idle RSS MB (sum)",
        "idle RSS MB (largest process)",
    ]
    rows = []
    for name, r in res.items():
        skip = not_run(name, r, len(head))
        if skip:
            rows.append(skip)
            continue
        idle = r["idle"] or {}
        rows.append(
            [
                name,
                f(r["start_median_s"] * 1000, "{:.0f}"),
                ", ".join(f"{s * 1000:.0f}" for s in r["start_s"]),
                str(idle.get("processes")),
                f(idle.get("idle_rss_mb")),
                f(idle.get("idle_rss_max_process_mb")),
            ]
        )
    return table(head, rows)


def profile_lines(res: Row) -> list[str]:
    lines = [
        f"{res['samples']:,} samples at 200 Hz over the 64-connection run ({f(res['rps_while_profiled'], '{:,.0f}')}"
        " req/s while profiled). Self time by area (C code counts for its Python caller; the event loop's share"
        " includes its waits in epoll):",
        "",
    ]
    lines += table(["area", "% of samples"], [[k, f(v)] for k, v in res["self_by_area"]])
    lines += ["", "Top functions by self time:", ""]
    lines += table(
        ["function (module)", "% of samples"], [[k.replace("|", "/"), f(v)] for k, v in res["own_top"]]
    )
    return lines


SECTIONS = {
    "mock": ("Mock upstreams alone", mock_lines),
    "plain": ("Non-streamed chat, 64 keep-alive connections (wrk)", plain_table),
    "curve": ("Throughput and p99 as concurrency rises (wrk)", curve_table),
    "streams": ("Streams, all started at once", stream_table),
    "streams-5k": ("Many concurrent streams, chunks 1 s apart", stream_table),
    "stream-capacity": ("Streams one worker holds", capacity_lines),
    "tunnel": (
        "Intercepted CONNECT tunnel vs reverse, both answered in OpenAI's shape (client.py, 64 connections)",
        tunnel_lines,
    ),
    "gc": ("Garbage collector tuned at start-up, or not (one worker, wrk, 64 connections)", gc_lines),
    "failover": ("Two backends, one answering 429 to half its requests (client.py)", failover_lines),
    "startup": ("Start-up and idle memory", startup_lines),
    "profile": ("Profile of one worker (py-spy)", profile_lines),
}


def targets(results: Row, args: Any) -> list[tuple[str, bool | None, str]]:
    """(target, met (None: not measured), the figures) for each of the issue's targets."""
    sc = results["scenarios"]
    out: list[tuple[str, bool | None, str]] = []

    def ok(name: str) -> Row | None:
        r = sc.get(name)
        return r if isinstance(r, dict) and "error" not in r else None

    p = ok("plain")
    if p:
        nginx = p["nginx"]
        key = f"azproxy-{args.workers}w"
        row = p.get(key, {})
        note = ""
        if "not_run" in row or not row:
            key, row, note = (
                "azproxy-1w",
                p["azproxy-1w"],
                f" (azproxy-{args.workers}w not run: no --workers yet)",
            )
        r = ratio(row["rps"], nginx["rps"])
        met = r is not None and r >= 0.30 and row["errors"] == 0
        out.append(
            (
                "1. req/s ≥ 0.30x nginx (aim 0.40x), zero errors, c64",
                met,
                f"{key}: {row['rps']:,.0f} / {nginx['rps']:,.0f} = {r:.3f}x, {row['errors']} errors{note}",
            )
        )
        c = ratio(row["cpu_us_per_req"], nginx["cpu_us_per_req"])
        out.append(
            (
                "2. CPU per request ≤ 6x nginx's (process tree)",
                c is not None and c <= 6,
                f"{key}: {row['cpu_us_per_req']} / {nginx['cpu_us_per_req']} µs = {f(c, '{:.2f}')}x",
            )
        )
        one, d = p["azproxy-1w"], p["direct"]
        add = row["c4"]["p50_ms"] - d["c4"]["p50_ms"]
        also = f" (azproxy-1w: {one['c4']['p50_ms'] - d['c4']['p50_ms']:+.3f} ms)" if row is not one else ""
        out.append(
            (
                "3. added p50 at 4 connections < 0.3 ms over direct",
                add < 0.3,
                f"{key} {row['c4']['p50_ms']:.3f} - direct {d['c4']['p50_ms']:.3f} = {add:+.3f} ms{also}",
            )
        )
    else:
        out += [("1-3. non-streamed", None, "plain scenario not run or errored")]
    s, s5 = ok("streams"), ok("streams-5k")
    if s:
        key = f"azproxy-{args.workers}w"
        if not isinstance(s.get(key), dict) or "not_run" in s[key]:
            key = "azproxy-1w"
        r, d = s[key], s["direct"]
        limit = 2 * d["ttfc_p99_ms"] + 50
        met = (
            r["chunks_lost"] == 0
            and r["chunks_reordered"] == 0
            and r["errors"] == 0
            and r["ttfc_p99_ms"] <= limit
            and r["peak_rss_one_process_mb"] < 150
        )
        out.append(
            (
                f"4a. {r['streams']:,} streams x {args.stream_chunks}: nothing lost/reordered, TTFC p99 ≤ 2x direct"
                " + 50 ms, worker peak RSS < 150 MB",
                met,
                f"{key}: lost {r['chunks_lost']}, reordered {r['chunks_reordered']}, errors {r['errors']}, TTFC "
                f"p99 {r['ttfc_p99_ms']:.1f} ms (limit {limit:.1f}), peak RSS of one worker "
                f"{r['peak_rss_one_process_mb']} MB",
            )
        )
    if s5:
        r = s5["azproxy-1w"]
        out.append(
            (
                f"4b. {r['streams']:,} concurrent streams: zero lost",
                r["chunks_lost"] == 0 and r["errors"] == 0,
                f"lost {r['chunks_lost']}, errors {r['errors']}, {r['rss_kb_per_stream']} KB RSS per stream "
                f"(peak {r['peak_rss_mb']} MB)",
            )
        )
    t = ok("tunnel")
    if t:
        r = ratio(t["tunnel"]["rps"], t["reverse"]["rps"])
        out.append(
            (
                "5. tunnel req/s ≥ 0.85x reverse",
                r is not None and r >= 0.85 and t["tunnel"]["errors"] == 0,
                f"{t['tunnel']['rps']:,.0f} / {t['reverse']['rps']:,.0f} = {f(r, '{:.3f}')}x, "
                f"{t['tunnel']['errors']} errors",
            )
        )
    fo = ok("failover")
    if fo:
        runs = [run for r in fo.values() if "not_run" not in r for run in r.values() if isinstance(run, dict)]
        runs = [run for run in runs if "served" in run]
        errors = sum(run["errors"] for run in runs)
        low = fo["azproxy-1w"].get(f"c{args.low_connections}", {})
        out.append(
            (
                "7. two backends, one answering 429 to half its requests: zero client errors",
                errors == 0 and all(run["failovers"] for run in runs),
                f"{errors} errors over {sum(run['requests'] for run in runs):,} requests; "
                f"{sum(run['failovers'] for run in runs):,} failovers; one failover adds "
                f"{f(low.get('added_p50_ms'), '{:+.3f}')} ms p50, {f(low.get('added_p99_ms'), '{:+.3f}')} ms "
                f"p99 (azproxy-1w, {args.low_connections} connections)",
            )
        )
    st = ok("startup")
    if st:
        r = st["azproxy-1w"]
        idle = r["idle"]["idle_rss_max_process_mb"]
        out.append(
            (
                "6. idle RSS per worker < 45 MB, start-up to ready < 300 ms",
                idle < 45 and r["start_median_s"] < 0.3,
                f"azproxy-1w: idle {idle} MB, start-up median {r['start_median_s'] * 1000:.0f} ms"
                + _workers_start(st, args.workers),
            )
        )
    out.sort(key=lambda target: int(re.match(r"\d+", target[0]).group()))  # type: ignore[union-attr]
    return out


def _workers_start(startup: Row, workers: int) -> str:
    """The N-worker start-up beside the one-process figures of target 6."""
    r = startup.get(f"azproxy-{workers}w")
    if not isinstance(r, dict) or "start_median_s" not in r:
        return ""
    idle = r["idle"]
    return (
        f" (azproxy-{workers}w: start-up median {r['start_median_s'] * 1000:.0f} ms, largest process "
        f"{idle['idle_rss_max_process_mb']} MB, {idle['idle_rss_mb']} MB for all {r['idle']['processes']})"
    )


def render(results: Row, args: Any) -> str:
    m = results["machine"]
    lines = [
        f"Run {results['started']} ({'quick' if args.quick else 'full'}), {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB, {m['os']}, kernel {m['kernel']}; Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"uvloop {m['uvloop']}, nginx {m['nginx']}, {m['wrk']}; azproxy "
        + (
            f"from the --azproxy-path copy (repo at {m['azproxy_commit']})"
            if m.get("azproxy_path")
            else f"{m['azproxy_commit']}{' + uncommitted changes' if m['azproxy_dirty'] else ''}"
        )
        + ".",
        "Everything (load generator, mocks, nginx, azproxy) shares these cores on loopback: compare ratios and "
        "CPU per request, not absolute figures.",
    ]
    for name, r in results["scenarios"].items():
        title, fn = SECTIONS.get(name, (name, None))
        lines += ["", f"### {title}", ""]
        if "error" in r:
            lines.append(f"ERROR: {r['error']}")
        elif fn:
            lines += fn(r)
    lines += ["", "### Targets", ""]
    lines += table(
        ["target", "", "measured"],
        [
            [t, {True: "met", False: "missed", None: "not measured"}[m_], why]
            for t, m_, why in results["targets"]
        ],
    )
    busy = [(f"{name}", r.get("background_busy_pct")) for name, r in _walk(results["scenarios"])]
    noisy = [n for n, b in busy if isinstance(b, int | float) and b > args.quiet_pct]
    lines += [
        "",
        "Other load before the measurements: "
        + (
            f"above {args.quiet_pct}% before {', '.join(noisy)} (those figures are suspect)."
            if noisy
            else f"under {args.quiet_pct}% before every one."
        ),
    ]
    return "\n".join(lines) + "\n"


def _walk(d: Row, prefix: str = "") -> list[tuple[str, Row]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            if "background_busy_pct" in v:
                out.append((prefix + k, v))
            out += _walk(v, prefix + k + "/")
    return out


def plot(results: Row, path: Path) -> bool:
    """req/s and p99 against connections, and chunk lateness against streams; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = results["scenarios"].get("curve")
    cap = results["scenarios"].get("stream-capacity")
    panels = [p for p in (curve, cap) if isinstance(p, dict) and "error" not in p]
    if not panels:
        return False
    fig, axes = plt.subplots(1, 3 if cap and "error" not in cap else 2, figsize=(15, 4.5))
    if curve and "error" not in curve:
        for name, r in curve.items():
            if "not_run" in r:
                continue
            xs = [int(c) for c in r]
            axes[0].plot(xs, [r[c]["rps"] for c in r], marker="o", label=name)
            axes[1].plot(xs, [r[c]["p99_ms"] for c in r], marker="o", label=name)
        for ax, title in ((axes[0], "req/s"), (axes[1], "p99 latency ms")):
            ax.set_xscale("log", base=4)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("connections")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[1].set_yscale("log")
    if cap and "error" not in cap:
        ax = axes[-1]
        xs = [int(n) for n in cap["steps"]]
        ax.plot(
            xs, [r["late_p99_ms"] for r in cap["steps"].values()], marker="o", label="azproxy-1w late p99"
        )
        ax.axhline(50, color="red", linestyle="--", label="50 ms")
        ax.set_xlabel("concurrent streams (chunks 50 ms apart)")
        ax.set_title("chunk lateness p99 ms, one worker")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True
