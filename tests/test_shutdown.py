"""SIGTERM on a real `signaling serve` process: what the drain cannot hand over is closed with 1001 at the drain
timeout, and the process exits."""

from __future__ import annotations

from tests.harness import OFFER
from tests.processes import device, node


async def test_sigterm_closes_a_call_still_ringing_with_1001_when_the_drain_timeout_passes(redis_url: str) -> None:
    async with node(redis_url, "node-a", SIPLITE_DRAIN_TIMEOUT="0.5") as a:
        alice = await device(a.url, "alice")
        bob = await device(a.url, "bob")
        carol = await device(a.url, "carol")
        call = await alice.invite("bob", OFFER)
        assert (await bob.incoming()).call_id == call.call_id
        mark = a.mark()
        a.terminate()

        # Carol has no call: she is sent elsewhere at once.
        assert (await carol.next_event("reconnect"))["reason"] == "draining"
        assert (await carol.wait_closed()).code == 1012
        # Alice's call still rings, so the drain keeps her and bob's phone until its timeout gives up on it...
        drained = await a.logged("server.drained", since=mark)
        assert drained["calls_left"] == 1
        # ... and then the shutdown closes them with 1001, without sending them elsewhere first.
        for client in (alice, bob):
            assert (await client.wait_closed()).code == 1001
            assert [f for f in client.pending_events() if f["type"] == "reconnect"] == []
        assert await a.exited() == 0
        assert a.events("server.stopped")
        for client in (alice, bob, carol):
            await client.close()
