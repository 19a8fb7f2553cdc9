"""The Markdown table, the JSON file and the latency plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench import common


def _f(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _lat(summary: dict[str, Any], key: str) -> str:
    return _f(summary.get(key), 2)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = [f"# SIP-lite benchmark ({'quick' if results['quick'] else 'full'} run)", ""]
    m = results["machine"]
    v = results["versions"]
    pin = results["pinning"]
    lines += [
        f"`{results['command']}` on {results['started']}, {results['duration_s']:.0f} s. "
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"open files {m['nofile_soft']}/{m['nofile_hard']}. "
        f"Python {v['python']}, aiohttp {v['aiohttp']}, redis-py {v['redis_py']} "
        f"(hiredis {v['hiredis'] or 'absent'}), msgpack {v['msgpack']} "
        f"({'C extension' if v['msgpack_c_extension'] else 'pure Python'}), uvloop {v['uvloop'] or 'absent'}, "
        f"redis-server {results.get('redis_server') or '-'}.",
        "",
        f"Server pinned to CPU {pin['server_cpus']}, load processes and redis-server to CPU {pin['load_cpus']}"
        if pin["server_cpus"]
        else "Single CPU: nothing pinned (load and server share it).",
        "",
    ]
    background = results.get("background", {})
    if background.get("warning"):
        lines += [f"**Warning:** {background['warning']}", ""]

    targets = results.get("targets", [])
    if targets:
        lines += ["## Targets (issue 5)", ""]
        lines += _table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], {True: "yes", False: "**no**", None: "-"}[t["met"]]] for t in targets],
        )
        lines.append("")

    runs = results.get("callsetup", [])
    if runs:
        lines += [
            "## Call setup at saturation",
            "",
            "A call is INVITE, 100, 180, 200, ACK, BYE, 200 between two online devices (12 frames through the "
            "server; the relay carries the same exchange as 6 relayed frames, in and out: 12 frames). "
            f"{runs[0]['pairs']} caller/callee pairs (a run named @N: N pairs), each one call at a time; every "
            "run handles the same "
            "number of calls. Setup latency: INVITE sent to 200 received, at the caller. Unloaded: one pair "
            "alone. CPU µs/call: server process CPU time / calls. Core busy: the server's CPU (any process, "
            "interrupts included); below ~95% the server was not the bottleneck.",
            "",
        ]
        rows = []
        for r in runs:
            rows.append(
                [
                    r["name"],
                    _f(r["calls"]),
                    _f(r["frames"]),
                    f"**{_f(r['calls_per_s'], 0)}**",
                    _pct(r.get("ratio_to_relay")),
                    _f(r["server_cpu_us_per_call"], 0),
                    _pct(r["server_core_busy"]),
                    _pct(r["load_cores_busy"]),
                    _lat(r["setup_latency"], "p50_ms"),
                    _lat(r["setup_latency"], "p99_ms"),
                    _lat(r["unloaded_setup_latency"], "p50_ms"),
                    _lat(r["unloaded_setup_latency"], "p99_ms"),
                    _f(sum(r["failures"].values()) + r["stuck_pairs"]),
                ]
            )
        lines += _table(
            [
                "run",
                "calls",
                "frames",
                "calls/s",
                "of relay",
                "CPU µs/call",
                "server core busy",
                "load core busy",
                "setup p50 ms",
                "setup p99 ms",
                "unloaded p50 ms",
                "unloaded p99 ms",
                "failed",
            ],
            rows,
        )
        lines.append("")

    switches = results.get("switches", [])
    if switches:
        lines += [
            "## Library switches (server only; same calls, same load)",
            "",
            "Change of call-setup throughput and server CPU per call against the baseline run of the same store. "
            "Run-to-run noise: the baseline repeated at the end of the switch runs.",
            "",
        ]
        lines += _table(
            ["store", "switch", "calls/s", "baseline calls/s", "throughput change", "CPU/call change", "noise"],
            [
                [
                    s["store"],
                    s["switch"],
                    _f(s["calls_per_s"], 0),
                    _f(s["baseline_calls_per_s"], 0),
                    _signed(s["throughput_change"]),
                    _signed(s["cpu_per_call_change"]),
                    _pct(s.get("noise")),
                ]
                for s in switches
            ],
        )
        lines.append("")

    idle = results.get("idle", [])
    if idle:
        lines += [
            "## Idle capacity",
            "",
            "Registered connections in one server process, each sending a keepalive every "
            f"{idle[0]['keepalive_interval_s']:.0f} s (presence_ttl {idle[0]['presence_ttl_s']:.0f} s) and "
            "answering the server's WebSocket pings. RSS/conn: (RSS - RSS before) / connections. "
            "CPU/keepalive: server CPU over one keepalive interval / keepalives answered in it (pings, timers "
            "and the presence sweep included), also without the full (generation 2) garbage collections that "
            "fell in the window; marginal: without full GCs, minus a window with keepalives paused. Full GCs: "
            "count since the server started and the longest, each a pause of the whole event loop.",
            "",
        ]
        rows = []
        for entry in idle:
            for level in entry["levels"]:
                rows.append(
                    [
                        entry["store"],
                        str(level["level"]),
                        _f(level["registered"]),
                        _f(level["failed"]),
                        _f(level["rss_mib"], 1),
                        f"**{_f(level['rss_per_conn_kib'], 1)}**",
                        _f(level["keepalives_per_s"], 0),
                        _pct(level["server_cpu_util"]),
                        _f(level["cpu_us_per_keepalive"], 0),
                        _f(level.get("cpu_us_per_keepalive_excl_gc"), 0),
                        _f(level.get("marginal_cpu_us_per_keepalive"), 0),
                        _pct(level.get("paused_server_cpu_util")),
                        f"{level.get('full_gc_since_start', 0)} / "
                        f"{_f(level.get('full_gc_max_ms_since_start'), 0)}",
                        _f(level.get("redis_bytes_per_registration"), 0),
                    ]
                )
        lines += _table(
            [
                "store",
                "level",
                "registered",
                "failed",
                "RSS MiB",
                "RSS/conn KiB",
                "keepalives/s",
                "server CPU",
                "CPU µs/keepalive",
                "same, without full GCs",
                "marginal µs/keepalive",
                "CPU, keepalives paused",
                "full GCs so far / longest ms",
                "Redis B/registration",
            ],
            rows,
        )
        lines.append("")

    wake = results.get("wake", [])
    if wake:
        lines += [
            "## Wake-to-bridge",
            "",
            "A held call to a sleeping device (registered with a VoIP token, socket closed); the development push "
            "provider records the push and the caller hears 183 push_sent; then the woken device connects and "
            "sends REGISTER. **Server side**: measured inside the server process (bench.serve --timings wraps "
            "Switchboard.receive and Connection.send): REGISTER handed to the switchboard to the held INVITE "
            "written to the socket. **Client side**: REGISTER sent to the INVITE frame received (adds two "
            "loopback hops and the client's parsing). The server's own `call.device_connected` log gives "
            "push_to_connect_ms, which is push accepted to device registered: it includes this benchmark's "
            "wake-up delay, not server work.",
            "",
        ]
        lines += _table(
            [
                "store",
                "calls",
                "server REGISTER→INVITE p50/p99 ms",
                "server REGISTER→200 p50/p99 ms",
                "client REGISTER→INVITE p50/p99 ms",
                "log push_to_connect p50/p99 ms",
                "failed",
            ],
            [
                [
                    w["store"],
                    _f(w["calls"]),
                    f"**{_lat(w['server_register_to_invite'], 'p50_ms')} / "
                    f"{_lat(w['server_register_to_invite'], 'p99_ms')}**",
                    f"{_lat(w['server_register_to_ok'], 'p50_ms')} / {_lat(w['server_register_to_ok'], 'p99_ms')}",
                    f"{_lat(w['client_register_to_invite'], 'p50_ms')} / "
                    f"{_lat(w['client_register_to_invite'], 'p99_ms')}",
                    f"{_lat(w['log_push_to_connect'], 'p50_ms')} / {_lat(w['log_push_to_connect'], 'p99_ms')}",
                    _f(sum(w["failures"].values())),
                ]
                for w in wake
            ],
        )
        lines.append("")

    push = results.get("push")
    if push:
        b = push["burst"]
        lines += [
            "## Push send latency (ApnsProvider → local APNs stand-in)",
            "",
            "`ApnsProvider.send_incoming_call` in the benchmark process (on the server CPU) against "
            "tests/apns_server.py (HTTP/2 over TLS, token auth) in a load process, one connection warmed by the "
            "first push.",
            "",
        ]
        lines += _table(
            ["figure", "value"],
            [
                ["first push (TLS handshake + JWT)", f"{_f(push['cold_first_push_ms'], 2)} ms"],
                [
                    f"sequential, {push['sequential']['n']} pushes p50 / p99",
                    f"**{_lat(push['sequential'], 'p50_ms')} / {_lat(push['sequential'], 'p99_ms')} ms**",
                ],
                [
                    f"{b['pushes']} pushes, {b['concurrency']} in flight",
                    f"**{_f(b['pushes_per_s'], 0)} pushes/s**, p50 {_f(b.get('p50_ms'), 2)} / p99 "
                    f"{_f(b.get('p99_ms'), 2)} ms, {_f(b['provider_cpu_us_per_push'], 0)} µs CPU/push",
                ],
                ["all delivered", "yes" if push["delivered_all"] else f"no: {push['outcomes']}"],
            ],
        )
        lines.append("")

    cost = results.get("redis_cost")
    if cost:
        lines += ["## Redis cost per operation", "", cost["method"], ""]
        rows = []
        for phase in ("register", "call", "keepalive", "close"):
            if phase not in cost:
                continue
            c = cost[phase]
            rows.append(
                [
                    {"call": "call setup (INVITE..BYE)", "close": "close (unregister)"}.get(phase, phase),
                    f"**{_f(c['round_trips_per_op'], 2)}**",
                    _f(c["commands_per_op"], 2),
                    _f(c["top_level_commands_per_op"], 2),
                    _f(c["script_commands_per_op"], 2),
                    ", ".join(f"{k} {_f(n, 2)}" for k, n in c["top_level"].items()) or "-",
                    ", ".join(f"{k} {_f(n, 2)}" for k, n in c["in_scripts"].items()) or "-",
                ]
            )
        lines += _table(
            [
                "operation",
                "round trips",
                "commands",
                "top-level",
                "in scripts",
                "top-level commands",
                "commands in scripts",
            ],
            rows,
        )
        lines.append("")

    profiles = results.get("profile", [])
    for prof in profiles:
        lines += [
            f"## Profile: call setup, {prof['store']} store (py-spy, {prof['samples']} samples, "
            f"{_f(prof['calls_per_s_under_profiler'], 0)} calls/s under the profiler)",
            "",
            "By package (own time): " + ", ".join(f"{p['function']} {p['percent']}%" for p in prof["by_package"]),
            "",
        ]
        own = prof["top_own"][:15]
        incl = prof["top_inclusive"][:15]
        rows = [
            [
                own[i]["function"] if i < len(own) else "",
                f"{own[i]['percent']}%" if i < len(own) else "",
                incl[i]["function"] if i < len(incl) else "",
                f"{incl[i]['percent']}%" if i < len(incl) else "",
            ]
            for i in range(max(len(own), len(incl)))
        ]
        lines += _table(["own time", "%", "including callees", "%"], rows)
        lines.append("")

    problems = results.get("problems", [])
    errors = results.get("errors", [])
    lines += ["## Server log and run problems", ""]
    if not problems and not errors:
        lines.append("No warnings, errors or tracebacks in any server log; every server exited with status 0.")
    for p in problems:
        lines.append(
            f"- {p['run']}: exit {p.get('returncode')}, tracebacks {p.get('tracebacks', 0)}, "
            + ", ".join(f"{k} x{n}" for k, n in p.get("problems", {}).items())
        )
        for sample in p.get("samples", [])[:3]:
            lines.append(f"  - `{sample[:300]}`")
    for e in errors:
        lines.append(f"- scenario {e['scenario']} failed: {e['error']}")
    lines.append("")
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def write(results: dict[str, Any], samples: dict[str, list[float]], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(results))
    written.append(md_path)
    results = {**results, "latency_histograms_ms": {k: _histogram(v) for k, v in samples.items() if v}}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    written.append(json_path)
    png = plot(samples, out_dir / f"{stem}.png")
    if png is not None:
        written.append(png)
    return written


def _histogram(values: list[float]) -> dict[str, Any]:
    """Counts in log-spaced bins (10 per decade) of milliseconds."""
    counts: dict[str, int] = {}
    for v in values:
        ms = max(v * 1000, 1e-3)
        edge = 10 ** (math.floor(math.log10(ms) * 10) / 10)
        key = f"{edge:.4g}"
        counts[key] = counts.get(key, 0) + 1
    return {"bins_ms_lower_edge": counts, "n": len(values)}


def plot(samples: dict[str, list[float]], path: Path) -> Path | None:
    """CDFs of call-setup latency (saturation, unloaded) and wake-to-bridge, log x; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = [
        (
            "Call setup at saturation",
            [k for k in samples if not k.endswith("(unloaded)") and "/" in k and "wake" not in k],
        ),
        ("Call setup, one pair (unloaded)", [k for k in samples if k.endswith("(unloaded)")]),
        ("Wake-to-bridge (server) and push send", [k for k in samples if k.startswith(("wake", "push"))]),
    ]
    groups = [(title, keys) for title, keys in groups if keys]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups, strict=True):
        for key in keys:
            values = sorted(v * 1000 for v in samples[key])
            if not values:
                continue
            n = len(values)
            ys = [(i + 1) / n for i in range(n)]
            p50 = common.percentile(values, 50)
            p99 = common.percentile(values, 99)
            ax.plot(values, ys, label=f"{key} (p50 {p50:.2f}, p99 {p99:.2f} ms)", linewidth=1.4)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of calls ≤ x")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
