"""What the load processes run (each an `async def NAME(ctl, **kwargs)` that `bench.worker` starts).

callsetup   pairs of connections doing complete calls back to back, against SIP-lite or the relay
idle        many registered connections that send keepalives on schedule
wake        held calls to sleeping devices, woken one at a time (REGISTER sent -> held INVITE received)
redis_cost  registrations, calls, keepalives and closes one at a time, with Redis's statistics around each

All loops are bounded by a count and by a deadline.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import random
import time
from collections import Counter
from functools import partial
from typing import Any

import msgpack

from bench import common
from bench.worker import Ctl
from bench.wsclient import QueuedClient, WsClient, connect
from signaling.auth import issue_token

_pack = msgpack.Packer(use_bin_type=True).pack
_unpack = msgpack.unpackb


def _token(user: str, ttl: float = 7200.0) -> str:
    return issue_token(user, key=common.SECRET, now=time.time(), ttl=ttl, name=user.upper())


def _rusage_cpu() -> float:
    return time.process_time()


# --- call setup --------------------------------------------------------------------------------------------------


class _Phase:
    """One run of calls: a quota and a deadline shared by every pair; completion when the last call ends."""

    def __init__(self, quota: int, seconds: float, ctl: Ctl) -> None:
        self.remaining = quota
        self.deadline = time.monotonic() + seconds
        self.in_flight = 0
        self.completed = 0
        self.failures: Counter[str] = Counter()
        self.setup = array.array("d")
        self.total = array.array("d")
        self.first_start = 0.0
        self.last_end = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ctl = ctl

    def take(self) -> bool:
        if self.remaining > 0 and time.monotonic() < self.deadline:
            self.remaining -= 1
            return True
        return False

    def finished(self, setup: float, total: float, at: float) -> None:
        self.completed += 1
        self.setup.append(setup)
        self.total.append(total)
        self.last_end = at
        if self.completed % 64 == 0:
            self.ctl.progress(self.completed)

    def failed(self, why: str, at: float) -> None:
        self.failures[why] += 1
        self.last_end = at

    def pair_idle(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and not self.done.done():
            self.done.set_result(None)


class _Pair:
    """A caller and a callee connection. SIP-lite: INVITE / 100 / 180 / 200 / ACK / BYE / 200 through the
    server. Relay: the same exchange without the server's 100, each frame addressed to the peer."""

    __slots__ = (
        "b_user",
        "bye_seq",
        "call_id",
        "callee",
        "caller",
        "calls",
        "name",
        "phase",
        "relay",
        "seq",
        "t0",
        "t_setup",
    )

    def __init__(self, name: str, relay: bool) -> None:
        self.name = name
        self.relay = relay
        self.b_user = f"{name}b"
        self.caller: WsClient | None = None
        self.callee: WsClient | None = None
        self.seq = 1
        self.calls = 0
        self.call_id = ""
        self.bye_seq = -1
        self.t0 = 0.0
        self.t_setup = 0.0
        self.phase: _Phase | None = None

    @property
    def a_user(self) -> str:
        return f"{self.name}a"

    def begin(self, phase: _Phase) -> None:
        self.phase = phase
        phase.in_flight += 1
        self._next()

    def _next(self) -> None:
        phase = self.phase
        if phase is None:
            return
        if not phase.take() or self.caller is None or not self.caller.is_open:
            self.phase = None
            phase.pair_idle()
            return
        self.calls += 1
        self.call_id = f"{self.name}-{self.calls}"
        self.seq += 1
        invite: dict[str, Any] = {"type": "invite", "seq": self.seq, "call_id": self.call_id, "sdp": common.OFFER}
        invite["to"] = self.b_user
        self.t0 = time.perf_counter()
        if not phase.first_start:
            phase.first_start = self.t0
        self.caller.send(_pack(invite))

    def on_caller(self, payload: bytes) -> None:
        frame = _unpack(payload)
        if frame.get("type") != "response" or self.caller is None:
            return
        code = frame.get("code", 0)
        method = frame.get("method")
        now = time.perf_counter()
        if method == "invite":
            if code < 200:
                return
            if code >= 300:
                self._fail(f"invite {code} {frame.get('error', '')}".strip(), now)
                return
            self.t_setup = now - self.t0
            to = {"to": self.b_user} if self.relay else {}
            # ACK and BYE go out in one write, as 180 and 200 do from the callee: back-to-back frames of an
            # auto-answering load should not depend on Nagle and delayed-ACK timing.
            ack = _pack({"type": "ack", "seq": self.seq + 1, "call_id": self.call_id, **to})
            self.seq += 2
            self.bye_seq = self.seq
            self.caller.send_many(ack, _pack({"type": "bye", "seq": self.seq, "call_id": self.call_id, **to}))
        elif method == "bye" and frame.get("seq") == self.bye_seq:
            if code == 200:
                if self.phase is not None:
                    self.phase.finished(self.t_setup, now - self.t0, now)
                self._next()
            else:
                self._fail(f"bye {code} {frame.get('error', '')}".strip(), now)
        elif code >= 300:
            self._fail(f"{method} {code} {frame.get('error', '')}".strip(), now)

    def _fail(self, why: str, now: float) -> None:
        if self.phase is not None:
            self.phase.failed(why, now)
        self.bye_seq = -1
        self._next()

    def on_callee(self, payload: bytes) -> None:
        frame = _unpack(payload)
        kind = frame.get("type")
        callee = self.callee
        if callee is None:
            return
        if kind == "invite":
            seq = frame["seq"]
            call_id = frame["call_id"]
            reply: dict[str, Any] = {"type": "response", "seq": seq, "method": "invite", "call_id": call_id}
            if self.relay:
                reply["to"] = self.a_user
            callee.send_many(_pack({**reply, "code": 180}), _pack({**reply, "code": 200, "sdp": common.ANSWER}))
        elif kind == "bye" and self.relay:
            callee.send(
                _pack(
                    {
                        "type": "response",
                        "seq": frame["seq"],
                        "method": "bye",
                        "call_id": frame["call_id"],
                        "code": 200,
                        "to": self.a_user,
                    }
                )
            )


