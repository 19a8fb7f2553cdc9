"""Calls between online devices, end to end: real server socket, real clients, both store backends."""

from __future__ import annotations

import asyncio

import pytest

from signaling.client import CallFailed, Client, ClientError, OutgoingCall, Reconnect
from signaling.clock import ManualClock
from signaling.store import MemoryStore
from tests.harness import ANSWER, OFFER, Harness, make_settings, running
from tests.netproxy import Proxy

CANDIDATE = "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host"


async def test_two_party_call_from_invite_to_bye(sip: Harness) -> None:
    alice = await sip.device("alice", name="Alice A.")
    bob = await sip.device("bob")

    call = await alice.invite("bob", OFFER, video=True)
    assert call.responses[0]["code"] == 100

    incoming = await bob.incoming()
    assert incoming.caller == "alice"
    assert incoming.caller_name == "Alice A."
    assert incoming.sdp == OFFER
    assert incoming.video is True
    assert incoming.call_id == call.call_id

    await incoming.ring()
    ringing = await call.next_response()
    assert (ringing["code"], ringing["reason"]) == (180, "Ringing")

    await incoming.answer(ANSWER)
    answer = await call.answered()
    assert answer["code"] == 200
    assert answer["sdp"] == ANSWER

    await call.ack()
    ack = await bob.next_event("ack")
    assert ack["call_id"] == call.call_id

    bye_ok = await call.hangup()
    assert bye_ok["code"] == 200
    bye = await bob.next_event("bye")
    assert bye["reason"] == "remote_hangup"
    assert not sip.board.calls


