"""An asyncio client for the SIP-lite v1 protocol: connect, register, call, answer, hang up, and events.

    async with await Client.connect("ws://127.0.0.1:8080/ws") as alice:
        await alice.register(token, "alice-phone")
        call = await alice.invite("bob", sdp_offer)
        answer = await call.answered()          # waits through 100/180; raises CallFailed on 4xx-6xx
        await call.ack()
        ...
        await call.hangup()

    incoming = await bob.incoming()             # an IncomingCall
    await incoming.ring()
    await incoming.answer(sdp_answer)

Frames the server sends on its own (incoming INVITEs, CANCEL, BYE, ACK, UPDATE, ICE, error notices) are queued
as events: `incoming()` takes the next INVITE; `next_event()` takes the next event of any other kind.
Frames are plain maps, exactly as docs/PROTOCOL.md describes them.

With `Client.connect(url, reconnect=Reconnect(...))`, a connection that drops (the network changed, a server
process went away) is opened again by itself, with jittered exponential backoff, to the same URL or the next of
`Reconnect.urls`, and the device registers again as it did last: calls survive (docs/PROTOCOL.md 6.1) and the
event `{"type": "reconnected", "attempt": n, "url": ...}` is queued. Requests in flight when it dropped get no
answer (they time out). A close the server means (4401 bad token, 4409 replaced, 1008, 1009) is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aiohttp

from signaling import wire

Frame = dict[str, Any]
T = TypeVar("T")


async def dev_pushes(
    url: str,
    token: str,
    *,
    after: int = 0,
    wait: float = 0.0,
    session: aiohttp.ClientSession | None = None,
) -> list[Frame]:
    """The pushes a development server (no APNs configured) recorded for the devices of `token`'s user, after
    index `after`, waiting up to `wait` seconds for one: what a simulated sleeping device watches to "wake up".

    `url` is the server's base URL or its WebSocket URL (`ws://host:port/ws` works). Each push is a map with
    `index`, `kind` ("incoming_call" or "missed_call"), `call_id`, `device_id`, the `apns_*` headers and the
    `payload` APNs would have carried. Raises `aiohttp.ClientResponseError` on 401 or 400."""
    base = url.removesuffix("/ws").replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.get(
            f"{base}/dev/pushes",
            params={"after": str(after), "wait": str(wait)},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            response.raise_for_status()
            body = await response.json()
    finally:
        if own:
            await http.close()
    pushes: list[Frame] = body["pushes"]
    return pushes


class ClientError(Exception):
    """A request was answered with an error status. `response` is the whole response frame."""

    def __init__(self, response: Frame) -> None:
        self.response = response
        self.code: int = response.get("code", 0)
        self.error: str | None = response.get("error")
        super().__init__(f"{self.code} {response.get('reason', '')}: {response.get('detail', '')}".strip())


class CallFailed(ClientError):
    """An outgoing call ended without being answered (404, 480, 486, 487, 408, 603, ...)."""


class ConnectionClosed(Exception):
    """The server closed the connection; `code` is the WebSocket close code."""

    def __init__(self, code: int | None, message: str = "") -> None:
        self.code = code
        super().__init__(f"connection closed ({code}) {message}".strip())


class _Transaction:
    """Responses to one of our requests, provisional and final, in arrival order."""

    def __init__(self, on_final: Callable[[Frame], None] | None = None) -> None:
        self.responses: asyncio.Queue[Frame] = asyncio.Queue()
        self.final: Frame | None = None
        # Run as the final response is read, before any frame after it is queued.
        self.on_final = on_final


# Close codes after which connecting again would not help (docs/PROTOCOL.md 4.3).
FINAL_CLOSE_CODES: Final = frozenset({1000, 1008, 1009, 4401, 4409})


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How a client gets its connection back by itself. Delays are `initial * factor**n` seconds, at most
    `maximum`, each cut by up to half at random (so a crowd that lost one server does not come back at once)."""

    urls: Sequence[str] = ()  # more servers to try, in turn after the one first connected to
    initial: float = 0.25
    factor: float = 2.0
    maximum: float = 5.0
    attempts: int = 30  # then the client gives up and reports the last close
    # Called for a fresh token before each new REGISTER; without it the last token is sent again.
    token: Callable[[], Awaitable[str]] | None = None

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** (attempt - 1)) if attempt > 1 else 0.0
        return base * random.uniform(0.5, 1.0)