async def _register(ws: QueuedClient, user: str, device: str, push: dict[str, Any] | None = None) -> None:
    fields: dict[str, Any] = {"token": _token(user), "device_id": device}
    if push is not None:
        fields["push"] = push
    seq = ws.request("register", **fields)
    response = await ws.response(seq, timeout=15.0)
    if response.get("code") != 200:
        raise RuntimeError(f"REGISTER {user} failed: {response}")


async def _open_pair(host: str, port: int, pair: _Pair) -> None:
    if pair.relay:
        pair.caller = await connect(host, port, f"/ws?id={pair.a_user}", subprotocol=None)
        pair.callee = await connect(host, port, f"/ws?id={pair.b_user}", subprotocol=None)
    else:
        for user, device in ((pair.a_user, "phone"), (pair.b_user, "phone")):
            client = await QueuedClient.open(host, port)
            await _register(client, user, device)
            if user == pair.a_user:
                pair.caller = client.ws
            else:
                pair.callee = client.ws
    assert pair.caller is not None and pair.callee is not None
    pair.caller.on_frame = pair.on_caller
    pair.callee.on_frame = pair.on_callee


async def callsetup(
    ctl: Ctl,
    host: str,
    port: int,
    relay: bool,
    pairs: int,
    prefix: str,
    server_pid: int,
    redis_pid: int | None = None,
    server_cpus: list[int] | None = None,
    load_cpus: list[int] | None = None,
) -> None:
    """Open `pairs` caller/callee pairs, then run the phases the parent asks for:

    ("phase", quota, seconds, active_pairs) -> ("phase_done", stats)     ("close",) -> exits
    """
    all_pairs = [_Pair(f"{prefix}{i}", relay) for i in range(pairs)]
    sem = asyncio.Semaphore(32)

    async def open_one(pair: _Pair) -> None:
        async with sem:
            await _open_pair(host, port, pair)

    await asyncio.wait_for(asyncio.gather(*(open_one(p) for p in all_pairs)), 60.0)
    ctl.send(("ready", {"pairs": len(all_pairs)}))
    while True:
        message = await ctl.recv()
        if message[0] == "close":
            break
        _, quota, seconds, active = message
        phase = _Phase(int(quota), float(seconds), ctl)
        server_cpu0 = common.cpu_seconds(server_pid)
        redis_cpu0 = common.cpu_seconds(redis_pid) if redis_pid else 0.0
        own_cpu0 = _rusage_cpu()
        ticks0 = common.cpu_ticks()
        wall0 = time.perf_counter()
        for pair in all_pairs[: max(1, int(active))]:
            pair.begin(phase)
        stuck = 0
        try:
            await asyncio.wait_for(asyncio.shield(phase.done), float(seconds) + 15.0)
        except TimeoutError:
            stuck = phase.in_flight
        wall1 = time.perf_counter()
        ticks1 = common.cpu_ticks()
        end = phase.last_end or wall1
        start = phase.first_start or wall0
        ctl.progress(phase.completed)
        ctl.send(
            (
                "phase_done",
                {
                    "completed": phase.completed,
                    "failures": dict(phase.failures),
                    "stuck_pairs": stuck,
                    "elapsed": end - start,
                    "wall": wall1 - wall0,
                    "server_cpu": common.cpu_seconds(server_pid) - server_cpu0,
                    "redis_cpu": (common.cpu_seconds(redis_pid) - redis_cpu0) if redis_pid else None,
                    "load_cpu": _rusage_cpu() - own_cpu0,
                    "server_core_busy": common.busy_fraction(ticks0, ticks1, server_cpus),
                    "load_cores_busy": common.busy_fraction(ticks0, ticks1, load_cpus),
                    "setup": phase.setup.tolist(),
                    "total": phase.total.tolist(),
                },
            )
        )
    for pair in all_pairs:
        for ws in (pair.caller, pair.callee):
            if ws is not None:
                ws.abort()
    ctl.send(("closed",))


