"""`signaling demo`: the push wake-up story in one process, on loopback only, with a timeline of every stage.

One event loop runs:

- the local APNs stand-in (`push.local_apns`, HTTP/2 over TLS) with a fresh CA and .p8 signing key in a
  temporary directory;
- a real SIP-lite server (`create_app`, in-memory store, system clock) on 127.0.0.1 with a real `ApnsProvider`
  whose endpoints, CA and token-auth key are the stand-in's;
- two clients of the client library: the caller "alice", and "bob-phone", which registers with a VoIP push binding
  and then closes its socket, as iOS does to an app it suspends.

Alice calls bob. The server pushes bob-phone through APNs; once APNs has the push and has accepted it (the caller
hears 183 push_sent), the phone "wakes" after `--wake-delay`, connects, registers, receives the held INVITE,
rings and answers. Alice gets 200, ACKs, talks for `--talk` and hangs up.

Every wait is bounded (`--timeout`, 10 s by default); nothing is synchronised by sleeping: the phone learns of the
push from the stand-in's request record. Times are `time.perf_counter()` milliseconds since the INVITE was sent.
No Redis, no Apple credentials, no network but loopback; nothing is read from the configuration.
"""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import aiohttp
from aiohttp import web

from push.apns import ApnsProvider
from push.local_apns import ApnsServer, RecordedRequest, make_pki
from signaling import log
from signaling.auth import issue_token
from signaling.client import Client, ClientError, ConnectionClosed, Frame, OutgoingCall
from signaling.clock import SystemClock
from signaling.config import Settings
from signaling.server import SWITCHBOARD, Connection, create_app
from signaling.store import MemoryStore

T = TypeVar("T")

BUNDLE_ID: Final = "com.example.app"
CALLER: Final = "alice"
CALLEE: Final = "bob"
PHONE: Final = "bob-phone"
OFFER: Final = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
ANSWER: Final = "v=0\r\no=- 2 1 IN IP4 192.0.2.2\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"

# Every stage of the story, in causal order (the phone's held INVITE and the caller's 183 callee_connected are sent
# together and may arrive in either order).
STAGES: Final = (
    "invite_sent",
    "trying",
    "push_received",
    "push_sent",
    "register_sent",
    "invite_received",
    "callee_connected",
    "ringing",
    "answered",
    "ack",
    "bye",
)
# Latencies reported at the end: name -> (from stage, to stage, what it measures).
LATENCIES: Final = {
    "push_accepted": ("invite_sent", "push_sent", "INVITE sent -> 183 push_sent (APNs accepted the VoIP push)"),
    "push_to_connect": (
        "push_received",
        "callee_connected",
        "push at APNs -> 183 callee_connected (includes the wake delay)",
    ),
    "register_to_invite": ("register_sent", "invite_received", "phone REGISTER sent -> held INVITE at the phone"),
    "invite_to_answer": ("invite_sent", "answered", "INVITE sent -> 200 answered at the caller"),
}


class DemoFailed(Exception):
    """A stage of the demo failed or did not happen in time; the message says which and why."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    wake_delay: float = 0.2  # seconds from the push reaching the phone to the app connecting
    talk: float = 0.5  # seconds between ACK and BYE
    timeout: float = 10.0  # bound on every wait


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    actor: str
    detail: str
    at: float  # time.perf_counter()


@dataclass(slots=True)
class Timeline:
    """The stages as they happen. `on_stage` sees each one at once with its ms since the INVITE, and `on_note`
    each line about the set-up (the text output prints both live)."""

    on_stage: Callable[[Stage, float], None] | None = None
    on_note: Callable[[str], None] | None = None
    stages: list[Stage] = field(default_factory=list)
    started: float | None = None  # perf_counter() when the INVITE was sent

    def note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)

    def mark(self, name: str, actor: str, detail: str, at: float | None = None) -> Stage:
        stage = Stage(name, actor, detail, time.perf_counter() if at is None else at)
        if self.started is None:
            self.started = stage.at
        self.stages.append(stage)
        if self.on_stage is not None:
            self.on_stage(stage, self.ms(stage))
        return stage

    def ms(self, stage: Stage) -> float:
        return (stage.at - (self.started if self.started is not None else stage.at)) * 1000

    def stage(self, name: str) -> Stage:
        """The first stage called `name` (KeyError if it has not happened)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def latencies(self) -> dict[str, float]:
        seen = {stage.name for stage in self.stages}
        return {
            name: round((self.stage(end).at - self.stage(start).at) * 1000, 3)
            for name, (start, end, _) in LATENCIES.items()
            if start in seen and end in seen
        }

    def as_list(self) -> list[dict[str, Any]]:
        return [
            {"stage": s.name, "ms": round(self.ms(s), 3), "actor": s.actor, "detail": s.detail}
            for s in sorted(self.stages, key=lambda s: s.at)
        ]