async def test_callee_hangs_up(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    assert (await incoming.hangup())["code"] == 200
    bye = await alice.next_event("bye")
    assert (bye["call_id"], bye["reason"]) == (call.call_id, "remote_hangup")
    # The call is gone for both: a second BYE is refused.
    with pytest.raises(Exception, match="481"):
        await call.hangup()


async def test_json_and_msgpack_clients_talk_to_each_other(sip: Harness) -> None:
    alice = await sip.device("alice", encoding="json")
    bob = await sip.device("bob", encoding="msgpack")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER


async def test_three_devices_ring_and_first_answer_wins(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    laptop = await sip.device("bob", "bob-laptop")

    call = await alice.invite("bob", OFFER)
    legs = [await d.incoming() for d in (phone, tablet, laptop)]
    assert {leg.call_id for leg in legs} == {call.call_id}

    for leg in legs:
        await leg.ring()
    assert (await call.next_response())["code"] == 180

    await legs[1].answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    for device in (phone, laptop):
        cancel = await device.next_event("cancel")
        assert (cancel["call_id"], cancel["reason"]) == (call.call_id, "answered_elsewhere")

    # The loser's late answer changes nothing: the winner keeps the call.
    await legs[0].answer(ANSWER)
    await call.ack()
    assert (await tablet.next_event("ack"))["call_id"] == call.call_id
    assert sip.board.calls[call.call_id].call.answered_by == "bob-tablet"


async def test_caller_cancels_while_ringing(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    legs = [await phone.incoming(), await tablet.incoming()]
    await legs[0].ring()
    await call.next_response()

    assert (await call.cancel())["code"] == 200
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 487
    for device in (phone, tablet):
        assert (await device.next_event("cancel"))["reason"] == "caller_cancelled"
    assert not sip.board.calls


async def test_decline_on_one_device_declines_everywhere(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    legs = [await phone.incoming(), await tablet.incoming()]
    await legs[0].reject(603)
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 603
    assert (await tablet.next_event("cancel"))["reason"] == "declined_elsewhere"


async def test_busy_on_every_device_gives_486(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    legs = [await phone.incoming(), await tablet.incoming()]
    await legs[0].reject(486)
    await legs[1].reject(486)
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 486


async def test_one_busy_device_does_not_end_the_call(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    legs = [await phone.incoming(), await tablet.incoming()]
    await legs[0].reject(486)
    await legs[1].answer(ANSWER)
    assert (await call.answered())["code"] == 200


async def test_callee_without_devices_gets_480_and_unknown_user_404(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    await bob.close()
    with pytest.raises(CallFailed) as failed:
        await (await alice.invite("bob", OFFER)).answered()
    assert failed.value.code == 480
    with pytest.raises(CallFailed) as unknown:
        await (await alice.invite("nobody", OFFER)).answered()
    assert unknown.value.code == 404


async def test_ring_timeout_gives_408_and_cancels_devices(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.ring()
    await call.next_response()

    sip.clock.advance(sip.settings.ring_timeout - 1)
    assert call.call_id in sip.board.calls
    sip.clock.advance(1)
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 408
    assert (await bob.next_event("cancel"))["reason"] == "no_answer"


async def test_ice_and_update_are_relayed_only_between_the_parties(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    carol = await sip.device("carol")
    call = await alice.invite("bob", OFFER)
    legs = [await phone.incoming(), await tablet.incoming()]

    # Before the answer the caller's candidates reach every ringing device.
    assert (await call.ice("candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host", "0", 0))["code"] == 200
    for device in (phone, tablet):
        ice = await device.next_event("ice")
        assert (ice["candidate"].split()[0], ice["mid"], ice["mline_index"]) == ("candidate:1", "0", 0)

    # A ringing device's early candidates are held back until it wins.
    assert (await legs[1].ice("candidate:9 1 udp 1 192.0.2.9 9 typ host"))["code"] == 200
    assert (await legs[0].ice("candidate:2 1 udp 1 192.0.2.2 2 typ host"))["code"] == 200
    await legs[0].answer(ANSWER)
    await call.answered()
    relayed = await alice.next_event("ice")
    assert relayed["candidate"].startswith("candidate:2 ")
    await call.ack()

    # After the answer: relayed to the answering device only.
    await call.ice("candidate:3 1 udp 1 192.0.2.1 3 typ host")
    assert (await phone.next_event("ice"))["candidate"].startswith("candidate:3 ")
    await legs[0].ice("candidate:4 1 udp 1 192.0.2.2 4 typ host")
    assert (await alice.next_event("ice"))["candidate"].startswith("candidate:4 ")

    # UPDATE (hold) from the caller: relayed to the callee, whose answer returns to the caller.
    update_task = asyncio.create_task(call.update(OFFER + "a=sendonly\r\n"))
    update = await phone.next_event("update")
    assert update["sdp"].endswith("a=sendonly\r\n")
    await legs[0].answer_update(update, 200, ANSWER + "a=recvonly\r\n")
    assert (await update_task)["sdp"].endswith("a=recvonly\r\n")

    # UPDATE from the callee, the other way round.
    update_task = asyncio.create_task(legs[0].update(ANSWER))
    update = await alice.next_event("update")
    await call.answer_update(update, 200, OFFER)
    assert (await update_task)["sdp"] == OFFER

    # Nobody else heard any of it: a round trip on each of their sockets brings anything sent to them before.
    await tablet.keepalive()
    await carol.keepalive()
    assert [f for f in tablet.pending_events() if f["type"] != "cancel"] == []
    assert carol.pending_events() == []


async def test_a_ringing_device_plays_early_media_to_the_caller(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    sip.clock.advance(0.75)
    await incoming.early_media(ANSWER)
    progress = await call.next_response()
    assert (progress["code"], progress["reason"], progress["sdp"], progress["at"]) == (
        183,
        "Session Progress",
        ANSWER,
        sip.clock.now(),
    )
    # Early media is no answer: the call still rings, and the 200 comes with the final answer.
    sip.clock.advance(1.0)
    await incoming.answer(ANSWER + "a=sendrecv\r\n")
    answer = await call.answered()
    assert (answer["sdp"], answer["stage"], answer["at"]) == (
        ANSWER + "a=sendrecv\r\n",
        "answered",
        sip.clock.now(),
    )


async def test_488_reaches_the_caller_once_no_device_is_left_ringing(sip: Harness) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER, video=True)
    await (await phone.incoming()).reject(488)  # the phone cannot take video
    await tablet.incoming()
    # The phone's 488 has been handled (its socket's next request was), and the caller's round trip after it
    # brings any final response it caused: there is none while the tablet rings.
    await phone.keepalive()
    await alice.keepalive()
    assert [f["code"] for f in alice.history if f["type"] == "response" and f.get("method") == "invite"] == [100]

    await tablet.close()
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    response = failed.value.response
    assert (response["code"], response["reason"], response.get("error")) == (488, "Not Acceptable Here", None)


async def test_a_caller_update_while_ringing_reaches_every_ringing_device_and_is_what_gets_answered(
    sip: Harness,
) -> None:
    alice = await sip.device("alice")
    phone = await sip.device("bob", "bob-phone")
    tablet = await sip.device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    legs = [await phone.incoming(), await tablet.incoming()]
    await legs[0].ring()
    assert (await call.next_response())["code"] == 180

    # Alice's network changed: she restarts ICE with a new offer. It is taken at once, without an answer yet.
    restarted = OFFER + "a=ice-ufrag:new1\r\n"
    accepted = await call.update(restarted)
    assert (accepted["code"], accepted["method"], accepted.get("sdp")) == (200, "update", None)
    updates = [await phone.next_event("update"), await tablet.next_event("update")]
    assert [u["sdp"] for u in updates] == [restarted, restarted]

    # The phone's answer to the first offer crossed the update: refused, and the phone keeps ringing.
    await legs[0].answer(ANSWER)
    refused = await phone.next_event("error")
    assert (refused["code"], refused["error"], refused["call_id"]) == (491, "request_pending", call.call_id)
    # It takes the new offer, then answers it; that answer is the one alice gets.
    await legs[0].answer_update(updates[0], 100)
    answer = ANSWER + "a=ice-ufrag:new2\r\n"
    await legs[0].answer(answer)
    assert (await call.answered())["sdp"] == answer
    assert (await tablet.next_event("cancel"))["reason"] == "answered_elsewhere"
    # The tablet's answer to the update, crossing its CANCEL, is taken without a word.
    await legs[1].answer_update(updates[1], 100)
    assert (await tablet.keepalive())["code"] == 200
    assert [f for f in tablet.pending_events() if f["type"] == "error"] == []

    await call.ack()
    assert (await phone.next_event("ack"))["call_id"] == call.call_id
    assert alice.pending_events() == []


async def test_a_device_back_on_a_new_socket_while_ringing_is_offered_the_newest_offer(sip: Harness) -> None:
    alice = await sip.device("alice")
    old = await sip.device("bob", "bob-phone")
    call = await alice.invite("bob", OFFER)
    await old.incoming()
    restarted = OFFER + "a=ice-ufrag:new1\r\n"
    assert (await call.update(restarted))["code"] == 200
    await old.next_event("update")
    new = await sip.device("bob", "bob-phone")  # before it answered the update: the new socket owes nothing
    incoming = await new.incoming()
    assert incoming.sdp == restarted
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER


async def test_update_glare_gets_491(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    first = asyncio.create_task(call.update(OFFER))
    await bob.next_event("update")
    with pytest.raises(Exception, match="491"):
        await incoming.update(ANSWER)
    sip.clock.advance(sip.settings.update_timeout)
    with pytest.raises(Exception, match="408"):
        await first


async def test_caller_disconnect_cancels_ringing_devices(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    await alice.invite("bob", OFFER)
    await bob.incoming()
    await alice.close()
    assert (await bob.next_event("cancel"))["reason"] == "caller_gone"


async def established(sip: Harness) -> tuple[Client, Client, OutgoingCall]:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    await bob.next_event("ack")
    return alice, bob, call


async def test_a_peer_that_drops_and_does_not_come_back_ends_the_call_after_the_grace(sip: Harness) -> None:
    alice, bob, call = await established(sip)
    await bob.close()
    peer = await alice.next_event("peer")
    assert (peer["call_id"], peer["state"]) == (call.call_id, "reconnecting")
    sip.clock.advance(sip.settings.reattach_grace - 0.1)
    await sip.settle()  # a grace timer that fired early would have sent the BYE by now
    await alice.keepalive()
    assert [f for f in alice.pending_events() if f["type"] == "bye"] == []
    sip.clock.advance(0.1)
    bye = await alice.next_event("bye")
    assert (bye["call_id"], bye["reason"]) == (call.call_id, "peer_gone")
    assert not sip.board.calls


async def test_a_callee_whose_socket_drops_mid_call_re_attaches_on_a_new_one(sip: Harness) -> None:
    alice, bob, call = await established(sip)
    await bob.close()
    assert (await alice.next_event("peer"))["state"] == "reconnecting"
    sip.clock.advance(sip.settings.reattach_grace / 2)

    back = await sip.device("bob")  # the phone moved from Wi-Fi to LTE
    assert ((await back.next_event("peer"))["call_id"], (await alice.next_event("peer"))["state"]) == (
        call.call_id,
        "connected",
    )
    sip.clock.advance(sip.settings.reattach_grace)  # the grace timer was stopped
    # The call goes on: ICE restart and UPDATE reach the new socket, and either side can hang up.
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
    assert (await back.next_event("ice"))["candidate"] == CANDIDATE
    assert (await back.request("bye", call_id=call.call_id))["code"] == 200
    assert (await alice.next_event("bye"))["reason"] == "remote_hangup"


async def test_a_caller_whose_socket_drops_mid_call_re_attaches_on_a_new_one(sip: Harness) -> None:
    alice, bob, call = await established(sip)
    await alice.close()
    assert (await bob.next_event("peer"))["state"] == "reconnecting"
    back = await sip.device("alice")
    assert (await back.next_event("peer"))["state"] == "connected"
    assert (await bob.next_event("peer"))["state"] == "connected"
    assert (await back.request("ice", call_id=call.call_id, candidate=CANDIDATE))["code"] == 200
    assert (await bob.next_event("ice"))["candidate"] == CANDIDATE
    assert (await back.request("bye", call_id=call.call_id))["code"] == 200
    assert (await bob.next_event("bye"))["reason"] == "remote_hangup"


async def test_without_a_reattach_grace_a_dropped_peer_ends_the_call_at_once(manual_clock: ManualClock) -> None:
    async with running(make_settings(reattach_grace=0), MemoryStore(manual_clock), manual_clock) as sip:
        alice, bob, call = await established(sip)
        await bob.close()
        bye = await alice.next_event("bye")
        assert (bye["call_id"], bye["reason"]) == (call.call_id, "peer_gone")


async def test_last_ringing_device_disconnecting_gives_480(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    await bob.incoming()
    await bob.close()
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 480


async def test_calling_yourself_rings_your_other_devices_only(sip: Harness) -> None:
    phone = await sip.device("alice", "alice-phone")
    laptop = await sip.device("alice", "alice-laptop")
    call = await phone.invite("alice", OFFER)
    incoming = await laptop.incoming()
    assert incoming.call_id == call.call_id
    await phone.keepalive()  # handled after its INVITE: an offer to itself would have come before the answer
    assert phone.pending_events() == []


async def test_an_update_pending_when_the_call_ends_gets_487(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    update = asyncio.create_task(call.update(OFFER))
    await bob.next_event("update")
    await incoming.hangup()
    with pytest.raises(ClientError) as ended:
        await update
    assert ended.value.code == 487


async def test_a_device_confirming_a_cancel_with_487_is_not_an_error(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await call.cancel()
    await bob.next_event("cancel")
    await incoming.reject(487)
    assert (await bob.keepalive())["code"] == 200
    assert bob.pending_events() == []


async def test_the_client_library_reconnects_by_itself_and_the_call_goes_on(sip: Harness) -> None:
    alice = await sip.device("alice")
    port = int(sip.url.split(":")[2].split("/")[0])
    async with Proxy("127.0.0.1", port) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        bob = await Client.connect(url, reconnect=Reconnect(initial=0.0))
        sip.clients.append(bob)
        await bob.register(sip.token("bob"), "bob-tablet")
        call = await alice.invite("bob", OFFER)
        await (await bob.incoming()).answer(ANSWER)
        await call.answered()
        await call.ack()
        await bob.next_event("ack")

        await proxy.cut()  # the tablet's network goes away mid-call
        assert (await alice.next_event("peer", call_id=call.call_id))["state"] == "reconnecting"
        reconnected = await bob.next_event("reconnected")
        assert reconnected["url"] == url and proxy.connections == 2
        assert (await bob.next_event("peer"))["state"] == "connected"
        assert (await alice.next_event("peer", call_id=call.call_id))["state"] == "connected"
        assert (await bob.request("bye", call_id=call.call_id))["code"] == 200
        assert (await alice.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"


async def test_the_client_library_does_not_reconnect_after_a_final_close(sip: Harness) -> None:
    first = await Client.connect(sip.url, reconnect=Reconnect(initial=0.0))
    sip.clients.append(first)
    await first.register(sip.token("bob"), "bob-phone")
    await sip.device("bob")  # the same device registers elsewhere: the first socket is replaced (4409)
    assert (await first.wait_closed()).code == 4409
    # Whether to come back is decided as the close is read, before `wait_closed()` returns.
    assert not first.reconnecting
    assert [f for f in first.pending_events() if f["type"] == "reconnected"] == []
