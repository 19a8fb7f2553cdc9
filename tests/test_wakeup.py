"""Push wake-up end to end: a real server socket, real clients, the real aioapns client talking HTTP/2 over TLS to
the local APNs stand-in, over both store backends. Each test is one story a calling app's user would live."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence

import pytest
import structlog

from push.apns import ApnsProvider
from signaling import log
from signaling.client import CallFailed, Client, OutgoingCall
from signaling.clock import ManualClock
from signaling.models import Binding, Device, Notice
from signaling.store import MemoryStore
from signaling.store.base import Registered
from tests.apns_server import Answer, ApnsServer
from tests.conftest import Wake
from tests.harness import ANSWER, OFFER, Harness, make_settings, running

PHONE = "0a" * 32
TABLET = "0b" * 32
CANDIDATE = "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host"
# What a caller trickles while the callee's phone wakes: host, server-reflexive and relay candidates, in order.
CANDIDATES = [
    (CANDIDATE, "0", 0),
    ("candidate:2 1 udp 1686052607 198.51.100.7 50001 typ srflx raddr 192.0.2.1 rport 50000", "0", 0),
    ("candidate:3 1 udp 41885439 203.0.113.9 3478 typ relay raddr 198.51.100.7 rport 50001", "1", 1),
]


def _binding(token: str) -> dict[str, object]:
    return {"platform": "ios", "bundle_id": "com.example.app", "environment": "sandbox", "voip_token": token}


async def woken(sip: Harness, user: str, device_id: str, binding: dict[str, object]) -> Client:
    """The app woke from its push: it connects and registers again, with the binding it had."""
    return await sip.device(user, device_id, push=binding)


async def settled(client: Client) -> list[dict[str, object]]:
    """Every frame the server sent this client so far, other than responses to its own requests: a keepalive
    round trip first, so anything the server sent before answering it has arrived."""
    await client.keepalive()
    return [f for f in client.pending_events() if f["type"] != "response"]


def push_failed(failed: CallFailed, outcome: str) -> None:
    """The caller's final response says why nobody could be reached: a VoIP push failed, with its outcome class,
    and never the device's token."""
    response = failed.response
    assert (response["code"], response["reason"], response["error"]) == (
        480,
        "Temporarily Unavailable",
        "push_failed",
    )
    assert outcome in response["detail"] and PHONE not in response["detail"], response


async def pushed(wake: Wake, call: OutgoingCall) -> dict[str, object]:
    """The caller's 183 "push sent" progress (after its 100 Trying)."""
    progress = await call.next_response()
    assert (progress["code"], progress.get("stage")) == (183, "push_sent"), progress
    return progress


async def calling_a_sleeping_phone(wake: Wake, *, video: bool = False) -> tuple[OutgoingCall, dict[str, object]]:
    """alice calls bob, whose only device, his phone, is asleep; APNs has accepted its push. Returns the call
    and the phone's push binding (to register with once woken)."""
    alice = await wake.sip.device("alice")
    binding = await wake.sip.asleep("bob", "bob-phone", PHONE)
    call = await alice.invite("bob", OFFER, video=video)
    await pushed(wake, call)
    return call, binding


# ---------------------------------------------------------------------------------------------- the story


