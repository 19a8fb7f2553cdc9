"""`python -m bench`: run every scenario, print the Markdown table, write bench/results/."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from bench import common, procs, report, scenarios

SCENARIOS = ("callsetup", "switches", "redis", "wake", "push", "idle", "profile")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="SIP-lite benchmarks (issue 5).")
    parser.add_argument(
        "--quick", action="store_true", help="a short run (about a minute): smaller counts, no switches/profile"
    )
    parser.add_argument(
        "--only", help=f"comma-separated scenarios to run, from: {','.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--skip", help="comma-separated scenarios to leave out")
    parser.add_argument("--pairs", type=int, default=64, help="caller/callee pairs in call setup (default 64)")
    parser.add_argument("--calls", type=int, default=0, help="calls per call-setup run (default: calibrated)")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="cap of the idle test's 'max' level (default: the server's open-files limit allows)",
    )
    parser.add_argument("--output", type=Path, default=common.REPO / "bench" / "results", help="results folder")
    parser.add_argument("--keep-logs", action="store_true", help="copy the server logs into the results folder")
    args = parser.parse_args(argv)
    chosen = set(SCENARIOS)
    if args.only:
        chosen = {s.strip() for s in args.only.split(",") if s.strip()}
    if args.skip:
        chosen -= {s.strip() for s in args.skip.split(",")}
    unknown = chosen - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.quick and not args.only:
        chosen -= {"switches", "profile"}
    args.scenarios = chosen
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _background_busy() -> float | None:
    before = common.cpu_ticks()
    time.sleep(1.0)
    return common.busy_fraction(before, common.cpu_ticks(), common.cpus())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    common.raise_nofile()
    server_cpus, load_cpus = common.cpu_plan()
    if load_cpus is not None:
        common.pin(os.getpid(), load_cpus)
    progress = common.Progress()
    started = dt.datetime.now(dt.UTC)
    command = "python -m bench" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    results: dict[str, Any] = {
        "command": command,
        "quick": args.quick,
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": common.machine(),
        "versions": common.versions(),
        "pinning": {
            "server_cpus": sorted(server_cpus) if server_cpus else None,
            "load_cpus": sorted(load_cpus) if load_cpus else None,
        },
        "scenarios": sorted(args.scenarios),
        "errors": [],
    }
    busy = _background_busy()
    results["background"] = {"busy_before_start": busy, "loadavg": os.getloadavg()}
    if busy is not None and busy > 0.15:
        warning = (
            f"the machine was {busy * 100:.0f}% busy before the benchmark started (other processes); "
            "figures may be low and noisy"
        )
        results["background"]["warning"] = warning
        progress.done("warning: " + warning)

    with tempfile.TemporaryDirectory(prefix="siplite-bench-") as tmp:
        workdir = Path(tmp)
        redis: procs.Redis | None = None
        ctx = scenarios.Context(
            quick=args.quick,
            workdir=workdir,
            redis=None,
            server_cpus=server_cpus,
            load_cpus=load_cpus,
            progress=progress,
            pairs=args.pairs,
            calls=args.calls,
        )
        try:
            if args.scenarios - {"push"}:
                redis = procs.Redis(load_cpus)
                ctx.redis = redis
                results["redis_server"] = redis.version()
            _run_all(ctx, args, results)
        except KeyboardInterrupt:
            results["errors"].append({"scenario": "-", "error": "interrupted"})
            progress.done("interrupted: writing what was measured")
        finally:
            if redis is not None:
                redis.stop()
            results["problems"] = ctx.problems
            if args.keep_logs:
                logs = args.output / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    (logs / log.name).write_bytes(log.read_bytes())
        results["duration_s"] = round(time.monotonic() - progress.started, 1)
        results["targets"] = _targets(results)
        stem = f"bench-{started.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}"
        written = report.write(results, ctx.samples, args.output, stem)
    print(report.markdown(results))
    progress.done(
        "wrote "
        + ", ".join(str(p.relative_to(common.REPO)) if p.is_relative_to(common.REPO) else str(p) for p in written)
    )
    return 1 if results["errors"] else 0


def _attempt(results: dict[str, Any], ctx: scenarios.Context, name: str, fn: Callable[[], Any]) -> Any:
    ctx.progress.done(f"{name} ...")
    try:
        value = fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        results["errors"].append({"scenario": name, "error": f"{type(exc).__name__}: {exc}"})
        ctx.progress.done(f"{name} FAILED: {type(exc).__name__}: {exc}")
        return None
    ctx.progress.done(f"{name} done")
    return value


def _run_all(ctx: scenarios.Context, args: argparse.Namespace, results: dict[str, Any]) -> None:
    chosen = args.scenarios
    runs: list[dict[str, Any]] = []
    results["callsetup"] = runs

    def run(name: str, **kwargs: Any) -> dict[str, Any] | None:
        result: dict[str, Any] | None = _attempt(
            results, ctx, name, lambda: scenarios.callsetup(ctx, name, **kwargs)
        )
        if result is not None:
            runs.append(result)
            _ratios(runs)
        return result

    if "callsetup" in chosen or "switches" in chosen:
        run("siplite/memory", store="memory")
        run("relay", store="memory", relay=True)
        run("relay+redis-get", store="redis", relay=True)
        run("siplite/redis", store="redis")
    if "switches" in chosen:
        import importlib.util

        have_uvloop = importlib.util.find_spec("uvloop") is not None
        if have_uvloop:
            run("relay+uvloop", store="memory", relay=True, uvloop=True)
            run("siplite/memory+uvloop", store="memory", uvloop=True)
        run("siplite/memory+pure-msgpack", store="memory", pure_msgpack=True)
        if have_uvloop:
            run("siplite/redis+uvloop", store="redis", uvloop=True)
        run("siplite/redis+no-hiredis", store="redis", no_hiredis=True)
        run("siplite/memory (repeat)", store="memory")
        run("siplite/redis (repeat)", store="redis")
        # More than 100 store operations in flight: past redis-py's default pool size.
        run("siplite/redis@128", store="redis", pairs=128)
        results["switches"] = _switches(runs)
    if "redis" in chosen:
        results["redis_cost"] = _attempt(results, ctx, "redis cost", lambda: scenarios.redis_cost(ctx))
    if "wake" in chosen:
        results["wake"] = [
            w
            for w in (
                _attempt(results, ctx, f"wake/{s}", partial(scenarios.wake, ctx, s)) for s in ("memory", "redis")
            )
            if w
        ]
    if "push" in chosen:
        results["push"] = _attempt(results, ctx, "push", lambda: scenarios.push(ctx))
    if "idle" in chosen:
        levels: list[int | None] = [2000] if ctx.quick else [10000, args.max_connections or None]
        results["idle"] = [
            i
            for i in (
                _attempt(results, ctx, f"idle/{s}", partial(scenarios.idle, ctx, s, levels))
                for s in ("memory", "redis")
            )
            if i
        ]
    if "profile" in chosen:
        results["profile"] = [
            p
            for p in (
                _attempt(results, ctx, f"profile/{s}", partial(scenarios.profile, ctx, s))
                for s in ("memory", "redis")
            )
            if p
        ]


def _ratios(runs: list[dict[str, Any]]) -> None:
    by_name = {r["name"]: r for r in runs}
    relay_get = by_name.get("relay+redis-get")
    for r in runs:
        if r["target"] == "siplite":
            # Like for like: a run on uvloop is compared with the relay on uvloop, when that ran.
            uv = "uvloop" in r.get("variant", "") and "relay+uvloop" in by_name
            relay = by_name.get("relay+uvloop" if uv else "relay")
            r["relay_baseline"] = relay["name"] if relay else None
            r["ratio_to_relay"] = scenarios.ratio(r["calls_per_s"], relay["calls_per_s"]) if relay else None
            r["ratio_to_relay_redis_get"] = (
                scenarios.ratio(r["calls_per_s"], relay_get["calls_per_s"]) if relay_get else None
            )
            if relay and r["server_cpu_us_per_call"] and relay["server_cpu_us_per_call"]:
                # Throughput per CPU-second of the server: the same comparison, immune to an unsaturated core.
                r["cpu_ratio_to_relay"] = round(relay["server_cpu_us_per_call"] / r["server_cpu_us_per_call"], 3)


def _switches(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in runs}
    out: list[dict[str, Any]] = []
    for store in ("memory", "redis"):
        base = by_name.get(f"siplite/{store}")
        repeat = by_name.get(f"siplite/{store} (repeat)")
        if base is None:
            continue
        noise = None
        if repeat is not None:
            noise = round(abs(repeat["calls_per_s"] - base["calls_per_s"]) / base["calls_per_s"], 3)
        for switch in ("uvloop", "pure-msgpack", "no-hiredis", "repeat"):
            run = by_name.get(f"siplite/{store}+{switch}") if switch != "repeat" else repeat
            if run is None:
                continue
            out.append(
                {
                    "store": store,
                    "switch": "baseline again" if switch == "repeat" else switch,
                    "calls_per_s": run["calls_per_s"],
                    "baseline_calls_per_s": base["calls_per_s"],
                    "throughput_change": round(run["calls_per_s"] / base["calls_per_s"] - 1, 4),
                    "cpu_per_call_change": (
                        round(run["server_cpu_us_per_call"] / base["server_cpu_us_per_call"] - 1, 4)
                        if run["server_cpu_us_per_call"] and base["server_cpu_us_per_call"]
                        else None
                    ),
                    "server_setup": run.get("server_setup"),
                    "noise": noise,
                }
            )
    return out


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    runs = {r["name"]: r for r in results.get("callsetup", [])}
    for store, goal in (("redis", 0.5), ("memory", 0.7)):
        for variant, loop in (("", "asyncio"), ("+uvloop", "uvloop")):
            run = runs.get(f"siplite/{store}{variant}")
            ratio = run.get("ratio_to_relay") if run else None
            if variant and run is None:
                continue
            relay = runs.get(run.get("relay_baseline") or "relay") if run else None
            out.append(
                {
                    "target": f"call setups/s, {store} store, >= {goal:.0%} of the relay's rate (same frames; "
                    f"both on {loop})",
                    "measured": "-"
                    if ratio is None or run is None or relay is None
                    else f"{ratio:.0%} ({run['calls_per_s']:,.0f} vs {relay['calls_per_s']:,.0f} calls/s; "
                    f"per server CPU-second {run.get('cpu_ratio_to_relay', 0):.0%})",
                    "met": None if ratio is None else ratio >= goal,
                }
            )
    cost = results.get("redis_cost") or {}
    call = cost.get("call")
    out.append(
        {
            "target": "<= 3 Redis round trips per call setup",
            "measured": "-"
            if not call
            else f"{call['round_trips_per_op']:.2f} (registration {cost['register']['round_trips_per_op']:.2f})",
            "met": None if not call else call["round_trips_per_op"] <= 3.0 + 1e-9,
        }
    )
    for entry in results.get("idle") or []:
        top = entry["levels"][-1]
        ok = top["registered"] >= 19000 and top["rss_per_conn_kib"] <= 20.0
        out.append(
            {
                "target": f">= 19,000 idle registered connections, one process, <= 20 KiB each ({entry['store']})",
                "measured": f"{top['registered']:,} at {top['rss_per_conn_kib']:.1f} KiB",
                "met": ok if top["level"] == "max" else None,
            }
        )
    for w in results.get("wake") or []:
        p99 = w["server_register_to_invite"].get("p99_ms")
        out.append(
            {
                "target": f"wake-to-bridge p99 < 5 ms, server side ({w['store']})",
                "measured": "-"
                if p99 is None
                else f"{p99:.2f} ms (client side {w['client_register_to_invite'].get('p99_ms', 0):.2f} ms)",
                "met": None if p99 is None else p99 < 5.0,
            }
        )
    return out
