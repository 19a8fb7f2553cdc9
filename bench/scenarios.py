"""The scenarios, run from the parent process: each starts what it measures, drives load processes, and returns
a dict of figures (and keeps raw latency lists in `Context.samples` for the plot)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common, procs
from bench.worker import Worker

# Frames through the server per complete call. SIP-lite: in INVITE, 180, 200, ACK, BYE; out 100, INVITE, 180,
# 200, ACK, 200 (BYE), BYE. Relay: six relayed frames (INVITE, 180, 200, ACK, BYE, 200), each in and out.
FRAMES_PER_CALL = 12


@dataclass
class Context:
    quick: bool
    workdir: Path
    redis: procs.Redis | None
    server_cpus: set[int] | None
    load_cpus: set[int] | None
    progress: common.Progress
    pairs: int = 64
    calls: int = 0  # calls per call-setup run; calibrated by the first run
    samples: dict[str, list[float]] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)
    pyspy: bool = True

    @property
    def load_cpu_list(self) -> list[int] | None:
        return sorted(self.load_cpus) if self.load_cpus else None

    @property
    def server_cpu_list(self) -> list[int] | None:
        return sorted(self.server_cpus) if self.server_cpus else None

    def log_path(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        return self.workdir / f"{safe}.log"

    def note_problems(self, name: str, server: procs.Server) -> dict[str, Any]:
        report = server.log_report()
        if report["problems"] or report["tracebacks"] or report["returncode"] not in (0, None):
            self.problems.append({"run": name, **{k: v for k, v in report.items() if k != "events"}})
        return report


def _redis_url(ctx: Context, store: str) -> str | None:
    if store != "redis":
        return None
    if ctx.redis is None:
        raise RuntimeError("no redis-server")
    ctx.redis.reset()
    return ctx.redis.url


@contextlib.contextmanager
def _server(
    ctx: Context,
    name: str,
    *,
    store: str,
    relay: bool = False,
    uvloop: bool = False,
    no_hiredis: bool = False,
    pure_msgpack: bool = False,
    timings: Path | None = None,
    gc_log: bool = False,
    pyspy_output: Path | None = None,
    cprofile: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[procs.Server]:
    redis_url = _redis_url(ctx, store)
    if relay:
        server = procs.Server(
            name,
            procs.relay_command(redis_url, uvloop=uvloop),
            procs.clean_env(),
            ctx.log_path(name),
            ctx.server_cpus,
            ready_event="relay.listening",
        )
    else:
        # The server picks its loop by SIPLITE_EVENT_LOOP (uvloop by default): the baseline runs on the standard
        # library's loop, as the relay does, and the uvloop switch compares with a relay on uvloop.
        env = {"SIPLITE_EVENT_LOOP": "uvloop" if uvloop else "asyncio", **(env or {})}
        command = procs.siplite_command(
            no_hiredis=no_hiredis,
            pure_msgpack=pure_msgpack,
            timings=timings,
            gc_log=gc_log,
            cprofile=cprofile,
        )
        server = procs.Server(
            name,
            command,
            procs.siplite_env(redis_url, **(env or {})),
            ctx.log_path(name),
            ctx.server_cpus,
            pyspy_output=pyspy_output,
        )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _wrapper_setup(server: procs.Server) -> dict[str, Any]:
    for event in server.events():
        if event.get("event") == "bench.wrapper":
            return {k: event[k] for k in ("uvloop", "hiredis", "msgpack_c") if k in event}
    return {}


# --- call setup --------------------------------------------------------------------------------------------------


def _run_phase(
    ctx: Context, worker: Worker, label: str, quota: int, seconds: float, active: int
) -> dict[str, Any]:
    def show() -> None:
        done = worker.progress
        ctx.progress.update(f"{label}: {done:,}/{quota:,} calls")

    worker.counter.value = 0
    message = worker.request(("phase", quota, seconds, active), seconds + 60.0, show)
    stats: dict[str, Any] = message[1]
    return stats


def callsetup(
    ctx: Context,
    name: str,
    *,
    store: str,
    relay: bool = False,
    uvloop: bool = False,
    no_hiredis: bool = False,
    pure_msgpack: bool = False,
    pyspy_output: Path | None = None,
    cprofile: Path | None = None,
    pairs: int | None = None,
) -> dict[str, Any]:
    """Complete calls between online devices at saturation (`pairs` pairs, each one call at a time), then
    the same at concurrency 1 for unloaded latency."""
    pairs = pairs or ctx.pairs
    warm_seconds = 1.0 if ctx.quick else 2.0
    target_seconds = 3.0 if ctx.quick else 10.0
    with _server(
        ctx,
        name,
        store=store,
        relay=relay,
        uvloop=uvloop,
        no_hiredis=no_hiredis,
        pure_msgpack=pure_msgpack,
        pyspy_output=pyspy_output,
        cprofile=cprofile,
    ) as server:
        redis_pid = ctx.redis.pid if ctx.redis is not None and store == "redis" else None
        worker = Worker(
            "callsetup",
            {
                "host": "127.0.0.1",
                "port": server.port,
                "relay": relay,
                "pairs": pairs,
                # Letters, digits and '-' only: the relay takes the name from a query string.
                "prefix": "".join(c if c.isalnum() else "-" for c in name) + "-",
                "server_pid": server.pid,
                "redis_pid": redis_pid,
                "server_cpus": ctx.server_cpu_list,
                "load_cpus": ctx.load_cpu_list,
            },
            cpu_set=ctx.load_cpus,
            name=name,
        )
        try:
            worker.recv(90.0, lambda: ctx.progress.update(f"{name}: connecting {pairs} pairs"))
            warm = _run_phase(ctx, worker, f"{name} warm-up", 10**7, warm_seconds, pairs)
            if not warm["completed"]:
                raise RuntimeError(f"no call completed in the warm-up: {warm['failures'] or 'no answer'}")
            if not ctx.calls:
                if relay or not warm["completed"]:
                    ctx.calls = 5000 if ctx.quick else 20000
                else:
                    # Calibrated on SIP-lite's own rate, so that its runs last about `target_seconds`.
                    rate = warm["completed"] / max(warm["elapsed"], 1e-6)
                    step = 1000 if rate * target_seconds > 10000 else 100
                    ctx.calls = max(1000, round(rate * target_seconds / step) * step)
            measured = _run_phase(ctx, worker, name, ctx.calls, 120.0 if not ctx.quick else 40.0, pairs)
            unloaded_n = 200 if ctx.quick else 500
            unloaded = _run_phase(ctx, worker, f"{name} unloaded", unloaded_n, 20.0, 1)
        finally:
            worker.stop()
        wrapper = _wrapper_setup(server)
    log = ctx.note_problems(name, server)
    setup = measured.pop("setup")
    total = measured.pop("total")
    ctx.samples[name] = setup
    ctx.samples[f"{name} (unloaded)"] = unloaded.pop("setup")
    elapsed = measured["elapsed"]
    completed = measured["completed"]
    rate = completed / elapsed if elapsed > 0 else 0.0
    result: dict[str, Any] = {
        "name": name,
        "target": "relay" if relay else "siplite",
        "store": store,
        "variant": _variant(uvloop, no_hiredis, pure_msgpack),
        "server_setup": wrapper,
        "pairs": pairs,
        "calls_requested": ctx.calls,
        "calls": completed,
        "frames": completed * FRAMES_PER_CALL,
        "failures": measured["failures"],
        "stuck_pairs": measured["stuck_pairs"],
        "elapsed_s": round(elapsed, 3),
        "calls_per_s": round(rate, 1),
        "frames_per_s": round(rate * FRAMES_PER_CALL, 1),
        "server_cpu_s": round(measured["server_cpu"], 3),
        "server_cpu_us_per_call": round(measured["server_cpu"] / completed * 1e6, 1) if completed else None,
        "server_process_util": round(measured["server_cpu"] / measured["wall"], 3),
        "server_core_busy": _round(measured["server_core_busy"]),
        "load_process_util": round(measured["load_cpu"] / measured["wall"], 3),
        "load_cores_busy": _round(measured["load_cores_busy"]),
        "redis_cpu_us_per_call": (
            round(measured["redis_cpu"] / completed * 1e6, 1) if measured["redis_cpu"] and completed else None
        ),
        "setup_latency": common.summary_ms(setup),
        "call_latency": common.summary_ms(total),
        "unloaded_setup_latency": common.summary_ms(ctx.samples[f"{name} (unloaded)"]),
        "warmup_calls": warm["completed"],
        "server_log_events": {k: v for k, v in log["events"].items() if k.startswith(("call.", "presence."))},
        "server_log_problems": log["problems"],
        "server_exit": log["returncode"],
    }
    return result


def _variant(uvloop: bool, no_hiredis: bool, pure_msgpack: bool) -> str:
    parts = [n for n, on in (("uvloop", uvloop), ("no-hiredis", no_hiredis), ("pure-msgpack", pure_msgpack)) if on]
    return "+".join(parts) or "baseline"


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- idle capacity -----------------------------------------------------------------------------------------------


def idle(ctx: Context, store: str, levels: list[int | None]) -> dict[str, Any]:
    """Registered, keepalive-refreshing connections in one server process. A level of None means as many as the
    server's open-files limit allows (hard limit minus the files it already has open, minus a margin)."""
    presence_ttl = 12.0 if ctx.quick else 30.0
    interval = presence_ttl / 3  # as signaling.client does: expires / 3
    window = interval
    name = f"idle/{store}"
    workers_n = 4
    results: list[dict[str, Any]] = []
    env = {"SIPLITE_PRESENCE_TTL": str(presence_ttl)}
    with _server(ctx, name, store=store, env=env, gc_log=True) as server:
        soft, hard = common.nofile_limit(server.pid)
        workers = [
            Worker(
                "idle",
                {"host": "127.0.0.1", "port": server.port, "prefix": f"idle{w}-", "interval": interval},
                cpu_set=ctx.load_cpus,
                name=f"{name}-{w}",
            )
            for w in range(workers_n)
        ]
        try:
            for w in workers:
                w.recv(60.0)
            # A few connections first, so that the baseline RSS has the per-connection code paths warmed up.
            _grow(ctx, workers, 8 * workers_n, f"{name} warm-up")
            time.sleep(1.0)
            base_rss = server.rss()
            base_fds = common.open_fds(server.pid)
            base_conns = _snapshot(workers)["open"]
            redis_mem0 = _redis_memory(ctx, store)
            for level in levels:
                target = level if level is not None else soft - base_fds + base_conns - 48
                ctx.progress.update(f"{name}: opening {target:,} connections", force=True)
                grow_started = time.monotonic()
                grown = _grow(ctx, workers, target, f"{name} -> {target:,}")
                grow_seconds = time.monotonic() - grow_started
                time.sleep(1.0 if ctx.quick else 2.0)
                snap = _snapshot(workers)
                conns = snap["open"]
                rss = server.rss()
                fds = common.open_fds(server.pid)
                # A window of one keepalive interval: every connection sends one keepalive, one sweep runs.
                measured = _cpu_window(ctx, server, workers, window, f"{name} @ {conns:,}: keepalive window")
                entry: dict[str, Any] = {
                    "level": "max" if level is None else level,
                    "target": target,
                    "registered": conns,
                    "failed": grown["error_count"],
                    "errors": grown["errors"],
                    "ramp_s": round(grow_seconds, 1),
                    "server_fds": fds,
                    "nofile_soft": soft,
                    "nofile_hard": hard,
                    "rss_mib": round(rss / 2**20, 1),
                    "rss_baseline_mib": round(base_rss / 2**20, 1),
                    "rss_per_conn_kib": round((rss - base_rss) / max(1, conns - base_conns) / 1024, 2),
                    **measured,
                }
                redis_mem = _redis_memory(ctx, store)
                if redis_mem is not None and redis_mem0 is not None:
                    entry["redis_bytes_per_registration"] = round((redis_mem - redis_mem0) / max(1, conns), 1)
                if level is None or level == levels[-1]:
                    # Keepalives paused (a third of presence_ttl, well inside it): heartbeat pings, timers, sweeps.
                    for w in workers:
                        w.request(("pause", True), 30.0)
                    quiet = _cpu_window(ctx, server, workers, window, f"{name} @ {conns:,}: keepalives paused")
                    for w in workers:
                        w.request(("pause", False), 30.0)
                    entry["paused_server_cpu_util"] = quiet["server_cpu_util"]
                    entry["paused_keepalives"] = quiet["keepalives"]
                    per = entry["keepalives"] or 1
                    # Both windows without their full garbage collections (reported apart).
                    busy = measured["server_cpu_s"] - measured["full_gc_ms"] / 1000
                    idle_cpu = quiet["server_cpu_s"] - quiet["full_gc_ms"] / 1000
                    entry["marginal_cpu_us_per_keepalive"] = round((busy - idle_cpu) / per * 1e6, 1)
                    entry["paused_full_gc_ms"] = quiet["full_gc_ms"]
                entry["close_codes"] = _snapshot(workers)["close_codes"]
                full = [
                    float(e["duration_ms"])
                    for e in server.events()
                    if e.get("event") == "bench.gc" and e.get("generation") == 2
                ]
                entry["full_gc_since_start"] = len(full)
                entry["full_gc_max_ms_since_start"] = round(max(full, default=0.0), 1)
                results.append(entry)
        finally:
            # Stop the server first: it closes every socket (1001), so the load needs no close handshakes.
            server.stop(60.0)
            for w in workers:
                w.stop(30.0)
    log = ctx.note_problems(name, server)
    return {
        "store": store,
        "presence_ttl_s": presence_ttl,
        "keepalive_interval_s": interval,
        "load_processes": workers_n,
        "levels": results,
        "server_log_problems": log["problems"],
        "server_exit": log["returncode"],
    }


