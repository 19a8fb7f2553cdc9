"""The aiohttp shell around the core: WebSocket connections, registration, and calls between online devices.

`create_app()` builds the application that `signaling serve` runs and the tests import. The shell owns sockets,
timers and the store; every call decision is the `Call` state machine's (signaling.call). This module is also the
one place that turns errors into error responses and close codes.

Close codes (see docs/PROTOCOL.md): 1001 server shutting down, 1008 too many bad frames, 1009 frame too large,
1012 server draining (reconnect elsewhere),
4401 authentication failed or token expired, 4408 no REGISTER/keepalive in time,
4409 the device registered again on another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Final, cast

from aiohttp import WSCloseCode, WSMsgType, web

from push.apns import ApnsConfig, ApnsProvider
from push.base import IncomingCallPush, MissedCallAlert, Outcome, PushProvider
from push.dev import DevelopmentProvider, RecordedPush
from signaling import call as core
from signaling import log, wire
from signaling.auth import Identity, TokenVerifier
from signaling.bus import Bus, LocalBus, Message, RedisBus
from signaling.clock import Clock, SystemClock, TimerHandle
from signaling.config import Settings
from signaling.errors import (
    AuthenticationFailed,
    CallIdInUse,
    Draining,
    Forbidden,
    InternalError,
    LimitExceeded,
    NoSuchCall,
    NotRegistered,
    PeerError,
    RateLimited,
    SipLiteError,
    StaleSequence,
    StoreUnavailable,
)
from signaling.models import Binding, CallPhase, CallRecord, CallRef, Device, Notice, NoticeKind, PushBinding
from signaling.store import MemoryStore, Store

logger = log.get_logger("signaling.server")


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    UNAUTHORIZED = 4401
    SERVICE_RESTART = 1012
    TIMEOUT = 4408
    REPLACED = 4409


# The retry hint of a 503 `store_unavailable`: the store (Redis) is down or restarting.
_STORE_RETRY_AFTER: Final = 2.0
# How long past the ring timeout a call record outlives a call nobody cleaned up (for example a crashed node).
_RECORD_SLACK: Final = 30.0
# An app woken by a push just before the ring deadline still hears that the call ended if it connects this soon.
_ENDED_NOTICE_SLACK: Final = 60.0
# A call record of an answered call is kept this long; established calls are not expected to outlast it.
_ANSWERED_RECORD_TTL: Final = 12 * 3600.0


_OPCODE_TEXT: Final = 0x1
_OPCODE_BINARY: Final = 0x2


def _frame_header(opcode: int, length: int) -> bytes:
    """The header of an unmasked, final WebSocket frame (RFC 6455 section 5.2), as a server sends it."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


class TokenBucket:
    """Frame rate limiting per connection, on the injected clock."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> float:
        """Take one token. Returns 0 when allowed, else the seconds until one is available."""
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


class RemoteStage(StrEnum):
    """How far a call another node owns has come for a device connected here (what to tell it if that node
    dies)."""

    WAKING = "waking"  # pushed for it, not offered yet: `ended`
    OFFERED = "offered"  # ringing here: `cancel` caller_gone
    PARTY = "party"  # answered, this device is a party: `bye` peer_gone


@dataclass(slots=True)
class RemoteCall:
    owner: str
    stage: RemoteStage
    ref: CallRef | None = None  # for WAKING: who called, to say so in `ended`


class Connection:
    """One client WebSocket: its encoding, its identity once registered, and the calls it takes part in."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        encoding: wire.Encoding,
        bucket: TokenBucket,
        transport: asyncio.BaseTransport | None,
        max_send_buffer: int,
    ) -> None:
        self.ws = ws
        self.encoding = encoding
        # Frames are queued and written once per event-loop iteration, in one write (see `flush`).
        # Not an isinstance check: uvloop's transports write like asyncio's but do not derive from its classes.
        self._transport = cast(asyncio.WriteTransport | None, transport)
        self._opcode = _OPCODE_BINARY if encoding is wire.Encoding.MSGPACK else _OPCODE_TEXT
        self._outbox: list[bytes] = []
        self._max_send_buffer = max_send_buffer
        self.conn_id = uuid.uuid4().hex
        self.identity: Identity | None = None
        self.device_id: str | None = None
        self.push: PushBinding | None = None
        self.bucket = bucket
        self.last_seq = -1
        self.out_seq = 0
        self.errors = 0
        self.last_seen = 0.0
        self.calls: set[str] = set()  # as caller
        self.legs: set[str] = set()  # as a callee device, of calls this node owns
        # As a callee device, of calls another node owns: call id -> that node. Frames naming them go there.
        self.remote_calls: dict[str, RemoteCall] = {}
        self.timers: list[TimerHandle] = []
        self.closing = False
        self.cleaned = False
        # Set once the server has ended what the connection took part in and dropped its binding.
        self.finished = asyncio.Event()

    @property
    def user_id(self) -> str | None:
        return self.identity.user_id if self.identity else None

    async def send(self, frame: wire.Outbound) -> None:
        """Write one frame. Frames to a connection that is closing are dropped (its calls end with it)."""
        await self.send_map(wire.to_map(frame))

    async def send_map(self, out: dict[str, object]) -> None:
        """Write one frame given as its map (`wire.to_map`, possibly from another node); server requests take
        this connection's next `seq`."""
        if self.closing or self.ws.closed:
            return
        if out.get("type") not in ("response", "error"):
            self.out_seq += 1
            out["seq"] = self.out_seq
        data = wire.dumps(out, self.encoding)
        payload = data if isinstance(data, bytes) else data.encode()
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outbox.append(_frame_header(self._opcode, len(payload)))
        self._outbox.append(payload)

    def flush(self) -> None:
        """Write the queued frames in one write.

        Everything a connection is sent while one event-loop iteration runs (a 180 and a 200 relayed from one
        read, an ACK and a BYE) leaves in one system call instead of one each: on this kind of machine a write
        that wakes the peer costs more CPU than handling the frame. Frames are whole WebSocket messages, and
        aiohttp writes its own frames (pings, close) whole too, so the two never interleave. Writing never
        waits: a peer that stops reading while more than `max_send_buffer` bytes wait for it is disconnected
        (a close frame could not reach it) instead of stalling whoever is sending to it.
        """
        if not self._outbox:
            return
        frames, self._outbox = self._outbox, []
        transport = self._transport
        if transport is None or transport.is_closing() or self.ws.closed:
            return  # the peer went away; the reader loop sees the close and cleans up
        transport.write(b"".join(frames))
        if transport.get_write_buffer_size() > self._max_send_buffer:
            logger.info("conn.not_reading", conn_id=self.conn_id, user_id=self.user_id)
            self.closing = True
            transport.abort()  # the reader loop sees the connection lost and cleans up

    async def close(self, code: int, message: str) -> None:
        self.flush()
        self.closing = True
        for timer in self.timers:
            timer.cancel()
        await self.ws.close(code=code, message=message.encode()[:120])


@dataclass(eq=False, slots=True)
class RemotePeer:
    """A callee device whose connection another node holds: frames to it travel over the bus.

    It stands in for a `Connection` in a call this node owns (as a leg) and as the sender of the frames that
    device sends about the call, which its node forwards here (`op: frame`)."""

    board: Switchboard
    node_id: str
    identity: Identity
    device_id: str
    conn_id: str

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    async def send(self, frame: wire.Outbound) -> None:
        message = {"op": "deliver", "user": self.user_id, "device": self.device_id, "conn": self.conn_id}
        await self.board.publish(self.node_id, {**message, "frame": wire.to_map(frame)})


# A party of a call: a connection on this node, or a device's connection on another.
Party = Connection | RemotePeer