async def test_sleeping_callee_is_woken_by_a_voip_push_and_answers(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice", name="Alice A.")
    binding = await sip.asleep("bob", "bob-phone", PHONE)

    call = await alice.invite("bob", OFFER, video=True)
    progress = await pushed(wake, call)
    assert progress["at"] == sip.clock.now()

    # APNs got one VoIP push that CallKit can act on at once, expiring at the ring deadline.
    [request] = wake.apns.requests_for(PHONE)
    deadline = sip.clock.now() + sip.settings.ring_timeout
    assert request.headers["apns-push-type"] == "voip"
    assert request.headers["apns-topic"] == "com.example.app.voip"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-expiration"] == str(int(deadline))
    assert request.payload["siplite"] == {
        "v": 1,
        "type": "incoming_call",
        "call_id": call.call_id,
        "call_uuid": call.call_id,  # the client library's call ids are UUIDs already
        "caller_id": "alice",
        "caller_name": "Alice A.",
        "video": True,
        "sent_at": sip.clock.now(),
        "deadline": deadline,
    }

    # The caller trickles its candidates while the phone is still waking: they are held for the phone.
    for candidate, mid, index in CANDIDATES:
        assert (await call.ice(candidate, mid, index))["code"] == 200

    sip.clock.advance(1.5)
    bob = await woken(sip, "bob", "bob-phone", binding)
    incoming = await bob.incoming()
    assert (incoming.call_id, incoming.caller, incoming.sdp, incoming.video) == (
        call.call_id,
        "alice",
        OFFER,
        True,
    )
    held = [await bob.next_event("ice") for _ in CANDIDATES]
    assert [(f["call_id"], f["candidate"], f["mid"], f["mline_index"]) for f in held] == [
        (call.call_id, *candidate) for candidate in CANDIDATES
    ]
    # The held INVITE came right after the REGISTER response, and every candidate, in order, right after it.
    kinds = [(f["type"], f.get("method")) for f in bob.history]
    assert kinds[:5] == [("response", "register"), ("invite", None), ("ice", None), ("ice", None), ("ice", None)]

    connected = await call.next_response()
    assert (connected["code"], connected["stage"], connected["at"]) == (183, "callee_connected", sip.clock.now())

    # Every stage carries the server's time of it, so the caller's app can show where the time went.
    sip.clock.advance(0.25)
    await incoming.ring()
    ringing = await call.next_response()
    assert (ringing["code"], ringing.get("stage"), ringing.get("at")) == (180, "ringing", sip.clock.now())
    sip.clock.advance(3.0)
    await incoming.answer(ANSWER)
    answer = await call.answered()
    assert (answer["sdp"], answer.get("stage"), answer.get("at")) == (ANSWER, "answered", sip.clock.now())
    await call.ack()
    await bob.next_event("ack")
    assert (await call.hangup())["code"] == 200
    assert (await bob.next_event("bye"))["reason"] == "remote_hangup"

    # One push for the whole call, and nothing left behind.
    assert len(wake.apns.requests_for(PHONE)) == 1
    assert not sip.board.calls and not sip.board.waking


async def test_online_devices_ring_while_a_sleeping_one_is_woken_and_joins(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    binding = await sip.asleep("bob", "bob-phone", PHONE)
    tablet = await sip.device("bob", "bob-tablet")

    call = await alice.invite("bob", OFFER)
    on_tablet = await tablet.incoming()
    await on_tablet.ring()
    responses = [await call.next_response(), await call.next_response()]
    assert sorted((r["code"], r.get("stage")) for r in responses) == [(180, "ringing"), (183, "push_sent")]

    phone = await woken(sip, "bob", "bob-phone", binding)
    on_phone = await phone.incoming()
    assert on_phone.call_id == call.call_id
    assert (await call.next_response())["stage"] == "callee_connected"

    # The woken phone answers; the tablet that rang first is told the call was answered elsewhere.
    await on_phone.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert (await tablet.next_event("cancel"))["reason"] == "answered_elsewhere"
    assert len(wake.apns.requests_for(PHONE)) == 1


async def test_callee_with_neither_a_live_device_nor_a_push_token_gets_480_at_once(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    bob = await sip.device("bob")  # registered without any push binding
    await bob.close()
    carol = await sip.device("carol", push={**_binding(PHONE), "voip_token": None, "alert_token": TABLET})
    await carol.close()  # an alert token only: nothing can wake it for a call

    for user in ("bob", "carol"):
        with pytest.raises(CallFailed) as failed:
            await (await alice.invite(user, OFFER)).answered()
        assert failed.value.code == 480
    assert wake.apns.requests == []


async def test_a_woken_phone_plays_early_media_and_the_caller_receives_it(wake: Wake) -> None:
    sip = wake.sip
    call, binding = await calling_a_sleeping_phone(wake)
    phone = await woken(sip, "bob", "bob-phone", binding)
    incoming = await phone.incoming()
    assert (await call.next_response())["stage"] == "callee_connected"

    sip.clock.advance(0.5)
    early = ANSWER + "a=sendonly\r\n"
    await incoming.early_media(early)
    progress = await call.next_response()
    assert (progress["code"], progress["reason"], progress["sdp"], progress["at"]) == (
        183,
        "Session Progress",
        early,
        sip.clock.now(),
    )
    assert "stage" not in progress  # a device's own 183 is early media, not a wake-up stage
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER


async def test_a_woken_phone_that_cannot_accept_the_offer_fails_the_call_with_488(wake: Wake) -> None:
    """The only device refuses the offer (488, say a video call to an audio-only app): the caller gets 488
    Not Acceptable Here, relayed as the device sent it (no `error`), and the phone hears no more of the call."""
    sip = wake.sip
    call, binding = await calling_a_sleeping_phone(wake, video=True)
    phone = await woken(sip, "bob", "bob-phone", binding)
    await (await phone.incoming()).reject(488)
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    response = failed.value.response
    assert (response["code"], response["reason"], response.get("error")) == (488, "Not Acceptable Here", None)
    assert await settled(phone) == []  # no cancel for the device that refused
    assert not sip.board.calls


# ------------------------------------------------------------------------------------------- ending while waking


async def test_caller_cancelling_while_the_phone_wakes_tells_the_phone_and_never_rings_it(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice", name="Alice A.")
    binding = await sip.asleep("bob", "bob-phone", PHONE)
    call = await alice.invite("bob", OFFER)
    await pushed(wake, call)
    assert (await call.cancel())["code"] == 200
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 487

    sip.clock.advance(3)
    bob = await woken(sip, "bob", "bob-phone", binding)
    frames = await settled(bob)
    ended = frames[0]
    assert {k: ended[k] for k in ("type", "call_id", "reason", "from", "from_name", "video")} == {
        "type": "ended",
        "call_id": call.call_id,
        "reason": "remote_ended",
        "from": "alice",
        "from_name": "Alice A.",
        "video": False,
    }
    # The app also gets the missed call for its history; it is never offered the dead call.
    assert [f["type"] for f in frames] == ["ended", "missed"]
    assert bob.history[0]["type"] == "response"  # the REGISTER response came first
    assert len(wake.apns.requests_for(PHONE)) == 1


async def test_answer_elsewhere_while_the_phone_wakes_ends_the_phone_with_answered_elsewhere(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    binding = await sip.asleep("bob", "bob-phone", PHONE)
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    await (await tablet.incoming()).answer(ANSWER)
    await call.answered()
    await call.ack()

    phone = await woken(sip, "bob", "bob-phone", binding)
    frames = await settled(phone)
    assert [(f["type"], f.get("reason")) for f in frames] == [("ended", "answered_elsewhere")]


async def test_decline_elsewhere_while_the_phone_wakes_ends_the_phone_with_declined_elsewhere(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    binding = await sip.asleep("bob", "bob-phone", PHONE)
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    await (await tablet.incoming()).reject(603)
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 603

    phone = await woken(sip, "bob", "bob-phone", binding)
    frames = await settled(phone)
    assert [(f["type"], f.get("reason")) for f in frames] == [("ended", "declined_elsewhere")]


async def test_no_answer_by_the_deadline_gives_408_and_the_late_phone_hears_unanswered(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    binding = await sip.asleep("bob", "bob-phone", PHONE)
    call = await alice.invite("bob", OFFER)
    await pushed(wake, call)

    sip.clock.advance(sip.settings.ring_timeout)
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 408

    # The push may reach the phone at the last moment: it still learns the call ended, once.
    sip.clock.advance(30)
    phone = await woken(sip, "bob", "bob-phone", binding)
    frames = await settled(phone)
    assert [(f["type"], f.get("reason")) for f in frames] == [("ended", "unanswered"), ("missed", None)]
    await phone.close()

    again = await woken(sip, "bob", "bob-phone", binding)
    assert await settled(again) == []


async def test_a_missed_call_reaches_every_device_on_its_next_registration(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice", name="Alice A.")
    binding = await sip.asleep("bob", "bob-phone", PHONE)
    laptop = await sip.device("bob", "bob-laptop")  # no push binding at all
    await laptop.close()
    call = await alice.invite("bob", OFFER)
    await pushed(wake, call)
    await call.cancel()

    sip.clock.advance(3600)  # long after the "ended" notice stopped mattering
    phone = await woken(sip, "bob", "bob-phone", binding)
    laptop = await sip.device("bob", "bob-laptop")
    for device in (phone, laptop):
        frames = await settled(device)
        assert [(f["type"], f["call_id"], f["from"], f.get("from_name")) for f in frames] == [
            ("missed", call.call_id, "alice", "Alice A.")
        ]


# ---------------------------------------------------------------------------------------------- guardrails


async def test_an_online_device_that_never_acknowledges_is_pushed_once_after_the_grace(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    binding = _binding(PHONE)
    stale = await sip.device("bob", "bob-phone", push=binding)  # its socket looks alive, its app is frozen

    call = await alice.invite("bob", OFFER)
    await stale.incoming()  # delivered to the socket, never answered
    sip.clock.advance(sip.settings.ack_grace - 0.1)
    await sip.settle()  # a push the grace timer set off early would have reached APNs by now
    assert wake.apns.requests_for(PHONE) == []
    sip.clock.advance(0.1)
    await pushed(wake, call)
    sip.clock.advance(sip.settings.ack_grace * 5)
    await sip.settle()
    assert len(wake.apns.requests_for(PHONE)) == 1

    # The woken app opens a fresh socket: the stale one is replaced and the call moves to the new one.
    phone = await woken(sip, "bob", "bob-phone", binding)
    incoming = await phone.incoming()
    assert incoming.call_id == call.call_id
    assert (await stale.wait_closed()).code == 4409
    assert (await call.next_response())["stage"] == "callee_connected"
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert len(wake.apns.requests_for(PHONE)) == 1


async def test_a_device_that_acknowledges_in_time_is_never_pushed(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone", push=_binding(PHONE))
    call = await alice.invite("bob", OFFER)
    await (await phone.incoming()).ring()
    assert (await call.next_response())["code"] == 180
    sip.clock.advance(sip.settings.ring_timeout - 1)
    # Whatever the timers set off has run, and the caller's round trip brings any 183 it sent before answering.
    await sip.settle()
    await alice.keepalive()
    assert [f for f in alice.history if f.get("code") == 183] == []
    assert wake.apns.requests == []


async def test_a_woken_device_registering_twice_is_offered_the_call_once(wake: Wake) -> None:
    sip = wake.sip
    call, binding = await calling_a_sleeping_phone(wake)

    phone = await woken(sip, "bob", "bob-phone", binding)
    await phone.incoming()
    await phone.register(sip.token("bob"), "bob-phone", push=binding)  # a token refresh on the same socket
    assert await settled(phone) == []
    assert [r.get("stage") for r in call.responses[1:]] + [(await call.next_response())["stage"]] == [
        "push_sent",
        "callee_connected",
    ]


def invites(client: Client) -> list[str]:
    """The call ids of every INVITE this client's socket received, in order."""
    return [str(f["call_id"]) for f in client.history if f["type"] == "invite"]


async def test_a_woken_device_opening_a_second_socket_gets_the_invite_there_and_only_there(wake: Wake) -> None:
    """The woken app registers, then (restarted by iOS, or reconnecting after a network change) registers again
    on a new socket before answering: the new socket replaces the old one (4409) and receives the held INVITE,
    and the old socket never receives it a second time, so the app never sees a call twice on one socket."""
    sip = wake.sip
    call, binding = await calling_a_sleeping_phone(wake)
    for candidate, mid, index in CANDIDATES[:2]:
        await call.ice(candidate, mid, index)

    first = await woken(sip, "bob", "bob-phone", binding)
    assert (await first.incoming()).call_id == call.call_id
    second = await woken(sip, "bob", "bob-phone", binding)
    assert (await first.wait_closed()).code == 4409
    incoming = await second.incoming()
    assert incoming.call_id == call.call_id
    # The new socket gets the call as a woken one does: the INVITE, then the caller's candidates.
    assert [(f["type"], f.get("candidate")) for f in second.history][:4] == [
        ("response", None),
        ("invite", None),
        ("ice", CANDIDATES[0][0]),
        ("ice", CANDIDATES[1][0]),
    ]
    assert invites(first) == [call.call_id]  # the old socket saw it once, and was closed
    assert [f["type"] for f in await settled(second)] == ["ice", "ice"]  # no second INVITE on the new one

    # The caller heard "callee connected" once; the ringing it hears next comes from the new socket.
    assert (await call.next_response())["stage"] == "callee_connected"
    await incoming.ring()
    assert (await call.next_response())["stage"] == "ringing"
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert len(wake.apns.requests_for(PHONE)) == 1


class GatedRegisterStore(MemoryStore):
    """The in-memory store, except that the REGISTER it writes after `arm()` waits at a gate, just before or just
    after its write (`write_first`): a socket's REGISTER held half-way through the server while another socket
    of the same device registers."""

    def __init__(self, clock: ManualClock, *, write_first: bool) -> None:
        super().__init__(clock)
        self.write_first = write_first
        self.armed = False
        self.held = asyncio.Event()
        self.gate = asyncio.Event()

    async def register(self, binding: Binding, device: Device, max_devices: int) -> Registered:
        if not self.armed:
            return await super().register(binding, device, max_devices)
        self.armed = False
        if self.write_first:
            registered = await super().register(binding, device, max_devices)
            self.held.set()
            await self.gate.wait()
            return registered
        self.held.set()
        await self.gate.wait()
        return await super().register(binding, device, max_devices)


@pytest.mark.parametrize("write_first", [True, False], ids=["held_after_its_write", "held_before_its_write"])
async def test_a_woken_device_registering_on_two_sockets_at_once_gets_the_invite_once_on_the_survivor(
    manual_clock: ManualClock, apns_server: ApnsServer, write_first: bool
) -> None:
    """Two sockets of the same woken device REGISTER at the same moment: the first is held half-way through the
    server while the second registers and is offered the call. One socket replaces the other (4409); the
    survivor holds the call, with the INVITE exactly once, and answers it; the replaced socket saw it at most
    once; and the device stays reachable on the survivor for the next call, without another push."""
    store = GatedRegisterStore(manual_clock, write_first=write_first)
    provider = ApnsProvider(apns_server.config(request_timeout=1.0), clock=manual_clock.now)
    async with running(make_settings(), store, manual_clock, provider) as sip:
        alice = await sip.device("alice")
        binding = await sip.asleep("bob", "bob-phone", PHONE)
        call = await alice.invite("bob", OFFER)
        await pushed(Wake(sip, apns_server), call)

        sockets = [await sip.connect(), await sip.connect()]
        token = sip.token("bob")
        store.armed = True
        held = asyncio.ensure_future(sockets[0].register(token, "bob-phone", push=binding))
        async with asyncio.timeout(5):
            await store.held.wait()
        await sockets[1].register(token, "bob-phone", push=binding)
        store.gate.set()
        await held

        closes = {asyncio.ensure_future(s.wait_closed()): s for s in sockets}
        done, waiting = await asyncio.wait(closes, return_when=asyncio.FIRST_COMPLETED)
        for pending in waiting:
            pending.cancel()
        [closed] = done
        assert closed.result().code == 4409
        replaced = closes[closed]
        [survivor] = [s for s in sockets if s is not replaced]

        incoming = await survivor.incoming()
        assert incoming.call_id == call.call_id
        assert await settled(survivor) == []  # the INVITE once, nothing else
        assert not survivor.closed
        assert invites(replaced) in ([], [call.call_id])
        assert (await call.next_response())["stage"] == "callee_connected"
        await incoming.answer(ANSWER)
        assert (await call.answered())["sdp"] == ANSWER
        await call.ack()
        assert (await call.hangup())["code"] == 200

        # The server and its store agree on which socket is the device: the next call rings it at once.
        again = await alice.invite("bob", OFFER)
        assert (await survivor.incoming()).call_id == again.call_id
        assert len(apns_server.requests_for(PHONE)) == 1


async def test_a_second_call_pushes_again_but_each_call_only_once(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    carol = await sip.device("carol")
    await sip.asleep("bob", "bob-phone", PHONE)
    first = await alice.invite("bob", OFFER)
    second = await carol.invite("bob", OFFER)
    await pushed(wake, first)
    await pushed(wake, second)
    ids = sorted(r.payload["siplite"]["call_id"] for r in wake.apns.requests_for(PHONE))
    assert ids == sorted([first.call_id, second.call_id])


# ---------------------------------------------------------------------------------------------- APNs answers


@pytest.mark.parametrize(
    "answer",
    [
        Answer(400, "BadDeviceToken"),
        Answer(400, "DeviceTokenNotForTopic"),
        Answer(400, "TopicDisallowed"),
        # APNs learnt the token was dead after the device registered it (the test clock starts at 1.8e9 s).
        Answer(410, "Unregistered", timestamp_ms=1_800_000_100_000),
    ],
    ids=["BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed", "Unregistered"],
)
async def test_a_rejected_token_is_removed_and_the_caller_gets_480(wake: Wake, answer: Answer) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    await sip.asleep("bob", "bob-phone", PHONE)
    wake.apns.script(PHONE, answer)
    with pytest.raises(CallFailed) as failed:
        await (await alice.invite("bob", OFFER)).answered()
    push_failed(failed.value, "token_rejected")

    [device] = (await sip.board.store.presence("bob")).devices
    assert device.push is None or device.push.voip_token is None
    with pytest.raises(CallFailed) as again:
        await (await alice.invite("bob", OFFER)).answered()
    # Now nothing can wake the phone: a plain 480, as for a callee with no way to be reached.
    assert (again.value.code, again.value.error) == (480, None)
    assert len(wake.apns.requests_for(PHONE)) == 1  # the dead token is never tried again


async def test_unregistered_before_the_token_was_registered_again_keeps_it(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    # APNs says the token went invalid an hour ago; the app registered it again just now, so it is fresh.
    invalid_since_ms = int((sip.clock.now() - 3600) * 1000)
    await sip.asleep("bob", "bob-phone", PHONE)
    wake.apns.script(PHONE, Answer(410, "Unregistered", timestamp_ms=invalid_since_ms), Answer(200))
    with pytest.raises(CallFailed):
        await (await alice.invite("bob", OFFER)).answered()
    [device] = (await sip.board.store.presence("bob")).devices
    assert device.push is not None and device.push.voip_token == PHONE

    await pushed(wake, await alice.invite("bob", OFFER))


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_a_temporary_apns_error_is_retried_and_delivers_one_push(wake: Wake, status: int) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    await sip.asleep("bob", "bob-phone", PHONE)
    wake.apns.script(
        PHONE, Answer(status, "TooManyRequests" if status == 429 else "InternalServerError"), Answer()
    )
    call = await alice.invite("bob", OFFER)
    await pushed(wake, call)
    answers = [r.answer.status for r in wake.apns.requests_for(PHONE)]
    assert answers == [status, 200]


async def test_apns_not_answering_fails_the_call_with_480_within_the_push_timeout(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    await sip.asleep("bob", "bob-phone", PHONE)
    wake.apns.script(PHONE, Answer(hang=True))
    call = await alice.invite("bob", OFFER)
    with pytest.raises(CallFailed) as failed:
        await call.answered(timeout=5)
    push_failed(failed.value, "temporary")
    # A push that may have been delivered is never sent a second time.
    assert len(wake.apns.requests_for(PHONE)) == 1
    # The phone's token was not APNs's fault: it is kept.
    [device] = (await sip.board.store.presence("bob")).devices
    assert device.push is not None and device.push.voip_token == PHONE


async def test_apns_unreachable_fails_the_call_with_480(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    await sip.asleep("bob", "bob-phone", PHONE)
    await wake.apns.close()  # nothing listens on its port any more
    with pytest.raises(CallFailed) as failed:
        await (await alice.invite("bob", OFFER)).answered(timeout=5)
    push_failed(failed.value, "temporary")


async def test_apns_refusing_our_credentials_fails_the_call_with_480_push_failed(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    await sip.asleep("bob", "bob-phone", PHONE)
    wake.apns.script(PHONE, Answer(403, "InvalidProviderToken"))
    with pytest.raises(CallFailed) as failed:
        await (await alice.invite("bob", OFFER)).answered(timeout=5)
    push_failed(failed.value, "permanent")
    [device] = (await sip.board.store.presence("bob")).devices
    assert device.push is not None and device.push.voip_token == PHONE  # our fault, not the token's


async def test_too_many_pushes_in_flight_fail_the_call_at_once_with_480_push_failed(
    manual_clock: ManualClock, apns_server: ApnsServer
) -> None:
    provider = ApnsProvider(apns_server.config(request_timeout=1.0, max_in_flight=1), clock=manual_clock.now)
    async with running(make_settings(), MemoryStore(manual_clock), manual_clock, provider) as sip:
        alice = await sip.device("alice")
        await sip.asleep("carol", "carol-phone", TABLET)
        await sip.asleep("bob", "bob-phone", PHONE)
        apns_server.script(TABLET, Answer(hang=True))
        to_carol = await alice.invite("carol", OFFER)
        await apns_server.wait_until(lambda: len(apns_server.requests) == 1)  # the one push allowed in flight

        with pytest.raises(CallFailed) as failed:
            await (await alice.invite("bob", OFFER)).answered()
        push_failed(failed.value, "temporary")
        assert provider.in_flight == 1  # at once: carol's push still hangs
        assert apns_server.requests_for(PHONE) == []  # overload failed bob's before it was sent
        assert (await to_carol.cancel())["code"] == 200


async def test_a_failed_push_to_one_device_does_not_end_a_call_ringing_elsewhere(wake: Wake) -> None:
    sip = wake.sip
    alice = await sip.device("alice")
    await sip.asleep("bob", "bob-phone", PHONE)
    binding = await sip.asleep("bob", "bob-tablet", TABLET)
    wake.apns.script(PHONE, Answer(400, "BadDeviceToken"))
    call = await alice.invite("bob", OFFER)
    await pushed(wake, call)
    await wake.apns.wait_until(lambda: len(wake.apns.requests) == 2)

    tablet = await woken(sip, "bob", "bob-tablet", binding)
    await (await tablet.incoming()).answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER


# ---------------------------------------------------------------------------------------------- races


class PausingStore(MemoryStore):
    """The in-memory store, except that `add_notices` waits at a gate: the moment when the server is writing
    a finished call's notices, held open so a device can register right then."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.writing = asyncio.Event()
        self.gate = asyncio.Event()

    async def add_notices(self, user_id: str, notices: Sequence[tuple[str, Notice]]) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().add_notices(user_id, notices)


async def test_a_phone_registering_while_the_ended_call_is_being_recorded_is_told_at_once(
    manual_clock: ManualClock,
) -> None:
    store = PausingStore(manual_clock)
    async with running(make_settings(), store, manual_clock) as sip:
        alice = await sip.device("alice")
        binding = await sip.asleep("bob", "bob-phone", PHONE)
        call = await alice.invite("bob", OFFER)
        assert (await call.next_response())["stage"] == "push_sent"
        cancelling = asyncio.ensure_future(call.cancel())
        async with asyncio.timeout(5):
            await store.writing.wait()

        # The phone's REGISTER runs while the notices are on their way to the store: it takes none.
        phone = await woken(sip, "bob", "bob-phone", binding)
        assert await settled(phone) == []
        store.gate.set()
        assert (await cancelling)["code"] == 200
        ended = await phone.next_event("ended")
        assert (ended["call_id"], ended["reason"]) == (call.call_id, "remote_ended")
        assert (await phone.next_event("missed"))["call_id"] == call.call_id
        assert await settled(phone) == []  # each once, and never the INVITE
        await phone.close()
        again = await woken(sip, "bob", "bob-phone", binding)
        assert await settled(again) == []


# ---------------------------------------------------------------------------------------------- alerts and logs


async def test_a_missed_call_alert_push_goes_to_the_alert_token_and_never_as_voip(
    manual_clock: ManualClock, apns_server: ApnsServer
) -> None:
    provider = ApnsProvider(apns_server.config(request_timeout=1.0), clock=manual_clock.now)
    settings = make_settings(missed_call_alerts=True)
    async with running(settings, MemoryStore(manual_clock), manual_clock, provider) as sip:
        alice = await sip.device("alice", name="Alice A.")
        await sip.asleep("bob", "bob-phone", PHONE, alert_token=TABLET)
        call = await alice.invite("bob", OFFER)
        await pushed(Wake(sip, apns_server), call)
        await call.cancel()
        await apns_server.wait_until(lambda: len(apns_server.requests_for(TABLET)) == 1)

    [alert] = apns_server.requests_for(TABLET)
    assert (alert.headers["apns-push-type"], alert.headers["apns-topic"]) == ("alert", "com.example.app")
    assert alert.payload["aps"]["alert"] == {"title": "Alice A.", "body": "Missed call"}
    assert alert.payload["siplite"]["call_id"] == call.call_id
    assert [r.headers["apns-push-type"] for r in apns_server.requests_for(PHONE)] == ["voip"]


async def test_a_whole_wake_up_logs_no_push_token_and_no_sdp(wake: Wake) -> None:
    buffer = io.StringIO()
    log.configure("debug", "json", stream=buffer, cache=False)
    try:
        sip = wake.sip
        alice = await sip.device("alice")
        binding = await sip.asleep("bob", "bob-phone", PHONE)
        call = await alice.invite("bob", OFFER)
        await pushed(wake, call)
        sip.clock.advance(2.345)  # the phone takes this long to wake and connect
        bob = await woken(sip, "bob", "bob-phone", binding)
        await (await bob.incoming()).answer(ANSWER)
        await call.answered()
        await call.hangup()
    finally:
        structlog.reset_defaults()
    text = buffer.getvalue()
    assert "push.sent" in text
    # The operator sees where the time went: from APNs accepting the push to the phone being offered the call.
    [connected] = [line for line in map(json.loads, text.splitlines()) if line["event"] == "call.device_connected"]
    assert (connected["call_id"], connected["device_id"], connected["push_to_connect_ms"]) == (
        call.call_id,
        "bob-phone",
        2345,
    )
    for secret in (PHONE, "m=audio", "192.0.2.1"):
        assert secret not in text
