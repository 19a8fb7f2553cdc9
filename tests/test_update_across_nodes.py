"""A caller's UPDATE while ringing, when the ringing device is connected to another node than the call's owner:
the new offer, the device's answer to it and the 491 for an answer that crossed it all go over the bus."""

from __future__ import annotations

from signaling.clock import ManualClock
from tests.harness import ANSWER, OFFER
from tests.test_nodes import nodes


async def test_a_ringing_device_on_another_node_gets_the_new_offer_and_answers_it(
    redis_url: str, manual_clock: ManualClock
) -> None:
    async with nodes(redis_url, manual_clock, ("a", "b")) as cluster:
        alice = await cluster["a"].device("alice")
        phone = await cluster["b"].device("bob", "bob-phone")
        tablet = await cluster["a"].device("bob", "bob-tablet")
        call = await alice.invite("bob", OFFER)
        legs = [await phone.incoming(), await tablet.incoming()]

        restarted = OFFER + "a=ice-ufrag:new1\r\n"
        assert (await call.update(restarted))["code"] == 200
        update = await phone.next_event("update")
        assert update["sdp"] == restarted
        assert (await tablet.next_event("update"))["sdp"] == restarted

        await legs[0].answer(ANSWER)  # made for the first offer: refused by the owner, over the bus
        refused = await phone.next_event("error")
        assert (refused["code"], refused["error"], refused["call_id"]) == (491, "request_pending", call.call_id)
        await legs[0].answer_update(update, 100)
        await legs[0].answer(ANSWER + "a=ice-ufrag:new2\r\n")
        assert (await call.answered())["sdp"] == ANSWER + "a=ice-ufrag:new2\r\n"
        assert (await tablet.next_event("cancel"))["reason"] == "answered_elsewhere"
        await call.ack()
        assert (await phone.next_event("ack"))["call_id"] == call.call_id