# Frames a device sends about a call it rings for; when another node owns the call they are forwarded there.
_FORWARDED: Final = (wire.Reply, wire.Ice, wire.Bye, wire.Update, wire.Ack, wire.Cancel)


def _remote_identity(user_id: str) -> Identity:
    # The device's own node authenticated it and keeps its token's expiry; the owner only needs the user id.
    return Identity(user_id, None, float("inf"))


@dataclass(slots=True)
class CallHandle:
    """A live call on this node: the core state machine plus the connections its parties hold."""

    call: core.Call
    record: CallRecord
    caller: Party
    legs: dict[str, Party]
    # Every known device of the callee at INVITE time (push bindings for waking, alert tokens for missed calls).
    devices: dict[str, Device] = field(default_factory=dict)
    timers: dict[tuple[core.TimerKind, str | None], TimerHandle] = field(default_factory=dict)
    # When each VoIP push was accepted, for push-to-connect latency.
    pushed_at: dict[str, float] = field(default_factory=dict)


class Switchboard:
    """Connections, local bindings and live calls of this node, and the handling of every request."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock,
        verifier: TokenVerifier,
        push: PushProvider,
        bus: Bus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.push = push
        self.bus: Bus = bus or LocalBus()
        self.clock = clock
        self.verifier = verifier
        self.node_id = settings.node_id
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.bound: dict[tuple[str, str], Connection] = {}
        self.calls: dict[str, CallHandle] = {}
        # Calls ringing for a device that was pushed and has not connected yet: (user, device) -> call ids.
        self.waking: dict[tuple[str, str], set[str]] = {}
        self.timeouts = core.Timeouts(
            ring=settings.ring_timeout,
            update=settings.update_timeout,
            ack_grace=settings.ack_grace,
            reattach=settings.reattach_grace,
        )
        # The parties of answered calls this node owns, (user, device) -> call ids: who may re-attach.
        self.parties: dict[tuple[str, str], set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: TimerHandle | None = None
        # The latest periodic sweep and heartbeat (for tests and shutdown to wait on).
        self.last_sweep: asyncio.Task[None] | None = None
        self.last_heartbeat: asyncio.Task[None] | None = None
        self._beater: TimerHandle | None = None
        # Set by `drain()`: no new connections or calls; clients are sent elsewhere.
        self.draining = False
        self._calls_changed = asyncio.Event()
        self._handlers: dict[type[wire.Inbound], Callable[[Party, wire.Inbound], Awaitable[None]]] = {
            wire.Register: self._on_register,  # type: ignore[dict-item]
            wire.Keepalive: self._on_keepalive,  # type: ignore[dict-item]
            wire.Invite: self._on_invite,  # type: ignore[dict-item]
            wire.Ack: self._on_ack,  # type: ignore[dict-item]
            wire.Cancel: self._on_cancel,  # type: ignore[dict-item]
            wire.Bye: self._on_bye,  # type: ignore[dict-item]
            wire.Update: self._on_update,  # type: ignore[dict-item]
            wire.Ice: self._on_ice,  # type: ignore[dict-item]
            wire.Reply: self._on_reply,  # type: ignore[dict-item]
        }

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.start(self.node_id, self._on_bus)
        await self.store.heartbeat(self.node_id, self.settings.node_ttl, ())
        self._schedule_sweep()
        self._schedule_heartbeat()

    # ------------------------------------------------------------------------------------------ other nodes

    def _schedule_heartbeat(self) -> None:
        self._beater = self.clock.call_at(self.clock.now() + self.settings.node_ttl / 3, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self.last_heartbeat = self.spawn(self.heartbeat())
        self._schedule_heartbeat()

    async def heartbeat(self) -> None:
        """Say this node is alive (for `node_ttl`), and end what depended on nodes that stopped saying so: the
        calls they owned, for devices here, and the parties they held, in calls this node owns."""
        watch = {r.owner for c in self.bound.values() for r in c.remote_calls.values()}
        for handle in self.calls.values():
            watch |= {p.node_id for p in (handle.caller, *handle.legs.values()) if isinstance(p, RemotePeer)}
        for node_id in await self.store.heartbeat(self.node_id, self.settings.node_ttl, watch):
            await self._node_died(node_id)

    async def _node_died(self, node_id: str) -> None:
        logger.warning("node.gone", node_id=node_id)
        for conn in list(self.bound.values()):
            for call_id, remote in list(conn.remote_calls.items()):
                if remote.owner == node_id:
                    del conn.remote_calls[call_id]
                    await self._orphaned(conn, call_id, remote)
        for handle in list(self.calls.values()):
            for party in (handle.caller, *handle.legs.values()):
                if (
                    isinstance(party, RemotePeer)
                    and party.node_id == node_id
                    and handle.call.call_id in self.calls
                ):
                    # Its socket died with its node; a party of an answered call may still re-attach elsewhere.
                    lost = core.CallerLost() if party is handle.caller else core.LegLost(party.device_id)
                    await self._step(handle, lost)

    async def publish(self, node_id: str, message: Message) -> None:
        """Send `message` to another node over the bus; a failure is logged (the timers end what it leaves)."""
        try:
            await self.bus.publish(node_id, {**message, "from": self.node_id})
        except StoreUnavailable as exc:
            logger.warning("bus.publish_failed", node_id=node_id, op=message.get("op"), error=str(exc))

    async def drain(self, timeout: float) -> None:
        """Stop taking work and send every client elsewhere (`reconnect`, then close 1012), while the calls this
        node owns go on, their parties re-attached through other nodes, until they end or `timeout` passes.
        A connection with a call still ringing is left until the call is answered or over."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        logger.info("server.draining", calls=len(self.calls), connections=len(self.connections))
        while True:
            ringing = {c for c, h in self.calls.items() if h.call.state is core.CallState.RINGING}
            for conn in list(self.connections):
                if conn.closing or conn.calls & ringing or conn.legs & ringing:
                    continue
                await conn.send(wire.ReconnectNotice())
                await self._drop(conn, CloseCode.SERVICE_RESTART, "server draining; connect again")
            remaining = deadline - loop.time()
            if not self.calls or remaining <= 0:
                break
            self._calls_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._calls_changed.wait(), remaining)
        logger.info("server.drained", calls_left=len(self.calls))

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._beater is not None:
            self._beater.cancel()
        conns = list(self.connections)
        await asyncio.gather(
            *(c.close(CloseCode.GOING_AWAY, "server shutting down") for c in conns), return_exceptions=True
        )
        for task in list(self._tasks):
            task.cancel()

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """Run work started from a timer callback, keeping a reference so it is neither lost nor collected."""

        async def run() -> None:
            try:
                await coro
            except SipLiteError as exc:
                logger.warning("task.failed", error=exc.error, detail=exc.detail)
            except Exception:
                logger.exception("task.crashed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule_sweep(self) -> None:
        interval = self.settings.presence_ttl / 3
        self._sweeper = self.clock.call_at(self.clock.now() + interval, self._sweep_due)

    def _sweep_due(self) -> None:
        self.last_sweep = self.spawn(self.sweep())
        self._schedule_sweep()

    async def sweep(self) -> None:
        """Refresh this node's bindings in the store (one round trip) and close connections gone silent.

        Bindings live `presence_ttl` seconds in the store and are refreshed every third of it, so a node that dies
        leaves nothing behind for longer than `presence_ttl`.
        """
        now = self.clock.now()
        ttl = self.settings.presence_ttl
        silent = [c for c in self.bound.values() if now - c.last_seen > ttl]
        for conn in silent:
            logger.info("conn.keepalive_timeout", conn_id=conn.conn_id, user_id=conn.user_id)
            await self._drop(conn, CloseCode.TIMEOUT, "no keepalive within the registration expiry")
        live = [
            Binding(user, device, c.conn_id, self.node_id, now + ttl) for (user, device), c in self.bound.items()
        ]
        if live:
            lost = await self.store.refresh(live)
            for binding in lost:
                await self._restore(binding)

    async def _restore(self, binding: Binding) -> None:
        """Register again a live connection whose binding the store lost (Redis restarted empty, or this node
        could not refresh it in time), with its push binding, and hand it anything queued for it."""
        conn = self.bound.get((binding.user_id, binding.device_id))
        if conn is None or conn.conn_id != binding.conn_id or conn.closing:
            return
        device = Device(binding.user_id, binding.device_id, conn.push, self.clock.now())
        registered = await self.store.register(binding, device, self.settings.max_devices_per_user)
        logger.info(
            "presence.restored", user_id=binding.user_id, device_id=binding.device_id, conn_id=conn.conn_id
        )
        for notice in registered.notices:
            await conn.send(_notice_frame(notice))

    # ------------------------------------------------------------------------------------------ connections

    def opened(self, conn: Connection) -> None:
        now = self.clock.now()
        conn.last_seen = now
        self.connections.add(conn)
        conn.timers.append(
            self.clock.call_at(now + self.settings.register_timeout, lambda: self._register_deadline(conn))
        )
        logger.debug("conn.opened", conn_id=conn.conn_id, encoding=conn.encoding.value)

    def _register_deadline(self, conn: Connection) -> None:
        if conn.identity is None and not conn.closing:
            self.spawn(conn.close(CloseCode.TIMEOUT, "no REGISTER in time"))

    async def _drop(self, conn: Connection, code: int, message: str) -> None:
        await self.closed(conn)
        await conn.close(code, message)

    async def closed(self, conn: Connection) -> None:
        """The connection ended: end or cancel what it took part in, then forget its binding."""
        if conn.cleaned:
            return
        conn.cleaned = True
        conn.closing = True
        for timer in conn.timers:
            timer.cancel()
        for call_id in list(conn.calls):
            handle = self.calls.get(call_id)
            if handle is not None:
                await self._step(handle, core.CallerLost())
        for call_id in list(conn.legs):
            handle = self.calls.get(call_id)
            if handle is not None and conn.device_id is not None:
                await self._step(handle, core.LegLost(conn.device_id))
        for call_id, remote in list(conn.remote_calls.items()):
            await self.publish(remote.owner, self._leg_message("lost", conn, call_id))
        conn.remote_calls.clear()
        if conn.identity is not None and conn.device_id is not None:
            key = (conn.identity.user_id, conn.device_id)
            if self.bound.get(key) is conn:
                del self.bound[key]
                try:
                    await self.store.unregister(key[0], key[1], conn.conn_id)
                except StoreUnavailable as exc:
                    logger.warning("presence.unregister_failed", user_id=key[0], device_id=key[1], error=str(exc))
        logger.debug("conn.closed", conn_id=conn.conn_id, user_id=conn.user_id)
        conn.finished.set()

    # ------------------------------------------------------------------------------------------ the bus

    async def _on_bus(self, message: Message) -> None:
        """One message from another node (see `signaling.bus`). Never raises."""
        op = message.get("op")
        try:
            if op == "deliver":
                await self._bus_deliver(message)
            elif op == "frame":
                await self._bus_frame(message)
            elif op == "lost":
                await self._bus_lost(message)
            elif op == "connected":
                await self._bus_connected(message)
            elif op == "replaced":
                await self._bus_replaced(message)
            else:
                logger.warning("bus.unknown_op", op=op)
        except (KeyError, TypeError, ValueError) as exc:
            logger.error("bus.bad_message", op=op, error=f"{type(exc).__name__}: {exc}")
        except Exception:
            logger.exception("bus.crashed", op=op)

    def _local(self, message: Message) -> Connection | None:
        """The connection a message names, if this node still holds it."""
        conn = self.bound.get((message["user"], message["device"]))
        return conn if conn is not None and conn.conn_id == message["conn"] and not conn.closing else None

    def _peer(self, message: Message, node_id: str | None = None) -> RemotePeer:
        node = node_id or message["from"]
        return RemotePeer(self, node, _remote_identity(message["user"]), message["device"], message["conn"])

    async def _bus_deliver(self, message: Message) -> None:
        """A frame from a call's owner for a device connected here."""
        frame: dict[str, object] = message["frame"]
        kind, call_id = frame.get("type"), frame.get("call_id")
        conn = self._local(message)
        if conn is None:
            # The socket is gone: tell the owner, unless the frame was ending the call for this device anyway.
            if isinstance(call_id, str) and kind not in ("cancel", "bye", "response", "error", "ended", "missed"):
                lost = {"op": "lost", "call": call_id, "user": message["user"], "device": message["device"]}
                await self.publish(message["from"], {**lost, "conn": message["conn"]})
            return
        if isinstance(call_id, str):
            if kind == "invite":
                conn.remote_calls[call_id] = RemoteCall(message["from"], RemoteStage.OFFERED)
            elif kind == "response" and frame.get("method") == "invite" and frame.get("code") == 200:
                pass  # the caller's answer (this connection is a re-attached caller)
            elif kind in ("cancel", "bye") or (kind == "response" and frame.get("method") == "bye"):
                conn.remote_calls.pop(call_id, None)
        await conn.send_map(frame)

    async def _bus_frame(self, message: Message) -> None:
        """A frame a device on another node sent about a call this node owns, as the device sent it."""
        frame = wire.decode(message["data"])
        if not isinstance(frame, _FORWARDED):
            raise ValueError(f"{type(frame).__name__} is not forwarded")
        handle = self.calls.get(message["call"])
        sender = self._remote_party(handle, message) or self._peer(message)
        # A device that is (no longer) a party of this call on that connection is a stranger here: it gets 481.
        await self._dispatch(sender, frame)

    def _remote_party(self, handle: CallHandle | None, message: Message) -> RemotePeer | None:
        """The caller or leg of `handle` that the message's connection on another node is, if any."""
        if handle is None:
            return None
        for party in (handle.caller, handle.legs.get(message["device"])):
            if (
                isinstance(party, RemotePeer)
                and party.conn_id == message["conn"]
                and (party.user_id, party.device_id) == (message["user"], message["device"])
            ):
                return party
        return None

    async def _bus_lost(self, message: Message) -> None:
        handle = self.calls.get(message["call"])
        party = self._remote_party(handle, message)
        if handle is None or party is None:
            return
        await self._step(handle, core.CallerLost() if party is handle.caller else core.LegLost(party.device_id))

    async def _bus_connected(self, message: Message) -> None:
        """A device this node woke for a call registered on another node: offer it the call there. If the call
        has ended, the device may have registered while its notices were being written: hand them over."""
        peer = self._peer(message, message["node"])
        if message["call"] in self.calls:
            await self._attach(peer, message["call"])
            return
        for notice in await self.store.take_notices(peer.user_id, peer.device_id):
            await peer.send(_notice_frame(notice))

    async def _bus_replaced(self, message: Message) -> None:
        """The device of a connection here registered on another node: move its calls there, then close it."""
        conn = self._local(message)
        if conn is None:
            return
        moved = RemotePeer(
            self,
            message["node"],
            conn.identity or _remote_identity(message["user"]),
            message["device"],
            message["to_conn"],
        )
        ringing = [c for c in (*conn.legs, *conn.calls) if c in self.calls]
        elsewhere = dict(conn.remote_calls)
        conn.legs.clear()
        conn.calls.clear()
        conn.remote_calls.clear()
        logger.info("presence.replaced", user_id=moved.user_id, device_id=moved.device_id, conn_id=conn.conn_id)
        await self._drop(conn, CloseCode.REPLACED, "device registered on another connection")
        for call_id in ringing:
            await self._attach(moved, call_id)
        for call_id, remote in elsewhere.items():
            connected = {"op": "connected", "call": call_id, "user": moved.user_id, "device": moved.device_id}
            await self.publish(remote.owner, {**connected, "conn": moved.conn_id, "node": moved.node_id})

    # ------------------------------------------------------------------------------------------ frames

    async def receive(self, conn: Connection, data: bytes | str) -> None:
        """Handle one frame, answering every failure with its documented error. Never raises."""
        frame: wire.Inbound | None = None
        try:
            wait = conn.bucket.take(self.clock.now())
            frame = wire.decode(data)
            if wait:
                raise RateLimited("too many frames; slow down", retry_after=wire.retry_after(wait))
            conn.last_seen = self.clock.now()
            if not isinstance(frame, wire.Reply):
                if frame.seq <= conn.last_seq:
                    raise StaleSequence(
                        f"seq {frame.seq} is not greater than the previous request's {conn.last_seq}"
                    )
                conn.last_seq = frame.seq
        except PeerError as exc:
            await self._reject(conn, frame, exc)
            return
        except Exception:
            logger.exception("frame.crashed", conn_id=conn.conn_id, user_id=conn.user_id)
            await self._reject(conn, frame, InternalError("internal error; the request was not carried out"))
            return
        owner = self._owner_elsewhere(conn, frame)
        if owner is not None:
            await self._forward(conn, owner, frame, data)
            conn.errors = 0
            return
        await self._dispatch(conn, frame)

    async def _dispatch(self, sender: Party, frame: wire.Inbound) -> None:
        """Carry out one decoded frame from a connection here or a device on another node; never raises."""
        try:
            await self._handlers[type(frame)](sender, frame)
            if isinstance(sender, Connection):
                sender.errors = 0
        except PeerError as exc:
            await self._reject(sender, frame, exc)
        except StoreUnavailable as exc:
            logger.error("store.unavailable", error=str(exc))
            exc.extra.setdefault("retry_after", _STORE_RETRY_AFTER)
            await self._reject(sender, frame, exc)
        except Draining as exc:
            await self._reject(sender, frame, exc)
        except Exception:
            logger.exception("frame.crashed", conn_id=sender.conn_id, user_id=sender.user_id)
            await self._reject(sender, frame, InternalError("internal error; the request was not carried out"))

    def _owner_elsewhere(self, conn: Connection, frame: wire.Inbound) -> str | None:
        """The node that owns the call `frame` is about, when it is another node's call this device rings for."""
        if not isinstance(frame, _FORWARDED) or frame.call_id in self.calls:
            return None
        remote = conn.remote_calls.get(frame.call_id)
        return remote.owner if remote is not None else None

    async def _forward(self, conn: Connection, owner: str, frame: wire.Inbound, data: bytes | str) -> None:
        """Pass a device's frame to the call's owner as the device sent it; the owner answers over the bus."""
        assert isinstance(frame, _FORWARDED)
        self._registered(conn)
        if isinstance(frame, wire.Reply) and frame.method is wire.Method.INVITE:
            if frame.code >= 300:
                conn.remote_calls.pop(frame.call_id, None)  # the device is done with the call
            elif frame.code >= 200:
                conn.remote_calls[frame.call_id].stage = RemoteStage.PARTY
        await self.publish(owner, {**self._leg_message("frame", conn, frame.call_id), "data": data})

    def _leg_message(self, op: str, conn: Connection, call_id: str) -> Message:
        return {"op": op, "call": call_id, "user": conn.user_id, "device": conn.device_id, "conn": conn.conn_id}

    async def _reject(self, conn: Party, frame: wire.Inbound | None, exc: SipLiteError) -> None:
        if frame is not None:
            exc.seq = frame.seq
            exc.call_id = getattr(frame, "call_id", None)
            if not isinstance(frame, wire.Reply):
                exc.method = _method_of(frame)
        out: wire.Outbound
        field_name = exc.extra.get("field")
        if isinstance(frame, wire.Reply) or exc.seq is None or exc.method is None:
            out = wire.ErrorNotice(
                exc.code,
                exc.error,
                exc.detail,
                exc.seq,
                exc.call_id,
                field_name if isinstance(field_name, str) else None,
            )
        else:
            retry = exc.extra.get("retry_after")
            out = wire.Response(
                exc.seq,
                exc.method,
                exc.code,
                exc.call_id,
                error=exc.error,
                detail=exc.detail,
                field=field_name if isinstance(field_name, str) else None,
                retry_after=retry if isinstance(retry, float) else None,
            )
        await conn.send(out)
        if not isinstance(conn, Connection):
            return  # its own node counts its errors
        if isinstance(exc, AuthenticationFailed):
            await self._drop(conn, CloseCode.UNAUTHORIZED, exc.detail)
            return
        if isinstance(exc, PeerError):
            conn.errors += 1
            if conn.errors >= self.settings.max_consecutive_errors:
                logger.info("conn.too_many_errors", conn_id=conn.conn_id, user_id=conn.user_id)
                await self._drop(conn, CloseCode.POLICY_VIOLATION, "too many bad frames")

    # ------------------------------------------------------------------------------------------ registration

    async def _on_register(self, conn: Connection, req: wire.Register) -> None:
        identity = self.verifier.verify(req.token)
        if conn.identity is not None and (
            identity.user_id != conn.identity.user_id or req.device_id != conn.device_id
        ):
            raise Forbidden("this connection is registered as another user or device; open a new connection")
        now = self.clock.now()
        ttl = self.settings.presence_ttl
        binding = Binding(identity.user_id, req.device_id, conn.conn_id, self.node_id, now + ttl)
        # A token renewal on the same connection may leave `push` out: it keeps the binding it registered with.
        push = req.push if req.push is not None or conn.identity is None else conn.push
        device = Device(identity.user_id, req.device_id, push, now)
        key = (identity.user_id, req.device_id)
        before = self.bound.get(key)
        registered = await self.store.register(binding, device, self.settings.max_devices_per_user)
        replaced = registered.replaced
        notices = registered.notices
        previous = self.bound.get(key)
        if previous is not None and previous is not conn and previous is not before:
            # Another socket of this device registered while this REGISTER was in the store, and its write may
            # have landed after ours: this connection is the one that stays, so the store must name it.
            notices += (await self.store.register(binding, device, self.settings.max_devices_per_user)).notices
            previous = self.bound.get(key)
        first = conn.identity is None
        conn.identity = identity
        conn.device_id = req.device_id
        conn.push = push
        self.bound[key] = conn
        for timer in conn.timers:
            timer.cancel()
        conn.timers = [self.clock.call_at(identity.expires_at, lambda: self._token_expired(conn))]
        await conn.send(
            wire.Response(
                req.seq,
                wire.Method.REGISTER,
                200,
                user=identity.user_id,
                device_id=req.device_id,
                expires=int(ttl),
            )
        )
        for notice in notices:
            await conn.send(_notice_frame(notice))
        rejoin: list[str] = []
        if previous is not None and previous is not conn:
            # Calls on the old socket move to the new one (the device reconnected, or its old socket had gone
            # stale and it was pushed); the old socket then closes without taking them down.
            rejoin += [c for c in (*previous.legs, *previous.calls) if c in self.calls]
            previous.legs.clear()
            previous.calls.clear()
            logger.info("presence.replaced", user_id=key[0], device_id=key[1], conn_id=previous.conn_id)
            await self._drop(previous, CloseCode.REPLACED, "device registered on another connection")
        elif replaced is not None and replaced.node_id != self.node_id:
            # The old connection is on another node: it closes it, and moves the calls it rang for to this one.
            logger.info("presence.replaced_remote", user_id=key[0], device_id=key[1], node_id=replaced.node_id)
            message = {"op": "replaced", "user": key[0], "device": key[1], "conn": replaced.conn_id}
            await self.publish(replaced.node_id, {**message, "node": self.node_id, "to_conn": conn.conn_id})
        if first:
            rejoin += sorted(self.waking.pop(key, set()))
            rejoin += sorted(self.parties.get(key, ()))
            await self._claim_remote_calls(conn, [r for r in registered.waking if r.node_id != self.node_id])
        for call_id in dict.fromkeys(rejoin):
            await self._attach(conn, call_id)
        logger.info("presence.registered", user_id=key[0], device_id=key[1], conn_id=conn.conn_id)

    async def _claim_remote_calls(self, conn: Connection, refs: list[CallRef]) -> None:
        """Calls other nodes wake this device for, or that it is a party of: ask each owner to offer or
        re-attach them here (what the device then says about them is forwarded there). A call whose owner has
        died ends here and now, with the frame the device needs (`ended` and `missed`, or `bye`)."""
        if not refs:
            return
        dead = await self.store.heartbeat(self.node_id, self.settings.node_ttl, {r.node_id for r in refs})
        for ref in refs:
            stage = RemoteStage.PARTY if ref.party else RemoteStage.WAKING
            remote = RemoteCall(ref.node_id, stage, ref)
            if ref.node_id in dead:
                await self._orphaned(conn, ref.call_id, remote)
                continue
            conn.remote_calls[ref.call_id] = remote
            connected = {**self._leg_message("connected", conn, ref.call_id), "node": self.node_id}
            await self.publish(ref.node_id, connected)

    async def _orphaned(self, conn: Connection, call_id: str, remote: RemoteCall) -> None:
        """Tell a device here that a call died with the node that owned it (its caller was there)."""
        now = self.clock.now()
        logger.info("call.owner_gone", call_id=call_id, node_id=remote.owner, stage=remote.stage.value)
        if remote.stage is RemoteStage.WAKING and remote.ref is not None:
            ref = remote.ref
            await conn.send(
                wire.EndedNotice(
                    call_id, wire.CallKitReason.REMOTE_ENDED, ref.caller_id, ref.caller_name, ref.video, now
                )
            )
            await conn.send(wire.MissedNotice(call_id, ref.caller_id, ref.caller_name, ref.video, now))
        elif remote.stage is RemoteStage.OFFERED:
            await conn.send(wire.CancelNotice(call_id, wire.EndReason.CALLER_GONE))
        else:
            await conn.send(wire.ByeNotice(call_id, wire.EndReason.PEER_GONE))

    async def _attach(self, party: Party, call_id: str) -> None:
        """A device that took part in a call, or was being woken for it, registered on a new connection: the
        call moves to it. A ringing callee device is offered the call again; a party of an answered call is
        re-attached, and both parties hear of it if it had been seen to drop."""
        handle = self.calls.get(call_id)
        if handle is None or party.device_id is None:
            return
        call = handle.call
        if (party.user_id, party.device_id) == (call.caller_user, call.caller_device):
            old = handle.caller
            if old.conn_id == party.conn_id:
                return
            if isinstance(old, Connection):
                old.calls.discard(call_id)
            handle.caller = party
            if isinstance(party, Connection):
                party.calls.add(call_id)
            logger.info("call.reattached", call_id=call_id, user_id=party.user_id, device_id=party.device_id)
            if call.state is not core.CallState.RINGING:
                await self._step(handle, core.PartyReattached(None))
            return
        if call.state is core.CallState.RINGING:
            await self._rejoin(party, call_id)
            return
        if party.user_id != call.callee_user or party.device_id != call.answered_by:
            return
        old_leg = handle.legs.get(party.device_id)
        if old_leg is not None and old_leg.conn_id == party.conn_id:
            return
        if isinstance(old_leg, Connection):
            old_leg.legs.discard(call_id)
        handle.legs[party.device_id] = party
        if isinstance(party, Connection):
            party.legs.add(call_id)
        logger.info("call.reattached", call_id=call_id, user_id=party.user_id, device_id=party.device_id)
        await self._step(handle, core.PartyReattached(party.device_id))

    async def _rejoin(self, conn: Party, call_id: str) -> None:
        """Offer a ringing call to a device that just connected (here or on another node): woken by its push,
        or back on a new socket. A device already offered the call on this very connection is left alone."""
        handle = self.calls.get(call_id)
        if handle is None or conn.device_id is None or conn.user_id != handle.call.callee_user:
            return
        device_id = conn.device_id
        old = handle.legs.get(device_id)
        if old is not None and old.conn_id == conn.conn_id:
            return
        if isinstance(old, Connection):
            old.legs.discard(call_id)
        handle.legs[device_id] = conn
        if isinstance(conn, Connection):
            conn.legs.add(call_id)
        pushed_at = handle.pushed_at.pop(device_id, None)
        logger.info(
            "call.device_connected",
            call_id=call_id,
            device_id=device_id,
            push_to_connect_ms=None if pushed_at is None else round((self.clock.now() - pushed_at) * 1000),
        )
        await self._step(handle, core.DeviceConnected(device_id))

    def _token_expired(self, conn: Connection) -> None:
        if not conn.closing:
            logger.info("conn.token_expired", conn_id=conn.conn_id, user_id=conn.user_id)
            self.spawn(self._drop(conn, CloseCode.UNAUTHORIZED, "token expired; register again with a new token"))

    def _registered(self, conn: Party) -> tuple[Identity, str]:
        if conn.identity is None or conn.device_id is None:
            raise NotRegistered("send REGISTER first")
        return conn.identity, conn.device_id

    async def _on_keepalive(self, conn: Connection, req: wire.Keepalive) -> None:
        self._registered(conn)
        await conn.send(
            wire.Response(req.seq, wire.Method.KEEPALIVE, 200, expires=int(self.settings.presence_ttl))
        )

    # ------------------------------------------------------------------------------------------ calls

    async def _on_invite(self, conn: Connection, req: wire.Invite) -> None:
        identity, device_id = self._registered(conn)
        if self.draining:
            raise Draining("this server is draining; connect again and retry", retry_after=1.0)
        if req.call_id in self.calls:
            raise CallIdInUse(f"call id {req.call_id!r} is in use")
        if len(conn.calls) >= self.settings.max_calls_per_connection:
            raise LimitExceeded(f"at most {self.settings.max_calls_per_connection} outgoing calls per connection")
        await conn.send(wire.Response(req.seq, wire.Method.INVITE, 100, req.call_id))
        now = self.clock.now()
        record = CallRecord(
            call_id=req.call_id,
            caller_user=identity.user_id,
            caller_device=device_id,
            callee_user=req.to,
            node_id=self.node_id,
            phase=CallPhase.RINGING,
            created_at=now,
        )
        opened = await self.store.open_call(record, self.settings.ring_timeout + _RECORD_SLACK)
        if not opened.created or req.call_id in self.calls:
            raise CallIdInUse(f"call id {req.call_id!r} is in use")
        legs: dict[str, Party] = {}
        # Calling yourself rings your other devices, never the one calling.
        elsewhere: set[str] = {device_id} if req.to == identity.user_id else set()
        for binding in opened.callee.bindings:
            if binding.node_id != self.node_id:
                # Live on another node: reached over the bus, never pushed while it answers.
                legs[binding.device_id] = RemotePeer(
                    self, binding.node_id, _remote_identity(binding.user_id), binding.device_id, binding.conn_id
                )
                continue
            target = self.bound.get((binding.user_id, binding.device_id))
            if target is conn:
                continue
            if target is None or target.closing or target.conn_id != binding.conn_id:
                continue  # a binding of ours whose socket is gone: the device is offline (pushed if it can be)
            legs[binding.device_id] = target
        devices = {d.device_id: d for d in opened.callee.devices}
        pushable = {d for d, dev in devices.items() if dev.push is not None and dev.push.voip_token is not None}
        offline = [d for d in devices if d not in legs and d not in elsewhere]
        sleeping = [d for d in offline if d in pushable]
        absent = [d for d in offline if d not in pushable]
        if not legs and not sleeping:
            await self.store.close_call(req.call_id)
            code = 480 if opened.callee.devices else 404
            logger.info("call.unreachable", call_id=req.call_id, user_id=identity.user_id, code=code)
            await conn.send(wire.Response(req.seq, wire.Method.INVITE, code, req.call_id))
            return
        call = core.Call(
            call_id=req.call_id,
            caller_user=identity.user_id,
            caller_device=device_id,
            caller_name=identity.name,
            callee_user=req.to,
            invite_seq=req.seq,
            sdp=req.sdp,
            video=req.video,
            devices=list(legs),
            now=now,
            timeouts=self.timeouts,
            sleeping=sleeping,
            pushable=pushable,
            absent=absent,
        )
        handle = CallHandle(call, record, conn, legs, devices)
        self.calls[req.call_id] = handle
        conn.calls.add(req.call_id)
        for leg in legs.values():
            if isinstance(leg, Connection):
                leg.legs.add(req.call_id)
        # Debug: at info a call writes one line, call.ended, with its outcome (each line costs about as much CPU
        # as relaying a frame).
        logger.debug(
            "call.started", call_id=req.call_id, user_id=identity.user_id, online=len(legs), sleeping=len(sleeping)
        )
        await self._apply(handle, call.start())

    def _handle_for(self, conn: Party, call_id: str) -> tuple[CallHandle, str | None]:
        """The call and the device id the sender acts as (None for the caller). 481 for anyone else."""
        self._registered(conn)
        handle = self.calls.get(call_id)
        if handle is not None:
            if handle.caller is conn:
                return handle, None
            if conn.device_id is not None and handle.legs.get(conn.device_id) is conn:
                return handle, conn.device_id
        raise NoSuchCall(f"no call {call_id!r} on this connection")

    def _caller_only(self, conn: Party, call_id: str) -> CallHandle:
        handle, device_id = self._handle_for(conn, call_id)
        if device_id is not None:
            raise NoSuchCall("only the caller sends this request")
        return handle

    async def _on_ack(self, conn: Party, req: wire.Ack) -> None:
        await self._step(self._caller_only(conn, req.call_id), core.CallerAcked(req.seq))

    async def _on_cancel(self, conn: Party, req: wire.Cancel) -> None:
        await self._step(self._caller_only(conn, req.call_id), core.CallerCancelled(req.seq))

    async def _on_bye(self, conn: Party, req: wire.Bye) -> None:
        handle, device_id = self._handle_for(conn, req.call_id)
        await self._step(handle, core.HangupReceived(req.seq, device_id))

    async def _on_update(self, conn: Party, req: wire.Update) -> None:
        handle, device_id = self._handle_for(conn, req.call_id)
        await self._step(handle, core.UpdateReceived(req.seq, device_id, req.sdp))

    async def _on_ice(self, conn: Party, req: wire.Ice) -> None:
        handle, device_id = self._handle_for(conn, req.call_id)
        await self._step(handle, core.IceReceived(req.seq, device_id, req.ice))

    async def _on_reply(self, conn: Party, reply: wire.Reply) -> None:
        self._registered(conn)
        if (reply.code >= 300 or reply.method is wire.Method.UPDATE) and reply.call_id not in self.calls:
            # A device confirming a CANCEL (487), declining a call that has just ended, or answering an UPDATE
            # that crossed the call's end: nothing is left to do, and it did nothing wrong.
            return
        handle, device_id = self._handle_for(conn, reply.call_id)
        event: core.Event
        if reply.method is wire.Method.UPDATE:
            event = core.UpdateAnswered(device_id, reply.code, reply.sdp)
        elif device_id is None:
            raise NoSuchCall("the caller does not answer its own INVITE")
        elif reply.code < 200:
            event = core.LegProgressed(device_id, reply.code, reply.sdp)
        elif reply.code < 300 and reply.sdp is not None:  # the wire layer requires sdp with every 2xx
            event = core.LegAnswered(device_id, reply.sdp)
        else:
            event = core.LegRejected(device_id, reply.code)
        await self._step(handle, event)

    async def _step(self, handle: CallHandle, event: core.Event) -> None:
        before = handle.call.state
        effects = handle.call.handle(event, self.clock.now())
        if handle.call.state is not before:
            logger.debug(
                "call.state_changed",
                call_id=handle.call.call_id,
                state=handle.call.state.value,
                trigger=type(event).__name__,
            )
        await self._apply(handle, effects)

    async def _apply(self, handle: CallHandle, effects: list[core.Effect]) -> None:
        call_id = handle.call.call_id
        finished = any(isinstance(effect, core.CallFinished) for effect in effects)
        if finished:
            # Off this node's books before anything is awaited: a device that registers from here on finds no
            # call to join and is handed its notices instead (`_record_notices`).
            self._forget(handle)
        notices: list[tuple[str, Notice]] = []
        for effect in effects:
            if isinstance(effect, core.RecordEnded):
                notices.append((effect.device_id, self._notice(handle, NoticeKind.ENDED, effect.reason.value)))
            elif isinstance(effect, core.RecordMissed):
                notices.append((effect.device_id, self._notice(handle, NoticeKind.MISSED, None)))
                if self.settings.missed_call_alerts:
                    self._alert_missed(handle, effect.device_id)
        if notices:
            # Written before the parties hear that the call ended, so that once the caller has its final
            # response, a device that wakes is surely told.
            await self._record_notices(handle, notices)
        for effect in effects:
            if isinstance(effect, core.SendToCaller):
                await handle.caller.send(effect.frame)
            elif isinstance(effect, core.SendToDevice):
                target = handle.legs.get(effect.device_id)
                if target is not None:
                    await target.send(effect.frame)
            elif isinstance(effect, core.StartTimer):
                key = (effect.kind, effect.device_id)
                old = handle.timers.pop(key, None)
                if old is not None:
                    old.cancel()
                fire = functools.partial(self._timer_fired, handle, key)
                handle.timers[key] = self.clock.call_at(effect.at, fire)
            elif isinstance(effect, core.StopTimer):
                timer = handle.timers.pop((effect.kind, effect.device_id), None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(effect, core.SendVoipPush):
                self.waking.setdefault((handle.call.callee_user, effect.device_id), set()).add(call_id)
                self.spawn(self._send_voip_push(handle, effect.device_id))
            elif isinstance(effect, core.CallAnswered):
                for device_id, leg in handle.legs.items():
                    if device_id != effect.device_id and isinstance(leg, Connection):
                        leg.legs.discard(call_id)
                handle.record = replace(handle.record, phase=CallPhase.ANSWERED, answered_by=effect.device_id)
                parties = self._parties(handle)
                for party in parties:
                    self.parties.setdefault(party, set()).add(call_id)
                update = self.store.update_call(handle.record, _ANSWERED_RECORD_TTL, parties=parties)
                self._calls_changed.set()
                await self._store_quietly(update)
            elif isinstance(effect, core.CallFinished):
                pushed = [(handle.call.callee_user, d) for d, leg in handle.call.legs.items() if leg.pushed]
                # The one line a call writes at info: its outcome.
                logger.info(
                    "call.ended",
                    call_id=call_id,
                    caller=handle.call.caller_user,
                    callee=handle.call.callee_user,
                    devices=len(handle.call.legs),
                    pushed=len(pushed),
                    answered_by=handle.call.answered_by,
                    reason=effect.reason.value if effect.reason else None,
                    code=effect.code,
                    duration_ms=round((self.clock.now() - handle.call.created_at) * 1000),
                )
                # The parties' and pushed devices' records of the call go with it.
                parties = list(dict.fromkeys([*self._parties(handle), *pushed]))
                await self._store_quietly(self.store.close_call(call_id, parties=parties))
        if finished:
            # Only once the parties have been told: a drain waiting for its last call lets the process exit now.
            self._calls_changed.set()

    async def _record_notices(self, handle: CallHandle, notices: list[tuple[str, Notice]]) -> None:
        """Queue "ended" and "missed" notices for the callee's devices, then hand them at once to any of those
        devices that registered on this node while they were being written (it found none in the store). The
        store gives each notice out once, so a device never hears of a call twice."""
        user_id = handle.call.callee_user
        try:
            await self.store.add_notices(user_id, notices)
            for device_id in dict.fromkeys(device_id for device_id, _ in notices):
                conn = self.bound.get((user_id, device_id))
                # The connection the call was offered on (a stale socket being woken) is not the woken app.
                if conn is None or conn is handle.legs.get(device_id):
                    continue
                for notice in await self.store.take_notices(user_id, device_id):
                    await conn.send(_notice_frame(notice))
        except StoreUnavailable as exc:
            logger.warning("store.write_failed", call_id=handle.call.call_id, error=str(exc))

    def _notice(self, handle: CallHandle, kind: NoticeKind, reason: str | None) -> Notice:
        now = self.clock.now()
        call = handle.call
        # An "ended" notice matters until the push could no longer arrive (its APNs expiry is the ring deadline)
        # and the app, woken at the last moment, has had time to connect; a missed call is kept much longer.
        if kind is NoticeKind.ENDED:
            expires = call.deadline + _ENDED_NOTICE_SLACK
        else:
            expires = now + self.settings.missed_call_ttl
        return Notice(kind, call.call_id, call.caller_user, call.caller_name, call.video, now, expires, reason)

    async def _send_voip_push(self, handle: CallHandle, device_id: str) -> None:
        call = handle.call
        device = handle.devices.get(device_id)
        binding = device.push if device is not None else None
        if binding is None or binding.voip_token is None:
            await self._push_result(handle, core.PushFailed(device_id, certain=True, outcome=Outcome.PERMANENT))
            return
        ttl = call.deadline - self.clock.now() + _RECORD_SLACK
        # The claim also tells whichever node the device registers on that this node wakes it for the call.
        ref = CallRef(call.call_id, self.node_id, False, call.caller_user, call.caller_name, call.video)
        if not await self.store.claim_push(call.call_id, device_id, ttl, waking=(call.callee_user, ref)):
            logger.warning("push.duplicate_suppressed", call_id=call.call_id, device_id=device_id)
            return
        result = await self.push.send_incoming_call(
            IncomingCallPush(
                token=binding.voip_token,
                bundle_id=binding.bundle_id,
                environment=binding.environment,
                call_id=call.call_id,
                caller_id=call.caller_user,
                caller_name=call.caller_name,
                video=call.video,
                sent_at=self.clock.now(),
                deadline=call.deadline,
                user_id=call.callee_user,
                device_id=device_id,
            )
        )
        fields = {
            "call_id": call.call_id,
            "device_id": device_id,
            "outcome": result.outcome.value,
            "status": result.status,
            "reason": result.reason,
            "attempts": result.attempts,
            "duration_ms": round(result.latency * 1000),
        }
        if result.outcome is Outcome.DELIVERED:
            handle.pushed_at[device_id] = self.clock.now()
            logger.info("call.push_accepted", **fields)
            await self._push_result(handle, core.PushAccepted(device_id))
            return
        logger.warning("call.push_failed", **fields)
        if result.outcome is Outcome.TOKEN_REJECTED:
            since = result.token_invalid_since
            await self._store_quietly(self._reject_token(call.callee_user, device_id, binding.voip_token, since))
        certain = result.outcome in (Outcome.TOKEN_REJECTED, Outcome.PERMANENT)
        await self._push_result(handle, core.PushFailed(device_id, certain=certain, outcome=result.outcome))

    async def _reject_token(self, user_id: str, device_id: str, token: str, since: float | None) -> None:
        if await self.store.reject_token(user_id, device_id, token, since):
            logger.info("push.token_removed", user_id=user_id, device_id=device_id, token=token)

    async def _push_result(self, handle: CallHandle, event: core.PushAccepted | core.PushFailed) -> None:
        if self.calls.get(handle.call.call_id) is handle:
            await self._step(handle, event)

    def _alert_missed(self, handle: CallHandle, device_id: str) -> None:
        device = handle.devices.get(device_id)
        binding = device.push if device is not None else None
        if binding is None or binding.alert_token is None:
            return
        alert = MissedCallAlert(
            token=binding.alert_token,
            bundle_id=binding.bundle_id,
            environment=binding.environment,
            call_id=handle.call.call_id,
            caller_id=handle.call.caller_user,
            caller_name=handle.call.caller_name,
            at=self.clock.now(),
            user_id=handle.call.callee_user,
            device_id=device_id,
        )

        async def send() -> None:
            result = await self.push.send_missed_call(alert)
            outcome = result.outcome.value
            logger.info("push.missed_call_alert", call_id=alert.call_id, device_id=device_id, outcome=outcome)

        self.spawn(send())

    def _parties(self, handle: CallHandle) -> list[tuple[str, str]]:
        """(user, device) of the caller and of the answering device, once there is one."""
        call = handle.call
        keys = [(call.caller_user, call.caller_device)]
        if call.answered_by is not None:
            keys.append((call.callee_user, call.answered_by))
        return keys

    def _forget(self, handle: CallHandle) -> None:
        call_id = handle.call.call_id
        self.calls.pop(call_id, None)
        if isinstance(handle.caller, Connection):
            handle.caller.calls.discard(call_id)
        for key in self._parties(handle):
            calls = self.parties.get(key)
            if calls is not None:
                calls.discard(call_id)
                if not calls:
                    del self.parties[key]
        for leg in handle.legs.values():
            if isinstance(leg, Connection):
                leg.legs.discard(call_id)
        for timer in handle.timers.values():
            timer.cancel()
        handle.timers.clear()
        for device_id in handle.call.legs:
            waiting = self.waking.get((handle.call.callee_user, device_id))
            if waiting is not None:
                waiting.discard(call_id)
                if not waiting:
                    del self.waking[(handle.call.callee_user, device_id)]

    async def _store_quietly(self, op: Awaitable[None]) -> None:
        """Store writes after the parties were told: a failure is logged, and the record's TTL cleans up."""
        try:
            await op
        except StoreUnavailable as exc:
            logger.warning("store.write_failed", error=str(exc))

    def _timer_fired(self, handle: CallHandle, key: tuple[core.TimerKind, str | None]) -> None:
        handle.timers.pop(key, None)
        if self.calls.get(handle.call.call_id) is handle:
            self.spawn(self._step(handle, core.TimerFired(*key)))


def _notice_frame(notice: Notice) -> wire.EndedNotice | wire.MissedNotice:
    if notice.kind is NoticeKind.ENDED:
        reason = wire.CallKitReason(notice.reason or wire.CallKitReason.FAILED)
        caller, name = notice.caller_id, notice.caller_name
        return wire.EndedNotice(notice.call_id, reason, caller, name, notice.video, notice.at)
    return wire.MissedNotice(notice.call_id, notice.caller_id, notice.caller_name, notice.video, notice.at)


def _method_of(frame: wire.Inbound) -> str:
    return {
        wire.Register: "register",
        wire.Invite: "invite",
        wire.Ack: "ack",
        wire.Cancel: "cancel",
        wire.Bye: "bye",
        wire.Update: "update",
        wire.Ice: "ice",
        wire.Keepalive: "keepalive",
    }.get(type(frame), "response")


# ---------------------------------------------------------------------------------------------- aiohttp app

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
SWITCHBOARD = web.AppKey("switchboard", Switchboard)


def _choose_encoding(request: web.Request) -> wire.Encoding | None:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if not offered:
        return wire.DEFAULT_ENCODING
    for name in offered:
        if name in wire.SUBPROTOCOLS:
            return wire.SUBPROTOCOLS[name]
    return None


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    board = app[SWITCHBOARD]
    if board.draining:
        raise web.HTTPServiceUnavailable(text="this server is draining; connect to another one")
    encoding = _choose_encoding(request)
    if encoding is None:
        raise web.HTTPBadRequest(
            text="unsupported WebSocket subprotocol; this server speaks " + ", ".join(wire.SUBPROTOCOLS)
        )
    ws = web.WebSocketResponse(
        protocols=tuple(wire.SUBPROTOCOLS),
        heartbeat=settings.heartbeat,
        max_msg_size=settings.max_frame_bytes,
        compress=False,
    )
    await ws.prepare(request)
    conn = Connection(
        ws,
        encoding,
        TokenBucket(settings.rate_limit, settings.rate_burst, board.clock.now()),
        request.transport,
        settings.max_send_buffer,
    )
    board.opened(conn)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.BINARY or msg.type is WSMsgType.TEXT:
                await board.receive(conn, msg.data)
            elif msg.type is WSMsgType.ERROR:
                break
    finally:
        # aiohttp cancels this handler once the peer's socket is gone; the clean-up (ending calls, dropping the
        # binding, telling other nodes) must outlive that, so it runs as a task of its own.
        await asyncio.shield(board.spawn(board.closed(conn)))
    if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
        logger.info("conn.frame_too_large", conn_id=conn.conn_id, user_id=conn.user_id)
    return ws


# Longest a `GET /dev/pushes` long poll may wait.
_DEV_PUSHES_MAX_WAIT: Final = 30.0


async def dev_pushes(request: web.Request) -> web.Response:
    """`GET /dev/pushes?after=N&wait=S` (development provider only): the pushes recorded for the devices of the
    user whose token is in `Authorization: Bearer`, after index N, waiting up to S seconds for one to come."""
    board = request.app[SWITCHBOARD]
    recorder = board.push
    assert isinstance(recorder, DevelopmentProvider)  # the route exists only then
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return _http_error(401, "auth_failed", "send Authorization: Bearer <token>")
    try:
        identity = board.verifier.verify(token.strip())
    except AuthenticationFailed as exc:
        return _http_error(401, exc.error, exc.detail)
    try:
        after = int(request.query.get("after", "0"))
        wait = float(request.query.get("wait", "0"))
    except ValueError:
        return _http_error(400, "invalid_field", "after must be an integer and wait a number of seconds")
    if not 0 <= wait <= _DEV_PUSHES_MAX_WAIT:
        return _http_error(400, "invalid_field", f"wait must be between 0 and {_DEV_PUSHES_MAX_WAIT:g} seconds")

    def mine(record: RecordedPush) -> bool:
        return record.index > after and record.request.user_id == identity.user_id

    found = [r for r in recorder.records if mine(r)]
    if not found and wait > 0:
        with contextlib.suppress(TimeoutError):
            await recorder.wait_for(mine, wait)
            found = [r for r in recorder.records if mine(r)]
    return web.json_response({"pushes": [r.describe() for r in found]})


def _http_error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node_id": request.app[SETTINGS].node_id})


async def readyz(request: web.Request) -> web.Response:
    if request.app[SWITCHBOARD].draining:
        return web.json_response({"status": "draining"}, status=503)
    if await request.app[STORE].ping():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "store unreachable"}, status=503)