def _grow(ctx: Context, workers: list[Worker], total: int, label: str) -> dict[str, Any]:
    share = [total // len(workers) + (1 if i < total % len(workers) else 0) for i in range(len(workers))]
    # 16 handshakes + REGISTERs in flight per load process, 64 in all: fewer than redis-py's default pool of 100
    # connections, which the Redis store exhausts otherwise (REGISTER then fails with 503 store_unavailable).
    for w, n in zip(workers, share, strict=True):
        w.send(("grow", n, 16, 150.0))

    def show() -> None:
        ctx.progress.update(f"{label}: {sum(w.progress for w in workers):,} registered")

    merged: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for w in workers:
        snap = w.recv(200.0, show)[1]
        merged.update({k: v for k, v in snap.items() if isinstance(v, int)})
        errors.update(snap["errors"])
    return {**merged, "errors": dict(errors.most_common(5)), "error_count": merged["error_count"]}


def _snapshot(workers: list[Worker]) -> dict[str, Any]:
    total: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for w in workers:
        snap = w.request(("stats",), 30.0)[1]
        total.update({k: v for k, v in snap.items() if isinstance(v, int)})
        codes.update(snap["close_codes"])
    return {**total, "close_codes": dict(codes)}


def _cpu_window(
    ctx: Context, server: procs.Server, workers: list[Worker], seconds: float, label: str
) -> dict[str, Any]:
    before = _snapshot(workers)
    cpu0 = server.cpu()
    redis0 = _redis_stats(ctx)
    t0 = time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 0:
        ctx.progress.update(f"{label} ({left:4.1f}s left)")
        time.sleep(min(0.25, left))
    t1 = time.monotonic()
    wall = t1 - t0
    cpu = server.cpu() - cpu0
    after = _snapshot(workers)
    keepalives = after.get("keepalive_ok", 0) - before.get("keepalive_ok", 0)
    out: dict[str, Any] = {
        "window_s": round(wall, 2),
        "keepalives": keepalives,
        "keepalives_per_s": round(keepalives / wall, 1),
        "keepalives_refused": after.get("keepalive_refused", 0) - before.get("keepalive_refused", 0),
        "server_cpu_s": round(cpu, 4),
        "server_cpu_util": round(cpu / wall, 4),
        "cpu_us_per_keepalive": round(cpu / keepalives * 1e6, 1) if keepalives else None,
    }
    # Full (generation 2) collections inside the window: with tens of thousands of connections each is long.
    gcs = [
        float(e["duration_ms"])
        for e in server.events()
        if e.get("event") == "bench.gc" and e.get("generation") == 2 and t0 <= float(e.get("monotonic", 0)) <= t1
    ]
    out["full_gc_runs"] = len(gcs)
    out["full_gc_ms"] = round(sum(gcs), 1)
    if keepalives:
        out["cpu_us_per_keepalive_excl_gc"] = round((cpu - sum(gcs) / 1000) / keepalives * 1e6, 1)
    redis1 = _redis_stats(ctx)
    if redis0 is not None and redis1 is not None:
        # Minus the INFO that took the second reading.
        out["redis_commands"] = redis1[1] - redis0[1] - 1
        out["redis_reads"] = redis1[0] - redis0[0] - 1
    return out


def _redis_stats(ctx: Context) -> tuple[int, int] | None:
    if ctx.redis is None:
        return None
    stats = ctx.redis.info("stats")
    return int(stats["total_reads_processed"]), int(stats["total_commands_processed"])


def _redis_memory(ctx: Context, store: str) -> int | None:
    if store != "redis" or ctx.redis is None:
        return None
    return int(ctx.redis.info("memory")["used_memory"])


# --- wake-to-bridge ----------------------------------------------------------------------------------------------


def wake(ctx: Context, store: str) -> dict[str, Any]:
    """Held calls to sleeping devices (pushed through the development provider), woken one at a time."""
    name = f"wake/{store}"
    calls = 50 if ctx.quick else 300
    timings_file = ctx.workdir / f"wake-{store}-timings.json"
    with _server(ctx, name, store=store, timings=timings_file) as server:
        worker = Worker(
            "wake",
            {"host": "127.0.0.1", "port": server.port, "prefix": f"wake{store}-", "calls": calls, "seconds": 60.0},
            cpu_set=ctx.load_cpus,
            name=name,
        )
        try:
            message = worker.recv(120.0, lambda: ctx.progress.update(f"{name}: {worker.progress}/{calls} calls"))
        finally:
            worker.stop()
    results: dict[str, Any] = message[1]
    log = ctx.note_problems(name, server)
    server_side: dict[str, list[float]] = {}
    with contextlib.suppress(OSError, ValueError):
        import json

        server_side = json.loads(timings_file.read_text())
    push_to_connect = [
        float(e["push_to_connect_ms"]) / 1000
        for e in server.events()
        if e.get("event") == "call.device_connected" and e.get("push_to_connect_ms") is not None
    ]
    ctx.samples[f"{name} server REGISTER->INVITE"] = server_side.get("register_to_invite", [])
    return {
        "store": store,
        "calls": calls,
        "failures": results["failures"],
        "server_register_to_invite": common.summary_ms(server_side.get("register_to_invite", [])),
        "server_register_to_ok": common.summary_ms(server_side.get("register_to_ok", [])),
        "client_register_to_invite": common.summary_ms(results["register_to_invite"]),
        "client_register_to_ok": common.summary_ms(results["register_to_ok"]),
        "client_invite_to_push_sent": common.summary_ms(results["invite_to_push_sent"]),
        "log_push_to_connect": common.summary_ms(push_to_connect),
        "server_log_problems": log["problems"],
        "server_exit": log["returncode"],
    }


# --- push send latency -------------------------------------------------------------------------------------------


def push(ctx: Context) -> dict[str, Any]:
    """ApnsProvider.send_incoming_call in this process against the APNs stand-in in a load process."""
    sequential = 100 if ctx.quick else 500
    burst = 1000 if ctx.quick else 5000
    concurrency = 100
    with tempfile.TemporaryDirectory(prefix="bench-apns-") as tmp:
        from tests.apns_server import make_pki

        pki = make_pki(Path(tmp))
        stand_in = Worker("apns_stand_in", {"pki": pki}, cpu_set=ctx.load_cpus, name="apns")
        try:
            _, port = stand_in.recv(60.0)
            # The provider side runs on the server CPU, as it would inside the server.
            own = common.cpus()
            common.pin(_self_pid(), ctx.server_cpus)
            try:
                result = asyncio.run(_push_run(ctx, pki, port, sequential, burst, concurrency))
            finally:
                common.pin(_self_pid(), set(own) - (ctx.server_cpus or set()) or set(own))
            stand_in.send(("stats",))
            _, stats = stand_in.recv(30.0)
        finally:
            stand_in.stop()
    result["stand_in"] = stats
    return result


def _self_pid() -> int:
    import os

    return os.getpid()


async def _push_run(
    ctx: Context, pki: Any, port: int, sequential: int, burst: int, concurrency: int
) -> dict[str, Any]:
    from push.apns import ApnsConfig, ApnsProvider
    from push.base import IncomingCallPush, Outcome
    from signaling import log
    from signaling.models import PushEnvironment

    # The provider logs every push at info, as in the server: rendered (that costs CPU) into a file.
    log_file = ctx.log_path("push").open("w")
    log.configure("info", "json", stream=log_file, cache=False)

    config = ApnsConfig(
        key_file=pki.signing_key,
        key_id=pki.key_id,
        team_id=pki.team_id,
        production_host="127.0.0.1",
        production_port=port,
        sandbox_host="127.0.0.1",
        sandbox_port=port,
        ca_file=pki.ca_file,
        request_timeout=5.0,
        keepalive_interval=None,
    )
    provider = ApnsProvider(config)
    await provider.start()
    counter = [0]

    def make() -> IncomingCallPush:
        counter[0] += 1
        now = time.time()
        return IncomingCallPush(
            token=f"{counter[0]:064x}",
            bundle_id="com.example.bench",
            environment=PushEnvironment.SANDBOX,
            call_id=f"bench-call-{counter[0]}",
            caller_id="alice",
            caller_name="Alice Example",
            video=False,
            sent_at=now,
            deadline=now + 60.0,
        )

    outcomes: Counter[str] = Counter()

    async def one() -> float:
        t0 = time.perf_counter()
        result = await provider.send_incoming_call(make())
        outcomes[result.outcome.value] += 1
        return time.perf_counter() - t0

    try:
        cold = await one()
        seq: list[float] = []
        for i in range(sequential):
            seq.append(await one())
            if i % 50 == 0:
                ctx.progress.update(f"push: sequential {i}/{sequential}")
        sem = asyncio.Semaphore(concurrency)
        loaded: list[float] = []

        async def limited() -> None:
            async with sem:
                loaded.append(await one())
                if len(loaded) % 250 == 0:
                    ctx.progress.update(f"push: burst {len(loaded)}/{burst}")

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(limited() for _ in range(burst))), 120.0)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await provider.close()
        log.configure("warning", "json", cache=False)
        log_file.close()
    warnings = sum(
        1
        for line in ctx.log_path("push").read_text().splitlines()
        if '"level": "warning"' in line or "error" in line
    )
    ctx.samples["push sequential"] = seq
    return {
        "cold_first_push_ms": round(cold * 1000, 3),
        "sequential": common.summary_ms(seq),
        "burst": {
            "pushes": burst,
            "concurrency": concurrency,
            "elapsed_s": round(elapsed, 3),
            "pushes_per_s": round(burst / elapsed, 1),
            "provider_cpu_us_per_push": round(cpu / burst * 1e6, 1),
            **common.summary_ms(loaded),
        },
        "outcomes": dict(outcomes),
        "delivered_all": outcomes.get(Outcome.DELIVERED.value, 0) == 1 + sequential + burst,
        "provider_log_warnings": warnings,
    }


