"""Real `signaling serve` processes on one real Redis, one of them killed with SIGKILL mid-call.

Time here is the real clock (these are separate processes): the processes run with a 1 s node TTL and a 1 s
re-attach grace, so a crash is noticed within about a second and a half; every wait is on a frame the surviving
party receives, bounded by a timeout, never a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from signaling.client import Client
from tests.harness import ANSWER, OFFER, PUSH
from tests.processes import Node, device, serving

# Generous bound on "within the node TTL plus a heartbeat", for a loaded CI machine.
NOTICED = 8.0

# A crash is noticed within about a second and a half; a dropped party has a second to come back.
SETTINGS = {"SIPLITE_NODE_TTL": "1", "SIPLITE_REATTACH_GRACE": "1"}


@pytest.fixture
async def two(redis_url: str) -> AsyncIterator[tuple[Node, Node]]:
    async with serving(redis_url, ("node-a", "node-b"), **SETTINGS) as (a, b):
        yield a, b


async def established(a: Node, b: Node) -> tuple[Client, Client, str]:
    alice = await device(a.url, "alice")
    bob = await device(b.url, "bob")
    call = await alice.invite("bob", OFFER)
    await (await bob.incoming()).answer(ANSWER)
    await call.answered()
    await call.ack()
    await bob.next_event("ack")
    return alice, bob, call.call_id


async def test_the_callee_process_killed_mid_call_ends_it_for_the_caller_after_the_grace(
    two: tuple[Node, Node],
) -> None:
    a, b = two
    alice, bob, call_id = await established(a, b)
    b.kill()
    peer = await alice.next_event("peer", timeout=NOTICED)
    assert (peer["call_id"], peer["state"]) == (call_id, "reconnecting")
    bye = await alice.next_event("bye", timeout=NOTICED)
    assert (bye["call_id"], bye["reason"]) == (call_id, "peer_gone")
    await alice.close()
    await bob.close()


async def test_the_owner_process_killed_mid_call_ends_it_for_the_callee_elsewhere(two: tuple[Node, Node]) -> None:
    a, b = two
    alice, bob, call_id = await established(a, b)
    a.kill()
    bye = await bob.next_event("bye", timeout=NOTICED)
    assert (bye["call_id"], bye["reason"]) == (call_id, "peer_gone")
    await alice.close()
    await bob.close()


async def test_a_phone_woken_after_the_callers_process_died_is_told_ended_and_never_rung(
    two: tuple[Node, Node],
) -> None:
    a, b = two
    binding: dict[str, Any] = {**PUSH, "voip_token": "0a" * 32}
    phone = await device(b.url, "bob", push=binding)
    mark = b.mark()
    await phone.close()
    await b.logged("conn.closed", since=mark, user_id="bob")  # asleep: its binding is gone from the store
    alice = await device(a.url, "alice")
    call = await alice.invite("bob", OFFER)
    assert (await call.next_response())["stage"] == "push_sent"
    a.kill()

    woken = await device(b.url, "bob", push=binding)
    ended = await woken.next_event("ended", timeout=NOTICED)
    assert (ended["call_id"], ended["reason"], ended["from"]) == (call.call_id, "remote_ended", "alice")
    assert (await woken.next_event("missed"))["call_id"] == call.call_id
    await woken.keepalive()
    assert [f for f in woken.pending_events() if f["type"] == "invite"] == []  # no ghost ring
    await alice.close()
    await woken.close()