@dataclass(frozen=True, slots=True)
class DemoResult:
    call_id: str
    apns: str  # host:port of the local APNs
    server: str  # the SIP-lite WebSocket URL
    push: RecordedRequest
    pushes: int  # requests the local APNs received in all
    timeline: Timeline
    options: DemoOptions

    def as_json(self) -> dict[str, Any]:
        headers = self.push.headers
        return {
            "ok": True,
            "call_id": self.call_id,
            "apns": self.apns,
            "server": self.server,
            "options": {"wake_delay": self.options.wake_delay, "talk": self.options.talk},
            "pushes": self.pushes,
            "push": {
                "path": headers.get(":path", "").replace(self.push.token, self.push.token[:6] + "…"),
                "headers": {k: headers.get(k) for k in _PUSH_HEADERS},
                "call_id": _push_call_id(self.push),
                "payload": self.push.payload,
            },
            "stages": self.timeline.as_list(),
            "latency_ms": self.timeline.latencies(),
        }


_PUSH_HEADERS: Final = ("apns-push-type", "apns-topic", "apns-priority", "apns-expiration", "apns-id")


def _push_call_id(request: RecordedRequest) -> str | None:
    payload = request.payload
    if isinstance(payload, dict) and isinstance(payload.get("siplite"), dict):
        call_id = payload["siplite"].get("call_id")
        return call_id if isinstance(call_id, str) else None
    return None