def build_store(settings: Settings, clock: Clock) -> Store:
    if settings.redis_url is None:
        return MemoryStore(clock, device_ttl=settings.device_ttl)
    from signaling.store.redis import RedisStore

    return RedisStore(settings.redis_url, clock, prefix=settings.redis_prefix, device_ttl=settings.device_ttl)


def build_bus(store: Store) -> Bus:
    """The bus between nodes: Redis pub/sub beside a Redis store; none for the single-process memory store."""
    from signaling.store.redis import RedisStore

    if isinstance(store, RedisStore):
        return RedisBus(store.url, store.prefix)
    return LocalBus()


# The setting behind each `ApnsConfig` field, so a `PushConfigError` can name what the operator sets.
APNS_SETTINGS: Final[dict[str, str]] = {
    "key_file": "apns_key_file",
    "key_id": "apns_key_id",
    "team_id": "apns_team_id",
    "cert_file": "apns_cert_file",
    "ca_file": "apns_ca_file",
    "production_host": "apns_production_host",
    "sandbox_host": "apns_sandbox_host",
    "production_port": "apns_port",
    "sandbox_port": "apns_port",
    "request_timeout": "push_timeout",
    "max_in_flight": "push_max_in_flight",
    "keepalive_interval": "apns_keepalive",
}