class Client:
    """One WebSocket connection to a SIP-lite server. Use `Client.connect()`."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        session: aiohttp.ClientSession | None,
        enc: str,
        *,
        url: str = "",
        protocols: tuple[str, ...] = (),
        reconnect: Reconnect | None = None,
        http: aiohttp.ClientSession | None = None,
    ):
        self._ws = ws
        self._http = http or session
        self._url = url
        self._protocols = protocols
        self._reconnect = reconnect
        self._resuming: asyncio.Task[None] | None = None
        self._closing = False
        # What the last REGISTER sent, to send again after reconnecting.
        self._registration: dict[str, Any] | None = None
        self._session = session
        self._encoding = wire.Encoding(enc)
        self._seq = itertools.count(1)
        self._transactions: dict[int, _Transaction] = {}
        self._incoming: asyncio.Queue[Frame] = asyncio.Queue()
        self._events: asyncio.Queue[Frame] = asyncio.Queue()
        self._closed: asyncio.Future[ConnectionClosed] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._keepalive: asyncio.Task[None] | None = None
        self.user: str | None = None
        self.device_id: str | None = None
        self.default_timeout = 5.0
        # The last frames received, every kind, in arrival order: for debugging and for checking order.
        self.history: deque[Frame] = deque(maxlen=256)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        encoding: str = "msgpack",
        session: aiohttp.ClientSession | None = None,
        protocols: tuple[str, ...] | None = None,
        reconnect: Reconnect | None = None,
    ) -> Client:
        """Open a connection; `encoding` is "msgpack" or "json" (the subprotocol is chosen from it). With
        `reconnect`, the connection comes back by itself when it drops (see the module docstring)."""
        own = session is None
        http = session or aiohttp.ClientSession()
        subprotocols = protocols if protocols is not None else (f"siplite.v1.{encoding}",)
        try:
            ws = await http.ws_connect(url, protocols=subprotocols, autoping=True, max_msg_size=1 << 22)
        except BaseException:
            if own:
                await http.close()
            raise
        return cls(
            ws, http if own else None, encoding, url=url, protocols=subprotocols, reconnect=reconnect, http=http
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------------------------------ plumbing

    def _encode(self, frame: Frame) -> bytes | str:
        return wire.dumps(frame, self._encoding)

    async def send_raw(self, data: bytes | str) -> None:
        """Send bytes (a binary frame) or text as they are: for tests of the server's input checks."""
        if isinstance(data, bytes):
            await self._ws.send_bytes(data)
        else:
            await self._ws.send_str(data)

    async def send(self, frame: Frame) -> None:
        await self.send_raw(self._encode(frame))

    async def _read(self) -> None:
        ws = self._ws
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY or msg.type is aiohttp.WSMsgType.TEXT:
                    frame = wire.loads(msg.data)
                    if isinstance(frame, dict):
                        self.history.append(frame)
                        self._dispatch(frame)
        finally:
            closed = ConnectionClosed(ws.close_code, str(ws.exception() or ""))
            if self._resuming is not None and not self._resuming.done():
                pass  # a connection opened while resuming failed: the resuming task tries the next one
            elif self._should_resume(closed):
                self._resuming = asyncio.get_running_loop().create_task(self._resume(closed))
            elif not self._closed.done():
                self._closed.set_result(closed)

    def _should_resume(self, closed: ConnectionClosed) -> bool:
        return (
            self._reconnect is not None
            and not self._closing
            and self._registration is not None
            and closed.code not in FINAL_CLOSE_CODES
            and not self._closed.done()
        )

    async def _resume(self, closed: ConnectionClosed) -> None:
        """Connect again with backoff, register as before, and queue a "reconnected" event; or give up."""
        policy = self._reconnect
        assert policy is not None and self._registration is not None
        urls = [self._url, *(u for u in policy.urls if u != self._url)]
        http = self._http
        assert http is not None
        for attempt in range(1, policy.attempts + 1):
            await asyncio.sleep(policy.delay(attempt))
            if self._closing:
                break
            url = urls[(attempt - 1) % len(urls)]
            try:
                ws = await http.ws_connect(url, protocols=self._protocols, autoping=True, max_msg_size=1 << 22)
            except (aiohttp.ClientError, OSError) as exc:
                closed = ConnectionClosed(None, f"reconnect to {url} failed: {exc}")
                continue
            self._ws = ws
            self._reader = asyncio.get_running_loop().create_task(self._read())
            registration = dict(self._registration)
            if policy.token is not None:
                registration["token"] = await policy.token()
            event = {"type": "reconnected", "attempt": attempt, "url": url}

            def announce(response: Frame, event: Frame = event) -> None:
                # Queued as the 200 is read, so it comes before what the server sends after it (peer, ...).
                if response.get("code") == 200:
                    self._events.put_nowait(event)

            try:
                await self.final(await self.start_request("register", on_final=announce, **registration))
            except ClientError as exc:
                closed = ConnectionClosed(exc.code, "REGISTER refused after reconnecting")
                if exc.code == 503:
                    continue  # that server is draining or lost its store: try the next
                break
            except (TimeoutError, ConnectionClosed, ConnectionError):
                continue  # this connection failed as well; the reader has started the next attempt or not
            self._url = url
            return
        if not self._closed.done():
            self._closed.set_result(closed)

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "response":
            txn = self._transactions.get(frame.get("seq", -1))
            if txn is not None:
                txn.responses.put_nowait(frame)
                if frame.get("code", 0) >= 200:
                    txn.final = frame
                    if txn.on_final is not None:
                        txn.on_final(frame)
                return
            self._events.put_nowait(frame)
        elif kind == "invite":
            self._incoming.put_nowait(frame)
        else:
            self._events.put_nowait(frame)

    async def _wait(self, awaitable: Awaitable[T], timeout: float | None) -> T:
        """Wait for `awaitable`, failing fast with ConnectionClosed if the connection ends first."""
        task = asyncio.ensure_future(awaitable)
        either: set[asyncio.Future[Any]] = {task, self._closed}
        done, _ = await asyncio.wait(
            either, timeout=timeout or self.default_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            result: T = task.result()
            return result
        task.cancel()
        if self._closed in done:
            raise self._closed.result()
        raise TimeoutError("no answer from the server in time")

    async def request(self, kind: str, *, timeout: float | None = None, **fields: Any) -> Frame:
        """Send a request and return its final response; raises ClientError for a 3xx-6xx final."""
        txn = await self.start_request(kind, **fields)
        return await self.final(txn, timeout=timeout)

    async def start_request(
        self, kind: str, *, on_final: Callable[[Frame], None] | None = None, **fields: Any
    ) -> _Transaction:
        seq = next(self._seq)
        txn = _Transaction(on_final)
        self._transactions[seq] = txn
        await self.send({"type": kind, "seq": seq, **{k: v for k, v in fields.items() if v is not None}})
        return txn

    async def final(self, txn: _Transaction, *, timeout: float | None = None) -> Frame:
        while True:
            frame = await self._wait(txn.responses.get(), timeout)
            if frame["code"] >= 200:
                if frame["code"] >= 300:
                    raise ClientError(frame)
                return frame

    # ------------------------------------------------------------------------------------------ API

    async def register(
        self,
        token: str,
        device_id: str,
        *,
        push: dict[str, Any] | None = None,
        keepalive: bool = False,
    ) -> Frame:
        """Authenticate and bind this device. With `keepalive`, refresh the registration in the background."""
        response = await self.request("register", token=token, device_id=device_id, push=push)
        self._registration = {"token": token, "device_id": device_id, "push": push}
        self.user = response["user"]
        self.device_id = device_id
        if keepalive and self._keepalive is None:
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive(response["expires"] / 3))
        return response

    async def _keep_alive(self, interval: float) -> None:
        while not self._closed.done():
            await asyncio.sleep(interval)
            with contextlib.suppress(ClientError, TimeoutError, ConnectionClosed, ConnectionError):
                await self.request("keepalive")

    async def keepalive(self) -> Frame:
        return await self.request("keepalive")

    async def invite(self, to: str, sdp: str, *, call_id: str | None = None, video: bool = False) -> OutgoingCall:
        """Place a call; returns once the server has said 100 Trying."""
        call_id = call_id or str(uuid.uuid4())
        txn = await self.start_request("invite", call_id=call_id, to=to, sdp=sdp, video=video)
        call = OutgoingCall(self, call_id, txn)
        trying = await self._wait(txn.responses.get(), None)
        call.responses.append(trying)
        if trying["code"] >= 300:
            raise CallFailed(trying)
        return call

    async def incoming(self, timeout: float | None = None) -> IncomingCall:
        frame = await self._wait(self._incoming.get(), timeout)
        return IncomingCall(self, frame)

    async def next_event(
        self, kind: str | None = None, *, timeout: float | None = None, call_id: str | None = None
    ) -> Frame:
        """The next server-initiated frame (other than INVITE); with `kind`, skip to one of that type."""
        while True:
            frame = await self._wait(self._events.get(), timeout)
            if (kind is None or frame.get("type") == kind) and (
                call_id is None or frame.get("call_id") == call_id
            ):
                return frame

    def pending_events(self) -> list[Frame]:
        """Events received and not yet taken (incoming INVITEs included), without waiting."""
        frames: list[Frame] = []
        for queue in (self._incoming, self._events):
            while not queue.empty():
                frames.append(queue.get_nowait())
        return frames

    async def wait_closed(self, timeout: float | None = None) -> ConnectionClosed:
        """Wait until the server closes the connection; returns the close (code and message)."""
        done, _ = await asyncio.wait({self._closed}, timeout=timeout or self.default_timeout)
        if not done:
            raise TimeoutError("the connection is still open")
        return self._closed.result()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def reconnecting(self) -> bool:
        """Whether the connection dropped and the client is getting it back by itself (see `Reconnect`)."""
        return self._resuming is not None and not self._resuming.done()

    async def close(self) -> None:
        self._closing = True
        if self._resuming is not None:
            self._resuming.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if self._session is not None:
            await self._session.close()


