"""Run the real server (`signaling.cli.main`) with benchmark switches (bench/ only):

    python -m bench.serve [--uvloop] [--no-hiredis] [--pure-msgpack] [--timings F] [--cprofile F] -- serve ...

--uvloop        install uvloop's event loop policy before `signaling.cli.main` calls asyncio.run()
--no-hiredis    make `import hiredis` fail, so redis-py falls back to its pure-Python parser and packer
--pure-msgpack  MSGPACK_PUREPYTHON=1: msgpack's pure-Python fallback instead of its C extension
--timings FILE  measure, inside the server, REGISTER arriving (Switchboard.receive entered) -> the held INVITE
                written (by Connection.flush, the write of the loop iteration that queued it), and -> the
                REGISTER's 200, for first REGISTERs that deliver a held call; written to FILE (JSON) at exit
--cprofile FILE profile the whole server with cProfile; pstats written to FILE at exit
--gc-log        log every cyclic garbage collection of generation 2 (and any taking over 20 ms) as a JSON
                line (`bench.gc`: generation, duration_ms, collected) on stderr

It logs what it set up as one JSON line (`bench.wrapper`) on stderr before the server starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _instrument(timings: dict[str, list[float]]) -> None:
    from signaling import server as srv
    from signaling import wire

    receive = srv.Switchboard.receive
    on_register = srv.Switchboard._on_register
    send = srv.Connection.send
    flush = srv.Connection.flush

    async def timed_receive(self: srv.Switchboard, conn: srv.Connection, data: bytes | str) -> None:
        conn._bench_rx = time.perf_counter()  # type: ignore[attr-defined]
        await receive(self, conn, data)

    async def timed_register(self: srv.Switchboard, conn: srv.Connection, req: wire.Register) -> None:
        # Only a connection's first REGISTER delivers held calls.
        conn._bench_reg = conn._bench_rx if conn.identity is None else None  # type: ignore[attr-defined]
        try:
            await on_register(self, conn, req)
        finally:
            conn._bench_reg = None  # type: ignore[attr-defined]

    async def timed_send(self: srv.Connection, frame: wire.Outbound) -> None:
        # Frames are queued and written by `Connection.flush` at the end of the loop iteration: note what was
        # queued here and take the time when the write happens.
        await send(self, frame)
        started: float | None = getattr(self, "_bench_reg", None)
        if started is None:
            return
        if isinstance(frame, wire.InviteOffer):
            self._bench_invite = started  # type: ignore[attr-defined]
        elif isinstance(frame, wire.Response) and frame.method is wire.Method.REGISTER and frame.code == 200:
            self._bench_ok = started  # type: ignore[attr-defined]

    def timed_flush(self: srv.Connection) -> None:
        flush(self)
        written = time.perf_counter()
        invite: float | None = getattr(self, "_bench_invite", None)
        if invite is None:
            return
        timings["register_to_invite"].append(written - invite)
        ok: float | None = getattr(self, "_bench_ok", None)
        if ok is not None:
            timings["register_to_ok"].append(written - ok)
        self._bench_invite = self._bench_ok = None  # type: ignore[attr-defined]

    srv.Switchboard.receive = timed_receive  # type: ignore[method-assign]
    srv.Switchboard._on_register = timed_register  # type: ignore[method-assign]
    srv.Connection.send = timed_send  # type: ignore[method-assign]
    srv.Connection.flush = timed_flush  # type: ignore[method-assign]


def _log_gc() -> None:
    import gc

    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = (time.perf_counter() - started[0]) * 1000
        if info.get("generation") == 2 or took > 20:
            line = {"event": "bench.gc", "generation": info.get("generation"), "duration_ms": round(took, 2)}
            line["collected"] = info.get("collected")
            line["monotonic"] = round(time.monotonic(), 4)
            sys.stderr.write(json.dumps(line) + "\n")

    gc.callbacks.append(callback)


def main() -> int:
    argv = sys.argv[1:]
    try:
        split = argv.index("--")
    except ValueError:
        split = len(argv)
    flags, rest = argv[:split], argv[split + 1 :]
    options: dict[str, Any] = {"uvloop": False, "no_hiredis": False, "pure_msgpack": False, "gc_log": False}
    timings_file: str | None = None
    cprofile_file: str | None = None
    i = 0
    while i < len(flags):
        flag = flags[i]
        if flag in ("--uvloop", "--no-hiredis", "--pure-msgpack", "--gc-log"):
            options[flag[2:].replace("-", "_")] = True
        elif flag == "--timings":
            i += 1
            timings_file = flags[i]
        elif flag == "--cprofile":
            i += 1
            cprofile_file = flags[i]
        else:
            print(f"bench.serve: unknown flag {flag}", file=sys.stderr)
            return 2
        i += 1

    if options["pure_msgpack"]:
        os.environ["MSGPACK_PUREPYTHON"] = "1"
    if options["no_hiredis"]:
        sys.modules["hiredis"] = None  # type: ignore[assignment]
    if options["uvloop"]:
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    import msgpack
    import redis.utils

    timings: dict[str, list[float]] = {"register_to_invite": [], "register_to_ok": []}
    if timings_file:
        _instrument(timings)
    if options["gc_log"]:
        _log_gc()
    setup = {
        "event": "bench.wrapper",
        "uvloop": options["uvloop"],
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "msgpack_c": not msgpack.Packer.__module__.endswith("fallback"),
        "instrumented": bool(timings_file),
        "gc_log": options["gc_log"],
        "cprofile": bool(cprofile_file),
        "pid": os.getpid(),
    }
    sys.stderr.write(json.dumps(setup) + "\n")
    sys.stderr.flush()

    from signaling.cli import main as cli_main

    profiler = None
    if cprofile_file:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        code = cli_main(rest)
    finally:
        if profiler is not None and cprofile_file:
            profiler.disable()
            profiler.dump_stats(cprofile_file)
        if timings_file:
            with open(timings_file, "w") as out:
                json.dump(timings, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