def build_push(settings: Settings, clock: Clock) -> PushProvider:
    """The push provider the settings ask for: APNs with credentials, else the development recorder."""
    if not settings.uses_apns:
        return DevelopmentProvider()
    config = ApnsConfig(
        key_file=Path(settings.apns_key_file) if settings.apns_key_file else None,
        key_id=settings.apns_key_id,
        team_id=settings.apns_team_id,
        cert_file=Path(settings.apns_cert_file) if settings.apns_cert_file else None,
        production_host=settings.apns_production_host,
        production_port=settings.apns_port,
        sandbox_host=settings.apns_sandbox_host,
        sandbox_port=settings.apns_port,
        ca_file=Path(settings.apns_ca_file) if settings.apns_ca_file else None,
        request_timeout=settings.push_timeout,
        keepalive_interval=settings.apns_keepalive or None,
        max_in_flight=settings.push_max_in_flight,
    )
    return ApnsProvider(config, clock=clock.now)


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    clock: Clock | None = None,
    verifier: TokenVerifier | None = None,
    push: PushProvider | None = None,
    bus: Bus | None = None,
) -> web.Application:
    """The SIP-lite application: `/ws` (the protocol), `/healthz`, `/readyz`. Parts may be injected for tests."""
    settings = settings or Settings()
    clock = clock or SystemClock()
    store = store or build_store(settings, clock)
    verifier = verifier or TokenVerifier(
        key=settings.jwt_key(),
        algorithms=settings.algorithms(),
        clock=clock,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
    )
    app = web.Application()
    app[SETTINGS] = settings
    app[STORE] = store
    push = push or build_push(settings, clock)
    bus = bus or build_bus(store)
    board = Switchboard(settings, store, clock, verifier, push, bus)
    app[SWITCHBOARD] = board

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.start()
        logger.info(
            "store.ready",
            backend=type(store).__name__,
            single_process=isinstance(bus, LocalBus),
            node_id=settings.node_id,
        )
        yield
        await store.close()

    async def push_ctx(app: web.Application) -> AsyncIterator[None]:
        await push.start()
        logger.info("push.ready", provider=push.name)
        yield
        await push.close()

    async def board_ctx(app: web.Application) -> AsyncIterator[None]:
        await board.start()
        yield
        await bus.close()

    async def close_sockets(app: web.Application) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(board.stop(), settings.shutdown_timeout)

    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(push_ctx)
    app.cleanup_ctx.append(board_ctx)
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if isinstance(push, DevelopmentProvider):
        app.router.add_get("/dev/pushes", dev_pushes)
    return app