# --- Redis cost --------------------------------------------------------------------------------------------------


def redis_cost(ctx: Context) -> dict[str, Any]:
    name = "redis-cost"
    pairs = 20 if ctx.quick else 50
    calls = 100 if ctx.quick else 300
    assert ctx.redis is not None
    # A long presence TTL keeps the periodic presence sweep out of the measured phases.
    with _server(ctx, name, store="redis", env={"SIPLITE_PRESENCE_TTL": "3600"}) as server:
        worker = Worker(
            "redis_cost",
            {
                "host": "127.0.0.1",
                "port": server.port,
                "redis_url": ctx.redis.url,
                "prefix": "rc-",
                "pairs": pairs,
                "calls": calls,
            },
            cpu_set=ctx.load_cpus,
            name=name,
        )
        try:
            ctx.progress.update(f"{name}: registrations, {calls} calls, keepalives, closes", force=True)
            _, phases = worker.recv(180.0, lambda: ctx.progress.update(f"{name}: running"))
        finally:
            worker.stop()
    ctx.note_problems(name, server)
    empty = phases.pop("empty")
    phases.pop("warm", None)
    out: dict[str, Any] = {"method": _REDIS_METHOD, "overhead_per_phase": empty}
    for phase, data in phases.items():
        ops = data["ops"] or 1
        monitor: dict[str, int] = data.get("monitor", {})
        top = {k.split(":", 1)[1]: v for k, v in monitor.items() if k.startswith("top:")}
        script = {k.split(":", 1)[1]: v for k, v in monitor.items() if k.startswith("script:")}
        for bench_own in ("INFO", "ECHO"):
            top.pop(bench_own, None)
        # A client opening another pooled connection sends HELLO once, in a read of its own: connection set-up,
        # not a round trip of the operations (shown on its own).
        handshakes = top.get("HELLO", 0)
        out[phase] = {
            "ops": data["ops"],
            "round_trips_per_op": round((data["reads"] - empty["reads"] - handshakes) / ops, 3),
            "connection_setups_per_op": round(handshakes / ops, 3),
            "commands_per_op": round((data["commands"] - empty["commands"]) / ops, 3),
            "top_level_commands_per_op": round(sum(top.values()) / ops, 3),
            "script_commands_per_op": round(sum(script.values()) / ops, 3),
            "top_level": {k: round(v / ops, 3) for k, v in sorted(top.items())},
            "in_scripts": {k: round(v / ops, 3) for k, v in sorted(script.items())},
        }
    return out