class OutgoingCall:
    """A call this client placed."""

    def __init__(self, client: Client, call_id: str, txn: _Transaction) -> None:
        self.client = client
        self.call_id = call_id
        self._txn = txn
        self.responses: list[Frame] = []

    async def next_response(self, timeout: float | None = None) -> Frame:
        """The next response to the INVITE (180, 183, 200 or an error), as it arrives."""
        frame = await self.client._wait(self._txn.responses.get(), timeout)
        self.responses.append(frame)
        return frame

    async def answered(self, timeout: float | None = None) -> Frame:
        """Wait past provisional responses for the 200 (returned), or raise CallFailed with the final error."""
        while True:
            frame = await self.next_response(timeout)
            if frame["code"] >= 300:
                raise CallFailed(frame)
            if frame["code"] >= 200:
                return frame

    async def ack(self) -> None:
        seq = next(self.client._seq)
        await self.client.send({"type": "ack", "seq": seq, "call_id": self.call_id})

    async def cancel(self) -> Frame:
        return await self.client.request("cancel", call_id=self.call_id)

    async def hangup(self) -> Frame:
        return await self.client.request("bye", call_id=self.call_id)

    async def update(self, sdp: str) -> Frame:
        return await self.client.request("update", call_id=self.call_id, sdp=sdp)

    async def ice(self, candidate: str, mid: str | None = None, mline_index: int | None = None) -> Frame:
        return await self.client.request(
            "ice", call_id=self.call_id, candidate=candidate, mid=mid, mline_index=mline_index
        )

    async def answer_update(self, update: Frame, code: int = 200, sdp: str | None = None) -> None:
        """Answer an UPDATE the callee sent (from `next_event("update")`)."""
        await _send_reply(self.client, self.call_id, "update", update["seq"], code, sdp)