# --- idle connections --------------------------------------------------------------------------------------------


class _Idle:
    """Registered connections sending keepalives: each connection in one of `slots` time slots per interval."""

    def __init__(self, ctl: Ctl, host: str, port: int, prefix: str, interval: float) -> None:
        self.ctl = ctl
        self.host = host
        self.port = port
        self.prefix = prefix
        self.interval = interval
        self.tick = 0.05
        self.slots: list[list[QueuedClient]] = [[] for _ in range(max(1, round(interval / self.tick)))]
        self.clients: list[QueuedClient] = []
        self.paused = False
        self.stats: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._ticker: asyncio.Task[None] | None = None

    def on_frame(self, client: QueuedClient, payload: bytes) -> None:
        frame = _unpack(payload)
        if frame.get("type") == "response" and frame.get("method") == "keepalive":
            self.stats["keepalive_ok" if frame.get("code") == 200 else "keepalive_refused"] += 1
        elif frame.get("type") == "response" and frame.get("method") == "register":
            client.frames.put_nowait((time.perf_counter(), frame))
        else:
            self.stats["other_frames"] += 1

    async def open_one(self, index: int) -> None:
        user = f"{self.prefix}{index}"
        try:
            client = await QueuedClient.open(self.host, self.port, timeout=15.0)
        except (OSError, TimeoutError) as exc:
            self.errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1
            return
        try:
            await _register(client, user, "phone")
        except (RuntimeError, TimeoutError) as exc:
            self.errors[f"register: {type(exc).__name__}: {exc}"[:120]] += 1
            client.ws.abort()
            return
        ws = client.ws
        ws.on_frame = lambda payload: self.on_frame(client, payload)
        ws.closed.add_done_callback(lambda f: self._closed(f))
        self.clients.append(client)
        self.slots[random.randrange(len(self.slots))].append(client)
        self.stats["registered"] += 1

    def _closed(self, fut: asyncio.Future[int | None]) -> None:
        if self._ticker is not None and not fut.cancelled():
            self.close_codes[str(fut.result())] += 1

    async def ticker(self) -> None:
        slot = 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.tick
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            slot = (slot + 1) % len(self.slots)
            if self.paused:
                continue
            for client in self.slots[slot]:
                if client.ws.is_open:
                    client.request("keepalive")
                    self.stats["keepalive_sent"] += 1

    async def grow(self, target: int, concurrency: int, seconds: float) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self.ticker())
        start = len(self.clients) + sum(self.errors.values())
        sem = asyncio.Semaphore(concurrency)
        deadline = time.monotonic() + seconds

        async def one(index: int) -> None:
            async with sem:
                if time.monotonic() < deadline:
                    await self.open_one(index)
                    self.ctl.progress(len(self.clients))

        await asyncio.gather(*(one(i) for i in range(start, max(start, target))))

    def snapshot(self) -> dict[str, Any]:
        return {
            "open": sum(1 for c in self.clients if c.ws.is_open),
            **dict(self.stats),
            "close_codes": dict(self.close_codes),
            "errors": dict(self.errors.most_common(5)),
            "error_count": sum(self.errors.values()),
        }


