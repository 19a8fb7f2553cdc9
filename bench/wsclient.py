"""A minimal WebSocket client on `asyncio.Protocol`, for load generation only.

aiohttp's client costs about as much CPU per frame as a server does, so a load process built on it would be the
bottleneck when measuring a bare relay. This one does only what the benchmark needs: the HTTP upgrade, binary
frames out (masked with an all-zero key, which RFC 6455 permits and which needs no XOR pass), unfragmented
frames in, answering pings, and the close handshake. Received binary payloads go to `on_frame` as bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack

_ZERO_MASK = b"\x00\x00\x00\x00"
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA


def _header(opcode: int, length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length)) + _ZERO_MASK
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 0xFE, length) + _ZERO_MASK
    return struct.pack("!BBQ", 0x80 | opcode, 0xFF, length) + _ZERO_MASK


class HandshakeError(ConnectionError):
    pass


class WsClient(asyncio.Protocol):
    """One client WebSocket. Create it with `connect()`."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        subprotocol: str | None,
        on_frame: Callable[[bytes], None] | None,
    ) -> None:
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            + (f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else "")
            + "\r\n"
        ).encode()
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self.close_code: int | None = None
        self._upgraded = False
        self._buf = bytearray()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Back-to-back small frames (180 then 200, ACK then BYE) must not wait for delayed ACKs.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 16384:
                    self._fail(HandshakeError("oversized handshake response"))
                return
            head = bytes(self._buf[:end])
            rest = bytes(self._buf[end + 4 :])
            self._buf.clear()
            if not head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
                self._fail(HandshakeError(head.split(b"\r\n", 1)[0].decode(errors="replace")))
                return
            self._upgraded = True
            self.opened.set_result(None)
            if rest:
                self._feed(rest)
            return
        self._feed(data)

    # -- frames --

    def _feed(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > n:
                break
            payload = bytes(buf[pos + head : end])
            pos = end
            opcode = b0 & 0x0F
            if opcode in (_OP_BINARY, _OP_TEXT):
                if self.on_frame is not None:
                    self.on_frame(payload)
            elif opcode == _OP_PING:
                self._write(_OP_PONG, payload)
            elif opcode == _OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._write(_OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < n:
            self._buf += buf[pos:]

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_header(opcode, len(payload)) + payload)

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- API --

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, payload: bytes) -> None:
        """Send one binary frame (dropped if the connection is closing)."""
        self._write(_OP_BINARY, payload)

    def send_many(self, *payloads: bytes) -> None:
        """Send several binary frames in one write (one TCP segment when they fit)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(_header(_OP_BINARY, len(p)) + p for p in payloads))

    def send_obj(self, obj: dict[str, Any]) -> None:
        self._write(_OP_BINARY, msgpack.packb(obj))

    async def close(self, timeout: float = 5.0) -> None:
        """Close handshake (1000), then the TCP connection; bounded by `timeout`."""
        if self.transport is None:
            return
        self._write(_OP_CLOSE, struct.pack("!H", 1000))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    path: str = "/ws",
    *,
    subprotocol: str | None = "siplite.v1.msgpack",
    on_frame: Callable[[bytes], None] | None = None,
    timeout: float = 10.0,
) -> WsClient:
    """Open a WebSocket to ws://host:port/path; raises OSError/TimeoutError/HandshakeError."""
    loop = asyncio.get_running_loop()

    async def open_() -> WsClient:
        _, proto = await loop.create_connection(
            lambda: WsClient(host, port, path, subprotocol, on_frame), host, port
        )
        await proto.opened
        return proto

    return await asyncio.wait_for(open_(), timeout)


class QueuedClient:
    """A `WsClient` whose frames are decoded (msgpack) into a queue, for sequential scenarios."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.frames: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.seq = 0
        # perf_counter, not loop.time(): uvloop's loop clock has millisecond resolution.
        ws.on_frame = lambda payload: self.frames.put_nowait((time.perf_counter(), msgpack.unpackb(payload)))

    @classmethod
    async def open(cls, host: str, port: int, path: str = "/ws", *, timeout: float = 10.0) -> QueuedClient:
        return cls(await connect(host, port, path, timeout=timeout))

    def request(self, kind: str, **fields: Any) -> int:
        """Send a request with the next seq; returns the seq."""
        self.seq += 1
        self.ws.send_obj({"type": kind, "seq": self.seq, **fields})
        return self.seq

    async def next(self, timeout: float = 5.0) -> tuple[float, dict[str, Any]]:
        """The next frame and the time (perf_counter) it arrived at."""
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> tuple[float, dict[str, Any]]:
        """Skip frames until one matches `predicate`; raises TimeoutError after `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        while True:
            at, frame = await self.next(max(0.001, deadline - time.monotonic()))
            if predicate(frame):
                return at, frame

    async def response(self, seq: int, *, final: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        """The response to request `seq` (the final one unless `final` is False)."""

        def match(f: dict[str, Any]) -> bool:
            return f.get("type") == "response" and f.get("seq") == seq and (not final or f.get("code", 0) >= 200)

        _, frame = await self.until(match, timeout)
        return frame