async def _send_reply(client: Client, call_id: str, method: str, seq: int, code: int, sdp: str | None) -> None:
    frame: Frame = {"type": "response", "seq": seq, "method": method, "call_id": call_id, "code": code}
    if sdp is not None:
        frame["sdp"] = sdp
    await client.send(frame)


class IncomingCall:
    """An INVITE delivered to this device."""

    def __init__(self, client: Client, frame: Frame) -> None:
        self.client = client
        self.frame = frame
        self.call_id: str = frame["call_id"]
        self.caller: str = frame["from"]
        self.caller_name: str | None = frame.get("from_name")
        self.sdp: str = frame["sdp"]
        self.video: bool = frame.get("video", False)
        self._seq: int = frame["seq"]

    async def _reply(self, code: int, sdp: str | None = None) -> None:
        await _send_reply(self.client, self.call_id, "invite", self._seq, code, sdp)

    async def ring(self) -> None:
        await self._reply(180)

    async def answer(self, sdp: str) -> None:
        await self._reply(200, sdp)

    async def early_media(self, sdp: str) -> None:
        """183 Session Progress with an early-media answer (ringback, announcements): relayed to the caller."""
        await self._reply(183, sdp)

    async def reject(self, code: int = 603) -> None:
        """Decline (603, the default), report busy (486) or refuse the offer (488)."""
        await self._reply(code)

    async def answer_update(self, update: Frame, code: int = 200, sdp: str | None = None) -> None:
        """Answer an UPDATE the caller sent (from `next_event("update")`)."""
        await _send_reply(self.client, self.call_id, "update", update["seq"], code, sdp)

    async def hangup(self) -> Frame:
        return await self.client.request("bye", call_id=self.call_id)

    async def update(self, sdp: str) -> Frame:
        return await self.client.request("update", call_id=self.call_id, sdp=sdp)

    async def ice(self, candidate: str, mid: str | None = None, mline_index: int | None = None) -> Frame:
        return await self.client.request(
            "ice", call_id=self.call_id, candidate=candidate, mid=mid, mline_index=mline_index
        )