async def idle(ctl: Ctl, host: str, port: int, prefix: str, interval: float) -> None:
    """("grow", target, concurrency, seconds) -> ("grown", snapshot); ("pause", bool); ("stats",) -> snapshot;
    ("close",) -> exits."""
    state = _Idle(ctl, host, port, prefix, interval)
    ctl.send(("ready", {}))
    while True:
        message = await ctl.recv()
        kind = message[0]
        if kind == "close":
            break
        if kind == "grow":
            await state.grow(int(message[1]), int(message[2]), float(message[3]))
            ctl.send(("grown", state.snapshot()))
        elif kind == "pause":
            state.paused = bool(message[1])
            ctl.send(("ok", state.snapshot()))
        elif kind == "stats":
            ctl.send(("stats", state.snapshot()))
    if state._ticker is not None:
        state._ticker.cancel()
    for client in state.clients:
        client.ws.abort()
    ctl.send(("closed",))


def _past_trying(seq: int, frame: dict[str, Any]) -> bool:
    return frame.get("seq") == seq and frame.get("type") == "response" and frame.get("code", 0) >= 183


def _response_to(seq: int, frame: dict[str, Any]) -> bool:
    return frame.get("seq") == seq and frame.get("type") == "response"


# --- wake-to-bridge ----------------------------------------------------------------------------------------------