_REDIS_METHOD = (
    "Each phase runs its operations one at a time against a server on its own redis-server. Round trips: the "
    "increase of INFO stats total_reads_processed (Redis reads each request or pipelined batch a client sends in "
    "one read), minus this benchmark's own INFO/ECHO reads (measured on an empty phase) and the HELLO of each "
    "connection the server opened during the phase (connection set-up, not a round trip of the operations). "
    "Commands: the increase "
    "of total_commands_processed, which counts the commands Lua scripts run as well. MONITOR splits them into "
    "commands the server sent (top level) and commands run inside scripts."
)


# --- profile -----------------------------------------------------------------------------------------------------


def profile(ctx: Context, store: str) -> dict[str, Any]:
    """py-spy (sampling, 200 Hz) on the server through a call-setup run, or cProfile (bench.serve --cprofile)
    without py-spy; top functions by own time and by time including callees, and own time by package."""
    import shutil

    name = f"profile/{store}"
    use_pyspy = bool(shutil.which("py-spy", path=str(common.VENV_BIN)) or shutil.which("py-spy"))
    raw = ctx.workdir / f"profile-{store}.{'txt' if use_pyspy else 'pstats'}"
    if use_pyspy:
        result = callsetup(ctx, name, store=store, pyspy_output=raw)
    else:
        result = callsetup(ctx, name, store=store, cprofile=raw)
    ctx.samples.pop(name, None)
    ctx.samples.pop(f"{name} (unloaded)", None)
    deadline = time.monotonic() + 15
    while not raw.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    summary = _summarise_stacks(_read_raw(raw)) if use_pyspy else _summarise_pstats(raw)
    return {
        "store": store,
        "profiler": "py-spy" if use_pyspy else "cProfile",
        "calls_per_s_under_profiler": result["calls_per_s"],
        **summary,
    }