class _Story:
    """The two parties of the call, each a task, sharing the timeline and a few one-shot signals."""

    def __init__(self, options: DemoOptions, timeline: Timeline, apns: ApnsServer, url: str, secret: str) -> None:
        self.options = options
        self.timeline = timeline
        self.apns = apns
        self.url = url
        self.secret = secret
        self.call_id = str(uuid.uuid4())
        self.voip_token = secrets.token_hex(32)
        self.binding: dict[str, Any] = {
            "platform": "ios",
            "bundle_id": BUNDLE_ID,
            "environment": "sandbox",
            "voip_token": self.voip_token,
        }
        loop = asyncio.get_running_loop()
        self.push: asyncio.Future[RecordedRequest] = loop.create_future()
        self.push_accepted = asyncio.Event()
        self.clients: list[Client] = []

    # -- plumbing --

    def token(self, user: str, name: str) -> str:
        return issue_token(user, key=self.secret, now=time.time(), ttl=600.0, name=name)

    async def within(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` for at most the stage timeout, turning every failure into `DemoFailed`."""
        timeout = self.options.timeout
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError:
            raise DemoFailed(f"{what}: did not happen within {timeout:g} s") from None
        except ClientError as exc:  # CallFailed included
            raise DemoFailed(f"{what}: the server answered {exc}") from None
        except ConnectionClosed as exc:
            raise DemoFailed(f"{what}: {exc}") from None
        except (OSError, aiohttp.ClientError) as exc:
            raise DemoFailed(f"{what}: {type(exc).__name__}: {exc}") from None

    async def connect(self, who: str) -> Client:
        client = await self.within(f"{who} connects to {self.url}", Client.connect(self.url))
        client.default_timeout = self.options.timeout
        self.clients.append(client)
        return client

    def on_request(self, request: RecordedRequest) -> None:
        """Called by the local APNs as it records a request: timestamps the push the phone is waiting for."""
        at = time.perf_counter()
        if request.token != self.voip_token or self.push.done():
            return
        headers = request.headers
        shown = " ".join(f"{k}={headers.get(k)}" for k in ("apns-push-type", "apns-topic", "apns-expiration"))
        first = sum(1 for r in self.apns.requests if r.connection == request.connection) == 1
        fresh = " (first request on a new TLS connection)" if first else ""
        detail = f"<- VoIP push {shown} call_id={_push_call_id(request)}{fresh}"
        self.timeline.mark("push_received", "APNs", detail, at)
        self.push.set_result(request)

    # -- before the call --

    async def put_phone_to_sleep(self, server_side_of: Callable[[], Connection | None]) -> None:
        """bob-phone registers with its VoIP binding, then closes its socket, as iOS does to a suspended app."""
        phone = await self.connect(PHONE)
        await self.within(f"{PHONE} REGISTER", phone.register(self.token(CALLEE, "Bob"), PHONE, push=self.binding))
        server_side = server_side_of()
        await phone.close()
        self.clients.remove(phone)
        if server_side is None:
            raise DemoFailed(f"{PHONE} REGISTER: the server answered 200 but holds no binding for it")
        # The server handles the close on its own schedule; wait until it has dropped the binding, or the INVITE
        # could still find the closing socket instead of waking the phone.
        await self.within(f"the server drops {PHONE}'s socket", server_side.finished.wait())

    # -- the call --

    async def caller(self, alice: Client) -> None:
        t = self.timeline
        t.mark("invite_sent", CALLER, f"-> INVITE {CALLEE} call_id={self.call_id}")
        call = await self.within("100 Trying", alice.invite(CALLEE, OFFER, call_id=self.call_id))
        t.mark("trying", CALLER, "<- 100 Trying")
        await self.expect(call, 183, "push_sent")
        t.mark("push_sent", CALLER, "<- 183 push_sent (APNs accepted the VoIP push)")
        self.push_accepted.set()
        await self.expect(call, 183, "callee_connected")
        t.mark("callee_connected", CALLER, f"<- 183 callee_connected ({PHONE} woke and was offered the call)")
        await self.expect(call, 180, "ringing")
        t.mark("ringing", CALLER, "<- 180 ringing")
        answer = await self.expect(call, 200, "answered")
        if answer.get("sdp") != ANSWER:
            raise DemoFailed("200 answered: the SDP answer is not the one the phone sent")
        t.mark("answered", CALLER, f"<- 200 answered (SDP answer, {len(ANSWER)} bytes)")
        await self.within("ACK", call.ack())
        t.mark("ack", CALLER, "-> ACK")
        await asyncio.sleep(self.options.talk)  # the conversation, not synchronisation
        t.mark("bye", CALLER, f"-> BYE after {self.options.talk * 1000:g} ms of talk")
        await self.within("BYE", call.hangup())

    async def expect(self, call: OutgoingCall, code: int, stage: str) -> Frame:
        what = f"{code} {stage}"
        frame = await self.within(what, call.next_response())
        if frame.get("code") != code or frame.get("stage") != stage:
            got = f"{frame.get('code')} {frame.get('stage') or frame.get('reason') or ''}".strip()
            if frame.get("code", 0) >= 300:
                detail = f" ({frame['detail']})" if frame.get("detail") else ""
                raise DemoFailed(f"{what}: the call failed with {got}{detail}")
            raise DemoFailed(f"{what}: the caller got {got} instead")
        return frame

    async def callee(self) -> None:
        t = self.timeline
        request = await self.within("VoIP push at the local APNs", asyncio.shield(self.push))
        self.check_push(request)
        # iOS hands a VoIP push to the app only once APNs has accepted it; the server reports that acceptance to
        # the caller (183 push_sent), so the phone wakes no earlier, whatever the wake delay.
        await self.within("APNs accepts the push", self.push_accepted.wait())
        await asyncio.sleep(self.options.wake_delay)  # the app launching, not synchronisation
        woke = time.perf_counter()
        phone = await self.connect(PHONE)
        wake_ms, connect_ms = self.options.wake_delay * 1000, (time.perf_counter() - woke) * 1000
        t.mark(
            "register_sent",
            PHONE,
            f"-> REGISTER (woken: app started in {wake_ms:g} ms, WebSocket opened in {connect_ms:.1f} ms)",
        )
        await self.within(f"{PHONE} REGISTER", phone.register(self.token(CALLEE, "Bob"), PHONE, push=self.binding))
        incoming = await self.within("held INVITE at the phone", phone.incoming())
        if incoming.call_id != self.call_id or incoming.caller != CALLER:
            raise DemoFailed(f"held INVITE: the phone was offered {incoming.call_id} from {incoming.caller}")
        t.mark("invite_received", PHONE, f"<- held INVITE from {incoming.caller} ({len(incoming.sdp)} bytes SDP)")
        await self.within("180 ringing", incoming.ring())
        await self.within("200 answer", incoming.answer(ANSWER))
        await self.within("ACK at the phone", phone.next_event("ack", call_id=self.call_id))
        bye = await self.within("BYE at the phone", phone.next_event("bye", call_id=self.call_id))
        if bye.get("reason") != "remote_hangup":
            raise DemoFailed(f"BYE at the phone: reason {bye.get('reason')!r}, expected 'remote_hangup'")

    def check_push(self, request: RecordedRequest) -> None:
        if request.error is not None:
            raise DemoFailed(f"VoIP push: the local APNs refused it ({request.error})")
        headers = request.headers
        expected = {"apns-push-type": "voip", "apns-topic": f"{BUNDLE_ID}.voip"}
        for name, value in expected.items():
            if headers.get(name) != value:
                raise DemoFailed(f"VoIP push: {name} is {headers.get(name)!r}, expected {value!r}")
        if _push_call_id(request) != self.call_id:
            raise DemoFailed(f"VoIP push: payload call_id is {_push_call_id(request)!r}, expected {self.call_id}")

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients.clear()


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both; the first failure cancels the other and is raised."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            failure = task.exception() if task in done else None
            if failure is not None:
                raise failure
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run(options: DemoOptions, timeline: Timeline | None = None) -> DemoResult:
    """Run the whole story once, recording it in `timeline`. Raises `DemoFailed` naming the stage that failed or
    timed out."""
    timeline = timeline if timeline is not None else Timeline()
    clock = SystemClock()
    secret = secrets.token_urlsafe(32)
    settings = Settings(
        host="127.0.0.1",
        port=0,
        jwt_secret=secret,
        node_id="demo",
        log_level="warning",
        ring_timeout=max(60.0, 3 * options.timeout + options.wake_delay),
    ).validate()
    with tempfile.TemporaryDirectory(prefix="siplite-demo-") as directory:
        apns = ApnsServer(make_pki(Path(directory)))
        await apns.start()
        runner: web.AppRunner | None = None
        story: _Story | None = None
        try:
            provider = ApnsProvider(apns.config(request_timeout=options.timeout), clock=clock.now)
            app = create_app(settings, store=MemoryStore(clock), clock=clock, push=provider)
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, 0)
            await site.start()
            port = _bound_port(runner)
            url = f"ws://{settings.host}:{port}/ws"
            timeline.note(
                f"local APNs   https://{apns.host}:{apns.port} (HTTP/2 + TLS, fresh CA, ES256 token auth)"
            )
            timeline.note(f"SIP-lite     {url} (in-memory store, real ApnsProvider -> local APNs)")
            story = _Story(options, timeline, apns, url, secret)
            board = app[SWITCHBOARD]
            await story.put_phone_to_sleep(lambda: board.bound.get((CALLEE, PHONE)))
            timeline.note(f"{PHONE:<12} registered with a VoIP push binding, then closed its socket (asleep)")
            remove = apns.add_listener(story.on_request)
            try:
                alice = await story.connect(CALLER)
                await story.within(
                    f"{CALLER} REGISTER", alice.register(story.token(CALLER, "Alice"), "alice-phone")
                )
                # A full collection of the start-up heap (cryptography, aiohttp, h2...) takes tens of ms: have it
                # now rather than in the middle of the timeline.
                gc.collect()
                await _both(story.caller(alice), story.callee())
            finally:
                remove()
            pushes = [r for r in apns.requests if r.token == story.voip_token]
            if len(apns.requests) != 1 or len(pushes) != 1:
                raise DemoFailed(f"expected exactly one VoIP push, the local APNs received {len(apns.requests)}")
            if apns.errors:
                raise DemoFailed(f"the local APNs refused something: {'; '.join(apns.errors)}")
            return DemoResult(
                call_id=story.call_id,
                apns=f"{apns.host}:{apns.port}",
                server=url,
                push=pushes[0],
                pushes=len(apns.requests),
                timeline=timeline,
                options=options,
            )
        finally:
            if story is not None:
                await story.close()
            if runner is not None:
                await runner.cleanup()
            await apns.close()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise DemoFailed("the SIP-lite server did not report the port it listens on")


# ---------------------------------------------------------------------------------------------- output


def _print_stage(out: TextIO) -> Callable[[Stage, float], None]:
    """Print each stage as one line, with the column header before the first."""
    first = True

    def show(stage: Stage, ms: float) -> None:
        nonlocal first
        if first:
            first = False
            print(f"\n{'ms':>9}     {'who':<10} what (ms since the INVITE was sent)", file=out)
        print(f"{ms:9.1f} ms  {stage.actor:<10} {stage.detail}", file=out, flush=True)

    return show


def _print_summary(result: DemoResult, out: TextIO) -> None:
    latencies = result.timeline.latencies()
    print(f"\nOK: one VoIP push, call {result.call_id} answered and hung up. Latencies:", file=out)
    for name, (_, _, what) in LATENCIES.items():
        if name in latencies:
            print(f"  {name.replace('_', ' '):<20}{latencies[name]:9.1f} ms   {what}", file=out)
    out.flush()


def main(
    *,
    wake_delay: float = 0.2,
    talk: float = 0.5,
    timeout: float = 10.0,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`signaling demo`: run the story, print the timeline (text or JSON). 0 on success, 1 on any failure."""
    stdout = out or sys.stdout
    stderr = err or sys.stderr
    # The server's own log would clutter the timeline: warnings and errors only, on stderr.
    log.configure("warning", "auto", stream=stderr, cache=False)
    options = DemoOptions(wake_delay=wake_delay, talk=talk, timeout=timeout)
    timeline = Timeline()
    if not as_json:
        timeline.on_stage = _print_stage(stdout)
        timeline.on_note = lambda text: print(f"  {text}", file=stdout, flush=True)
        print(
            f"SIP-lite push wake-up demo: {CALLER} calls {CALLEE}, whose phone sleeps until a VoIP push wakes it "
            f"(wake delay {wake_delay * 1000:g} ms, talk {talk * 1000:g} ms)",
            file=stdout,
            flush=True,
        )
    try:
        result = asyncio.run(run(options, timeline))
    except KeyboardInterrupt:
        print("signaling demo: interrupted", file=stderr, flush=True)
        return 130
    except (DemoFailed, OSError) as exc:
        message = f"signaling demo: FAILED: {exc}"
    except Exception as exc:
        message = f"signaling demo: FAILED: unexpected {type(exc).__name__}: {exc}"
    else:
        if as_json:
            print(json.dumps(result.as_json(), indent=2), file=stdout, flush=True)
        else:
            _print_summary(result, stdout)
        return 0
    if as_json:
        document = {"ok": False, "error": message, "stages": timeline.as_list()}
        print(json.dumps(document, indent=2), file=stdout, flush=True)
    print(message, file=stderr, flush=True)
    return 1
