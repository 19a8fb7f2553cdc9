"""Issue 4's scenarios on real processes: `signaling serve` processes (three, or two) on one real redis-server.

Each process is started by `tests/processes.py` with the development push recorder (no APNs configured), short
timeouts, and its JSON log read as it comes. Clients connect to whichever process a load balancer would have
picked. Each scenario counts what issue 4 says must be zero, and asserts it: calls lost, duplicate INVITEs, ghost
rings (an INVITE for a call that had already ended) and duplicate pushes (more than one VoIP push for one call and
one device, across every process).

No test sleeps to let something happen: it waits for a frame, a log line of a process or a process's exit, or,
for what nothing announces (`/readyz`, a heartbeat written to a restarted Redis), polls with a bound. Every wait
has a generous timeout, and nothing asserts how fast anything went.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis
import redis.asyncio

from signaling.client import CallFailed, Client, Frame, OutgoingCall, Reconnect
from tests.harness import ANSWER, OFFER, PUSH
from tests.netproxy import Proxy
from tests.processes import WAIT, Line, Node, device, serving, token
from tests.redis_server import RedisServer

# Nothing waits out the re-attach grace or the drain timeout when things go right; they are short only so that a
# failure ends a call soon. A heartbeat every second.
SETTINGS = {"SIPLITE_NODE_TTL": "3", "SIPLITE_REATTACH_GRACE": "5", "SIPLITE_DRAIN_TIMEOUT": "10"}
NAMES = ("node-a", "node-b", "node-c")
# Presence TTL for the Redis restart: each process sweeps (and restores) its bindings every 2 s, and the clients
# send keepalives as often, 4 s inside the TTL.
RESTORING = "6"
CANDIDATE = "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host"
CANDIDATE_BACK = "candidate:2 1 udp 2122260223 192.0.2.2 50002 typ host"


class Phones:
    """The clients a test opened, closed at its end."""

    def __init__(self) -> None:
        self.clients: list[Client] = []

    async def device(self, node: Node | str, user: str, device_id: str | None = None, **options: Any) -> Client:
        """A device of `user` registered on `node` (or at a URL); `options` as for `tests.processes.device`."""
        client = await device(node if isinstance(node, str) else node.url, user, device_id, **options)
        self.clients.append(client)
        return client

    async def asleep(self, node: Node, user: str, device_id: str, voip_token: str) -> dict[str, Any]:
        """Register a device with a VoIP token, then close it, as iOS does to an app it suspends; return once its
        process has dropped it. Returns the push binding (to register with again when woken)."""
        binding = {**PUSH, "voip_token": voip_token}
        client = await device(node.url, user, device_id, push=binding)
        mark = node.mark()
        await client.close()
        await node.logged("conn.closed", since=mark, user_id=user)
        return binding

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


# Every test and fixture here runs in one event loop, so that the three processes most tests share can be
# started once (starting a process is most of what this module costs).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def three(redis_server: RedisServer) -> AsyncIterator[list[Node]]:
    """Three processes on the session's Redis, shared by the tests that leave them as they found them (no call
    left, every client closed); each of those tests has user names of its own. The tests that stop Redis or a
    process start their own processes on a Redis of their own."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    async with serving(redis_server.url, NAMES, **SETTINGS) as nodes:
        yield nodes


@pytest_asyncio.fixture(loop_scope="module")
async def phones() -> AsyncIterator[Phones]:
    opened = Phones()
    yield opened
    await opened.close()


def received(client: Client, kind: str, call_id: str) -> list[Frame]:
    """The frames of one kind about one call this client has received so far, over all its connections."""
    return [f for f in client.history if f.get("type") == kind and f.get("call_id") == call_id]


async def settled(client: Client) -> None:
    """Return once the process this client is connected to has sent it everything it had for it before a
    keepalive (a round trip)."""
    await client.keepalive()


async def pushes_per_device(nodes: Iterable[Node], user: str, call_id: str) -> Counter[str]:
    """How many VoIP pushes every process together recorded for `call_id`, per device of `user`."""
    found: Counter[str] = Counter()
    for node in nodes:
        for push in await node.pushes(token(user)):
            if push["kind"] == "incoming_call" and push["call_id"] == call_id:
                found[push["device_id"]] += 1
    return found


async def woken(nodes: Sequence[Node], user: str) -> tuple[Node, Frame]:
    """What a sleeping phone does: wait for a VoIP push for `user`, whichever process sends it. The process that
    recorded it, and the push."""

    async def watch(node: Node) -> tuple[Node, Frame]:
        pushes = await node.pushes(token(user), wait=WAIT)
        assert pushes, f"no push recorded on {node.name} within {WAIT}s"
        return node, pushes[0]

    watchers = [asyncio.create_task(watch(node)) for node in nodes]
    try:
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