def _summarise_pstats(path: Path, top: int = 25) -> dict[str, Any]:
    import pstats

    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1.0
    own: dict[str, float] = {}
    cumulative: dict[str, float] = {}
    packages: dict[str, float] = {}
    for (file, _, func), (_, _, tottime, cumtime, _) in stats.items():
        short = file.split("site-packages/")[-1].split("/lib/python3.11/")[-1].removeprefix(str(common.REPO) + "/")
        key = f"{func} ({short})"
        own[key] = own.get(key, 0.0) + tottime
        cumulative[key] = max(cumulative.get(key, 0.0), cumtime)
        package = _package(short)
        packages[package] = packages.get(package, 0.0) + tottime

    def pct(values: dict[str, float], n: int) -> list[dict[str, Any]]:
        ranked = sorted(values.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [{"function": k, "percent": round(v / total * 100, 1)} for k, v in ranked]

    return {
        "samples": len(stats),
        "top_own": pct(own, top),
        "top_inclusive": pct(cumulative, top),
        "by_package": pct(packages, 15),
    }


def _read_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks.append((stack.split(";"), int(count)))
    return stacks


def _frame_name(frame: str) -> tuple[str, str]:
    """('function (file)', 'package') from a py-spy frame 'function (path/file.py:line)'."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{func} ({path})", _package(path)


def _package(path: str) -> str:
    if path.startswith("<frozen "):
        return path.removeprefix("<frozen ").split(".")[0].rstrip(">")
    if path == "<string>":
        return "<string> (generated dataclass methods)"
    return path.split("/", 1)[0].removesuffix(".py") or "?"


def _is_startup(frames: list[str]) -> bool:
    return any(f.startswith("_find_and_load ") for f in frames)


def _summarise_stacks(stacks: list[tuple[list[str], int]], top: int = 25) -> dict[str, Any]:
    """Own time by leaf function, time including callees, own time by package; imports (start-up, lazy imports)
    are left out."""
    kept = [(frames, count) for frames, count in stacks if any(frames) and not _is_startup(frames)]
    total = sum(count for _, count in kept) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, count in kept:
        names = [_frame_name(f) for f in frames if f]
        leaf, package = names[-1]
        own[leaf] += count
        packages[package] += count
        for func in {n for n, _ in names}:
            inclusive[func] += count

    def pct(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [{"function": k, "percent": round(v / total * 100, 1)} for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "startup_samples_excluded": sum(c for f, c in stacks if _is_startup(f)),
        "top_own": pct(own, top),
        "top_inclusive": pct(inclusive, top),
        "by_package": pct(packages, 15),
    }


# --- helpers for the report --------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 3)


def spread(values: list[float]) -> float | None:
    """Relative spread (max-min)/mean of repeated measurements."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return round((max(values) - min(values)) / mean, 3) if mean else None


def finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)


Fn = Callable[..., dict[str, Any]]