async def wake(ctl: Ctl, host: str, port: int, prefix: str, calls: int, seconds: float) -> None:
    """Held calls to sleeping devices, one at a time; the woken device connects once the caller has heard 183
    push_sent, then REGISTERs. Sends ("wake_done", results)."""
    deadline = time.monotonic() + seconds
    caller = await QueuedClient.open(host, port)
    await _register(caller, f"{prefix}caller", "phone")
    users = [f"{prefix}w{i}" for i in range(calls)]
    tokens = {u: _token(u) for u in users}
    # Every callee device registers with a VoIP token and closes its socket: asleep, as iOS leaves it.
    for user in users:
        device = await QueuedClient.open(host, port)
        await _register(device, user, "phone", common.PUSH_BINDING)
        await device.ws.close()
    await asyncio.sleep(0.5)  # the server drops each binding once it has handled the close

    register_to_invite: list[float] = []
    register_to_ok: list[float] = []
    invite_to_push_sent: list[float] = []
    failures: Counter[str] = Counter()
    for n, user in enumerate(users):
        if time.monotonic() > deadline:
            failures["deadline"] += calls - n
            break
        call_id = f"{prefix}call-{n}"
        t_invite = time.perf_counter()
        seq = caller.request("invite", call_id=call_id, to=user, sdp=common.OFFER)
        try:
            at, pushed = await caller.until(partial(_past_trying, seq), 5.0)
        except TimeoutError:
            failures["no 183 push_sent"] += 1
            continue
        if pushed.get("code") != 183 or pushed.get("stage") != "push_sent":
            failures[f"invite answered {pushed.get('code')} {pushed.get('stage') or pushed.get('error')}"] += 1
            continue
        invite_to_push_sent.append(at - t_invite)
        woken = await QueuedClient.open(host, port)
        t0 = time.perf_counter()
        rseq = woken.request("register", token=tokens[user], device_id="phone", push=common.PUSH_BINDING)
        try:
            ok_at, _ = await woken.until(partial(_response_to, rseq), 5.0)
            invite_at, offer = await woken.until(lambda f: f.get("type") == "invite", 5.0)
        except TimeoutError:
            failures["woken device got no invite"] += 1
            await woken.ws.close()
            continue
        register_to_ok.append(ok_at - t0)
        register_to_invite.append(invite_at - t0)
        reply = {"type": "response", "seq": offer["seq"], "method": "invite", "call_id": call_id}
        woken.ws.send_obj({**reply, "code": 180})
        woken.ws.send_obj({**reply, "code": 200, "sdp": common.ANSWER})
        try:
            await caller.response(seq, timeout=5.0)
            caller.request("ack", call_id=call_id)
            bye = caller.request("bye", call_id=call_id)
            await caller.response(bye, timeout=5.0)
        except TimeoutError:
            failures["call not completed"] += 1
        await woken.ws.close()
        ctl.progress(n + 1)
    await caller.ws.close()
    ctl.send(
        (
            "wake_done",
            {
                "register_to_invite": register_to_invite,
                "register_to_ok": register_to_ok,
                "invite_to_push_sent": invite_to_push_sent,
                "failures": dict(failures),
            },
        )
    )
    with contextlib.suppress(Exception):
        await ctl.recv()


# --- Redis cost --------------------------------------------------------------------------------------------------