# ---------------------------------------------------------------------------------------------- calls across nodes


async def test_thirty_calls_across_three_processes_complete_and_every_device_is_offered_each_call_once(
    three: list[Node], phones: Phones
) -> None:
    """Call i: the caller on process i, its callee on process i+1 and, every third call, the callee's second
    device on process i+2. All thirty run at once; every one must go INVITE, 180, 200, ACK, ICE both ways, BYE."""
    calls = 30

    async def place(i: int) -> None:
        caller = await phones.device(three[i % 3], f"caller-{i}")
        callee = f"callee-{i}"
        devices = [await phones.device(three[(i + 1) % 3], callee, f"{callee}-phone")]
        if i % 3 == 0:
            devices.append(await phones.device(three[(i + 2) % 3], callee, f"{callee}-tablet"))
        call = await caller.invite(callee, OFFER)
        offers = [await d.incoming() for d in devices]
        assert [o.call_id for o in offers] == [call.call_id] * len(devices)
        for offer in offers:
            await offer.ring()
        winner = i % len(devices)  # the tablet answers half of the two-device calls
        await offers[winner].answer(ANSWER)
        assert (await call.answered())["sdp"] == ANSWER
        for loser, d in enumerate(devices):
            if loser != winner:
                cancel = await d.next_event("cancel", call_id=call.call_id)
                assert cancel["reason"] == "answered_elsewhere"
        await call.ack()
        answering = devices[winner]
        await answering.next_event("ack", call_id=call.call_id)
        assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
        assert (await answering.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE
        assert (await offers[winner].ice(CANDIDATE_BACK, "0", 0))["code"] == 200
        assert (await caller.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE_BACK
        if i % 2:
            assert (await offers[winner].hangup())["code"] == 200
            assert (await caller.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"
        else:
            assert (await call.hangup())["code"] == 200
            assert (await answering.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"
        ended = await three[i % 3].logged("call.ended", call_id=call.call_id)  # by its owner, the caller's node
        outcome = (ended["reason"], ended["answered_by"], ended["devices"], ended["pushed"])
        assert outcome == ("remote_hangup", answering.device_id, len(devices), 0)
        # The caller heard each stage once: one 180 although two devices rang.
        assert [r["code"] for r in call.responses] == [100, 180, 200]
        for d in devices:
            await settled(d)
            assert len(received(d, "invite", call.call_id)) == 1, f"call {i}: {d.device_id} offered it twice"

    outcomes = await asyncio.gather(*(place(i) for i in range(calls)), return_exceptions=True)
    lost = {i: repr(outcome) for i, outcome in enumerate(outcomes) if outcome is not None}
    assert lost == {}, f"{len(lost)} of {calls} calls lost"
    assert len(phones.clients) == 2 * calls + calls // 3


# ---------------------------------------------------------------------------------------------- push wake-up


async def test_phones_woken_on_other_processes_get_the_held_invite_once_and_one_push_each(
    three: list[Node], phones: Phones
) -> None:
    """Bob's phone and tablet sleep; alice calls from process A. The owner of the call (A) pushes each device
    once; the phone wakes through process C, the tablet through B. Each is offered the held INVITE once."""
    a, b, c = three
    alice = await phones.device(a, "alice")
    phone_binding = await phones.asleep(b, "bob", "bob-phone", "0a" * 32)
    tablet_binding = await phones.asleep(c, "bob", "bob-tablet", "0b" * 32)

    call = await alice.invite("bob", OFFER)
    assert (await call.next_response())["stage"] == "push_sent"
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200  # held for the devices still waking
    pusher, push = await woken(three, "bob")
    assert (pusher.name, push["call_id"]) == ("node-a", call.call_id)

    phone = await phones.device(c, "bob", "bob-phone", push=phone_binding)
    tablet = await phones.device(b, "bob", "bob-tablet", push=tablet_binding)
    on_phone, on_tablet = await phone.incoming(), await tablet.incoming()
    assert (on_phone.call_id, on_phone.sdp, on_tablet.call_id) == (call.call_id, OFFER, call.call_id)
    for d in (phone, tablet):
        assert (await d.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE
    assert (await call.next_response())["stage"] == "callee_connected"

    await on_phone.ring()
    await on_phone.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert (await tablet.next_event("cancel", call_id=call.call_id))["reason"] == "answered_elsewhere"
    await call.ack()
    await phone.next_event("ack", call_id=call.call_id)
    assert (await on_phone.hangup())["code"] == 200
    assert (await alice.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"

    for d in (phone, tablet):
        await settled(d)
    duplicate_invites = {d.device_id: len(received(d, "invite", call.call_id)) - 1 for d in (phone, tablet)}
    assert duplicate_invites == {"bob-phone": 0, "bob-tablet": 0}
    assert await pushes_per_device(three, "bob", call.call_id) == {"bob-phone": 1, "bob-tablet": 1}


async def test_a_phone_woken_on_another_process_after_the_caller_cancelled_is_told_ended_and_never_rung(
    three: list[Node], phones: Phones
) -> None:
    a, b, c = three
    anna = await phones.device(a, "anna")
    binding = await phones.asleep(b, "ben", "ben-phone", "0a" * 32)
    call = await anna.invite("ben", OFFER)
    assert (await call.next_response())["stage"] == "push_sent"
    _, push = await woken(three, "ben")
    assert push["call_id"] == call.call_id

    # The caller gives up while the phone is still starting.
    assert (await call.cancel())["code"] == 200
    with pytest.raises(CallFailed) as cancelled:
        await call.answered()
    assert cancelled.value.code == 487

    phone = await phones.device(c, "ben", "ben-phone", push=binding)
    ended = await phone.next_event("ended", call_id=call.call_id)
    assert (ended["reason"], ended["from"]) == ("remote_ended", "anna")
    await phone.next_event("missed", call_id=call.call_id)
    await settled(phone)
    ghost_rings = len(received(phone, "invite", call.call_id))
    assert ghost_rings == 0
    assert await pushes_per_device(three, "ben", call.call_id) == {"ben-phone": 1}


# ---------------------------------------------------------------------------------------------- network change


def peer_states(client: Client, call_id: str) -> list[str]:
    return [f["state"] for f in received(client, "peer", call_id)]


async def established(caller: Client, callee: Client) -> OutgoingCall:
    call = await caller.invite(callee.user or "", OFFER)
    await (await callee.incoming()).answer(ANSWER)
    await call.answered()
    await call.ack()
    await callee.next_event("ack", call_id=call.call_id)
    return call


async def relayed_both_ways(call: OutgoingCall, callee: Client) -> None:
    """ICE from each party reaches the other: both are attached to the call, wherever they are connected."""
    caller = call.client
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
    assert (await callee.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE
    assert (await callee.request("ice", call_id=call.call_id, candidate=CANDIDATE_BACK))["code"] == 200
    assert (await caller.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE_BACK


@pytest.mark.parametrize("moving", ["caller", "callee"])
async def test_a_party_whose_connection_is_cut_mid_call_re_attaches_through_another_process(
    three: list[Node], phones: Phones, moving: str
) -> None:
    """Carol (on A, the call's owner) calls dave (on B). The moving party's TCP connection runs through a proxy,
    which stops listening and resets it (the old network is gone); its client library reconnects by itself, to
    process C, and registers again. Its new network comes up only once the other party has been told it is
    reconnecting, so the order the test checks is the order things happened in."""
    a, b, c = three
    caller, callee = f"carol-{moving}", f"dave-{moving}"  # names of its own: the processes are shared
    home, user = (a, caller) if moving == "caller" else (b, callee)
    new_network = asyncio.Event()

    async def fresh_token() -> str:
        await new_network.wait()
        return token(user)

    async with Proxy("127.0.0.1", home.port) as proxy:
        reconnect = Reconnect(urls=[c.url], initial=0.05, token=fresh_token)
        through = f"ws://127.0.0.1:{proxy.port}/ws"
        mover = await phones.device(through, user, reconnect=reconnect)
        other = await phones.device(b, callee) if moving == "caller" else await phones.device(a, caller)
        carol, dave = (mover, other) if moving == "caller" else (other, mover)
        call = await established(carol, dave)
        await proxy.close()

    assert (await other.next_event("peer", call_id=call.call_id))["state"] == "reconnecting"
    new_network.set()
    assert (await mover.next_event("reconnected"))["url"] == c.url
    assert (await mover.next_event("peer", call_id=call.call_id))["state"] == "connected"
    assert (await other.next_event("peer", call_id=call.call_id))["state"] == "connected"
    await relayed_both_ways(call, dave)
    assert (await mover.request("bye", call_id=call.call_id))["code"] == 200
    assert (await other.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"

    ended = await a.logged("call.ended", call_id=call.call_id)
    calls_lost = ended["reason"] != "remote_hangup"
    assert calls_lost == 0
    assert peer_states(other, call.call_id) == ["reconnecting", "connected"]
    assert peer_states(mover, call.call_id) == ["connected"]
    assert proxy.connections == 1  # it came back directly to process C, not through the old path


# ---------------------------------------------------------------------------------------------- Redis restart


async def polled(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Return once `check()` says so, asking every 50 ms, for what nothing announces; fail after `WAIT`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not {what} within {WAIT}s")
        await asyncio.sleep(0.05)  # the poll interval, not a synchronisation


async def readiness(nodes: Iterable[Node], status: int) -> None:
    """Return once `/readyz` answers `status` on every process."""
    for node in nodes:

        async def answers(node: Node = node) -> bool:
            return await node.ready() == status

        await polled(answers, f"/readyz {status} on {node.name}")


async def test_a_redis_restart_refuses_new_calls_with_503_and_every_process_restores_its_bindings(
    phones: Phones,
) -> None:
    """Its own redis-server, stopped and started again empty on the same port, under three processes that sweep
    their bindings every 2 s (the clients send keepalives)."""
    with RedisServer() as redis_server:
        async with serving(redis_server.url, NAMES, **SETTINGS, SIPLITE_PRESENCE_TTL=RESTORING) as nodes:
            a, b, c = nodes
            alice = await phones.device(a, "alice", keepalive=True)
            bob = await phones.device(b, "bob", keepalive=True)
            carol = await phones.device(c, "carol", keepalive=True)

            redis_server.stop()
            await readiness(nodes, 503)
            # New calls, from every process, are refused with a hint to retry; every socket stays up.
            refused = []
            for caller, callee in ((alice, "bob"), (bob, "carol"), (carol, "alice")):
                with pytest.raises(CallFailed) as failed:
                    await (await caller.invite(callee, OFFER)).answered()
                refused.append(failed.value.response)
            assert [(r["code"], r["error"]) for r in refused] == [(503, "store_unavailable")] * 3
            assert all(r["retry_after"] > 0 for r in refused)
            for client in (alice, bob, carol):
                assert (await client.keepalive())["code"] == 200

            marks = [node.mark() for node in nodes]
            redis_server.start()  # the same port, and empty: Redis keeps nothing on disk here
            await readiness(nodes, 200)
            # Each process registers its live connections again by itself; no client registers again.
            for node, mark, user in zip(nodes, marks, ("alice", "bob", "carol"), strict=True):
                await node.logged("presence.restored", since=mark, user_id=user)

            # Calls placed now reach devices registered before the outage, on other processes.
            lost = 0
            for caller, callee, answering in ((alice, "bob", bob), (bob, "carol", carol), (carol, "alice", alice)):
                call = await caller.invite(callee, OFFER)
                incoming = await answering.incoming()
                assert incoming.call_id == call.call_id
                await incoming.answer(ANSWER)
                assert (await call.answered())["sdp"] == ANSWER
                await call.ack()
                assert (await call.hangup())["code"] == 200
                bye = await answering.next_event("bye", call_id=call.call_id)
                lost += bye["reason"] != "remote_hangup"
            assert lost == 0
            assert [f for c in (alice, bob, carol) for f in c.history if f["type"] == "register"] == []


async def heartbeats(url: str, nodes: Iterable[Node]) -> None:
    """Return once every process has written its heartbeat to a restarted (empty) Redis: polled, since nothing
    announces a heartbeat; the key is `Palive:{<node>}` (signaling/store/redis.py)."""
    async with redis.asyncio.Redis.from_url(url) as client:
        for node in nodes:

            async def beat(node: Node = node) -> bool:
                return bool(await client.exists(f"siplite:alive:{{{node.name}}}"))

            await polled(beat, f"a heartbeat from {node.name}")


def heartbeat_failed(line: Line) -> bool:
    return str(line.get("detail", "")).startswith("Redis heartbeat failed")


@pytest.mark.parametrize(
    "outage",
    [
        "brief",
        "longer_than_the_node_ttl",
    ],
)
async def test_an_established_cross_process_call_survives_a_redis_restart(phones: Phones, outage: str) -> None:
    """Alice on A calls bob on B; Redis restarts empty. Neither process may take the other for dead because its
    heartbeat is missing from the new, empty Redis: the call goes on. The longer outage outlasts every heartbeat
    either process wrote before it (they beat every second, for a node TTL of 3 s)."""
    with RedisServer() as redis_server:
        async with serving(redis_server.url, NAMES[:2], **SETTINGS, SIPLITE_PRESENCE_TTL=RESTORING) as nodes:
            a, b = nodes
            alice = await phones.device(a, "alice", keepalive=True)
            bob = await phones.device(b, "bob", keepalive=True)
            call = await alice.invite("bob", OFFER)
            await (await bob.incoming()).answer(ANSWER)
            await call.answered()
            await call.ack()
            await bob.next_event("ack")

            marks = [node.mark() for node in nodes]
            redis_server.stop()
            await readiness(nodes, 503)
            if outage != "brief":
                # A beat a second and a TTL of 3 s: by the 4th beat that fails, the last one written has expired.
                for node, mark in zip(nodes, marks, strict=True):
                    await node.logged("task.failed", since=mark, count=4, where=heartbeat_failed)
            redis_server.start()
            await readiness(nodes, 200)
            for node, mark, user in zip(nodes, marks, ("alice", "bob"), strict=True):
                await node.logged("presence.restored", since=mark, user_id=user)
            await heartbeats(redis_server.url, nodes)
            for client in (alice, bob):
                await settled(client)
            # Nobody was told the other side had gone.
            assert [f for c in (alice, bob) for f in c.history if f["type"] in ("peer", "bye")] == []

            # The call still relays both ways across processes, and ends with a BYE.
            assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
            assert (await bob.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE
            assert (await bob.request("ice", call_id=call.call_id, candidate=CANDIDATE_BACK))["code"] == 200
            assert (await alice.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE_BACK
            assert (await bob.request("bye", call_id=call.call_id))["code"] == 200
            assert (await alice.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"


# ---------------------------------------------------------------------------------------------- drain


async def test_a_drained_process_sends_its_clients_elsewhere_keeps_their_call_and_exits_once_it_ends(
    phones: Phones,
) -> None:
    """Both parties of a call are on process A, which owns the call. SIGTERM: they are sent to B and C, re-attach
    there, and the call goes on while A waits for it; A exits when it ends, before its drain timeout."""
    with RedisServer() as redis_server:
        async with serving(redis_server.url, NAMES, **SETTINGS) as (a, b, c):
            alice = await phones.device(a, "alice", reconnect=Reconnect(urls=[b.url], initial=0.05))
            bob = await phones.device(a, "bob", reconnect=Reconnect(urls=[c.url], initial=0.05))
            idle = await phones.device(a, "carol")
            call = await established(alice, bob)

            mark = a.mark()
            a.terminate()
            for client in (alice, bob, idle):
                assert (await client.next_event("reconnect"))["reason"] == "draining"
            assert (await idle.wait_closed()).code == 1012
            await readiness([a], 503)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await Client.connect(a.url)
            assert refused.value.status == 503
            assert (await alice.next_event("reconnected"))["url"] == b.url
            assert (await bob.next_event("reconnected"))["url"] == c.url
            for user in ("alice", "bob"):
                await a.logged("call.reattached", since=mark, call_id=call.call_id, user_id=user)

            await relayed_both_ways(call, bob)
            assert a.process.returncode is None  # still waiting for its call
            assert (await call.hangup())["code"] == 200
            assert (await bob.next_event("bye", call_id=call.call_id))["reason"] == "remote_hangup"
            assert await a.exited() == 0
            drained = await a.logged("server.drained", since=mark)
            assert drained["calls_left"] == 0  # it left because its last call ended, not because time ran out
            assert (await a.logged("call.ended", call_id=call.call_id))["reason"] == "remote_hangup"
            assert (peer_states(alice, call.call_id)[-1:], peer_states(bob, call.call_id)[-1:]) == (
                ["connected"],
                ["connected"],
            )


async def test_a_drained_process_whose_call_never_ends_exits_at_the_drain_timeout(phones: Phones) -> None:
    """Alice (on A, which owns the call) does not come back after A sends her away; A gives up at its drain
    timeout (1 s) and exits. Bob, on B, is told the call ended once B sees A has stopped beating."""
    settings = {**SETTINGS, "SIPLITE_DRAIN_TIMEOUT": "1", "SIPLITE_NODE_TTL": "1"}
    with RedisServer() as redis_server:
        async with serving(redis_server.url, NAMES[:2], **settings) as (a, b):
            alice = await phones.device(a, "alice")
            bob = await phones.device(b, "bob")
            call = await established(alice, bob)
            mark = a.mark()
            a.terminate()
            assert (await alice.wait_closed()).code == 1012
            assert await a.exited() == 0
            assert (await a.logged("server.drained", since=mark))["calls_left"] == 1
            assert (await bob.next_event("peer", call_id=call.call_id))["state"] == "reconnecting"
            assert (await bob.next_event("bye", call_id=call.call_id))["reason"] == "peer_gone"