async def redis_cost(ctl: Ctl, host: str, port: int, redis_url: str, prefix: str, pairs: int, calls: int) -> None:
    """Registrations, calls, keepalives and closes one at a time, with Redis's statistics around each phase.

    Round trips are INFO stats `total_reads_processed` (Redis reads a pipelined batch in one read); commands are
    INFO `total_commands_processed`, which counts commands run inside scripts too; MONITOR tells commands the
    server sent (top level) from those its Lua scripts ran. This process's own INFO/ECHO traffic is measured
    on an empty phase and subtracted."""
    import redis.asyncio

    r = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    monitor_entries: list[tuple[str, str, str]] = []  # (phase, client_type, command)
    current = ["setup"]
    marker = "bench:phase:"

    async def monitor() -> None:
        async with r.monitor() as m:
            async for entry in m.listen():
                command = str(entry.get("command", ""))
                if command.startswith(f"ECHO {marker}"):
                    current[0] = command.removeprefix(f"ECHO {marker}")
                    if current[0] == "end":
                        return
                    continue
                words = command.split(" ", 1)
                monitor_entries.append((current[0], str(entry.get("client_type", "")), words[0].upper()))

    monitor_task = asyncio.get_running_loop().create_task(monitor())
    await asyncio.sleep(0.3)

    async def snap() -> tuple[int, int]:
        stats = await r.info("stats")
        return int(stats["total_reads_processed"]), int(stats["total_commands_processed"])

    results: dict[str, Any] = {}

    async def phase(name: str, ops: int, body: Any) -> None:
        reads0, cmds0 = await snap()
        await r.echo(marker + name)
        await body()
        await asyncio.sleep(0.3)  # let the server finish any write it does after answering
        reads1, cmds1 = await snap()
        results[name] = {"ops": ops, "reads": reads1 - reads0, "commands": cmds1 - cmds0}

    async def nothing() -> None:
        return None

    await phase("empty", 0, nothing)

    callers: list[QueuedClient] = []
    callees: list[QueuedClient] = []

    async def register_all() -> None:
        for i in range(pairs):
            for side, group in (("a", callers), ("b", callees)):
                client = await QueuedClient.open(host, port)
                await _register(client, f"{prefix}{i}{side}", "phone")
                group.append(client)

    await phase("register", 2 * pairs, register_all)

    async def do_calls() -> None:
        for n in range(calls):
            caller, callee = callers[n % pairs], callees[n % pairs]
            call_id = f"{prefix}c{n}"
            seq = caller.request("invite", call_id=call_id, to=f"{prefix}{n % pairs}b", sdp=common.OFFER)
            _, offer = await callee.until(lambda f: f.get("type") == "invite", 5.0)
            reply = {"type": "response", "seq": offer["seq"], "method": "invite", "call_id": call_id}
            callee.ws.send_obj({**reply, "code": 180})
            callee.ws.send_obj({**reply, "code": 200, "sdp": common.ANSWER})
            answer = await caller.response(seq, timeout=5.0)
            if answer.get("code") != 200:
                raise RuntimeError(f"call failed: {answer}")
            caller.request("ack", call_id=call_id)
            bye = caller.request("bye", call_id=call_id)
            await caller.response(bye, timeout=5.0)
            await callee.until(lambda f: f.get("type") == "bye", 5.0)

    # Two calls first, so that the server's Redis pool has the connections a call uses (opening one costs a
    # HELLO and its round trip, once).
    warm_calls, calls = calls, 4
    await phase("warm", calls, do_calls)
    calls = warm_calls
    await phase("call", calls, do_calls)

    async def keepalives() -> None:
        for client in callers:
            await client.response(client.request("keepalive"), timeout=5.0)

    await phase("keepalive", len(callers), keepalives)

    async def close_all() -> None:
        for client in callers + callees:
            await client.ws.close()

    await phase("close", 2 * pairs, close_all)
    await r.echo(marker + "end")
    try:
        await asyncio.wait_for(monitor_task, 5.0)
    except TimeoutError:
        monitor_task.cancel()
    await r.aclose()

    by_phase: dict[str, Counter[str]] = {}
    for name, client_type, command in monitor_entries:
        key = f"{'script' if client_type == 'lua' else 'top'}:{command}"
        by_phase.setdefault(name, Counter())[key] += 1
    for name, counts in by_phase.items():
        if name in results:
            results[name]["monitor"] = dict(counts)
    ctl.send(("redis_done", results))
    with contextlib.suppress(Exception):
        await ctl.recv()


# --- APNs stand-in -----------------------------------------------------------------------------------------------


async def apns_stand_in(ctl: Ctl, pki: Any) -> None:
    """The local APNs-compatible HTTP/2 server (tests/apns_server.py) in its own process: ("ready", port) at once,
    ("stats",) -> ("stats", {...}), ("close",) -> exits."""
    from signaling import log
    from tests.apns_server import ApnsServer

    log.configure("warning", "json", cache=False)
    server = ApnsServer(pki)
    await server.start()
    ctl.send(("ready", server.port))
    try:
        while True:
            message = await ctl.recv()
            if message[0] == "close":
                break
            if message[0] == "stats":
                ctl.send(
                    (
                        "stats",
                        {
                            "requests": len(server.requests),
                            "refused_by_stand_in": len(server.errors),
                            "errors": server.errors[:5],
                            "connections": server.connections_made,
                        },
                    )
                )
    finally:
        await server.close()
