"""Several server processes on one Redis act as one: calls whose parties sit on different nodes.

Three nodes run in this process, each a real aiohttp server on its own socket with its own `RedisStore` and its
own Redis pub/sub bus, all on one real Redis: a single redis-server, a Redis Cluster of three masters (sharded
pub/sub for the bus), or a master found through Sentinel. Clients connect to whichever node a load balancer
would have picked. (Real separate processes, kill -9 and restarts are in the crash tests.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
import redis.asyncio

from push.dev import DevelopmentProvider
from signaling.bus import RedisBus
from signaling.client import CallFailed, Client, ClientError, OutgoingCall, Reconnect
from signaling.clock import ManualClock
from signaling.store.redis import RedisStore
from tests.apns_server import ApnsPki
from tests.harness import ANSWER, OFFER, Harness, make_settings, running
from tests.redis_server import RedisClusterServers, RedisSentinelServers, RedisServer, TlsFiles

PHONE = "0a" * 32
CANDIDATE = "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host"


@dataclass
class Cluster:
    nodes: dict[str, Harness]

    def __getitem__(self, name: str) -> Harness:
        return self.nodes[name]

    def pushes(self) -> list[str]:
        """Every VoIP push any node sent, as "node:call_id:device_id"."""
        found = []
        for name, node in self.nodes.items():
            recorder = node.board.push
            assert isinstance(recorder, DevelopmentProvider)
            found += [f"{name}:{r.request.call_id}:{r.request.device_id}" for r in recorder.records]
        return found


@asynccontextmanager
async def nodes(url: str, clock: ManualClock, names: tuple[str, ...] = ("a", "b", "c")) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        running_nodes = {}
        for name in names:
            settings = make_settings(node_id=f"node-{name}")
            store = RedisStore(url, clock)
            running_nodes[name] = await stack.enter_async_context(running(settings, store, clock))
        yield Cluster(running_nodes)


REDIS_KINDS = {"redis": "redis_url", "redis-cluster": "redis_cluster_url", "sentinel": "redis_sentinel_url"}


@pytest.fixture(params=list(REDIS_KINDS))
async def cluster(request: pytest.FixtureRequest, manual_clock: ManualClock) -> AsyncIterator[Cluster]:
    """Three nodes on an empty Redis of each kind."""
    url: str = request.getfixturevalue(REDIS_KINDS[request.param])
    async with nodes(url, manual_clock) as running_nodes:
        yield running_nodes


async def settled(client: Client) -> list[dict[str, object]]:
    """The frames the server sent this client on its own so far (a keepalive round trip flushes them)."""
    await client.keepalive()
    return [f for f in client.pending_events() if f["type"] != "response"]


async def test_a_call_between_two_nodes_runs_from_invite_to_bye(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice", name="Alice A.")
    bob = await cluster["b"].device("bob")

    call = await alice.invite("bob", OFFER, video=True)
    incoming = await bob.incoming()
    assert (incoming.call_id, incoming.caller, incoming.caller_name, incoming.sdp, incoming.video) == (
        call.call_id,
        "alice",
        "Alice A.",
        OFFER,
        True,
    )
    await incoming.ring()
    assert (await call.next_response())["code"] == 180
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
    assert (await bob.next_event("ice"))["candidate"] == CANDIDATE
    assert (await incoming.ice("candidate:2 1 udp 1 192.0.2.2 2 typ host"))["code"] == 200  # held until answer
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert (await alice.next_event("ice"))["candidate"].startswith("candidate:2 ")
    await call.ack()
    await bob.next_event("ack")

    update_task = asyncio.create_task(incoming.update(ANSWER + "a=sendonly\r\n"))
    update = await alice.next_event("update")
    await call.answer_update(update, 200, OFFER + "a=recvonly\r\n")
    assert (await update_task)["sdp"].endswith("a=recvonly\r\n")

    assert (await incoming.hangup())["code"] == 200
    assert (await alice.next_event("bye"))["reason"] == "remote_hangup"
    assert not cluster["a"].board.calls
    assert not cluster["b"].board.bound[("bob", "bob-phone")].remote_calls


async def test_devices_on_three_nodes_ring_and_the_first_answer_wins(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    phone = await cluster["a"].device("bob", "bob-phone")
    tablet = await cluster["b"].device("bob", "bob-tablet")
    laptop = await cluster["c"].device("bob", "bob-laptop")

    call = await alice.invite("bob", OFFER)
    on_phone, on_tablet, on_laptop = [await d.incoming() for d in (phone, tablet, laptop)]
    await on_laptop.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    for device in (phone, tablet):
        assert (await device.next_event("cancel"))["reason"] == "answered_elsewhere"
    # The losers are done with the call: what they send about it now is refused.
    with pytest.raises(ClientError) as refused:
        await on_tablet.hangup()
    assert refused.value.code == 481
    await call.hangup()
    assert (await laptop.next_event("bye"))["reason"] == "remote_hangup"
    assert on_phone.call_id == call.call_id


async def test_a_decline_on_another_node_declines_everywhere(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    phone = await cluster["b"].device("bob", "bob-phone")
    tablet = await cluster["c"].device("bob", "bob-tablet")
    call = await alice.invite("bob", OFFER)
    await (await phone.incoming()).reject(603)
    await tablet.incoming()
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 603
    assert (await tablet.next_event("cancel"))["reason"] == "declined_elsewhere"


async def test_a_callee_whose_socket_closes_on_its_node_fails_the_call_at_once(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    bob = await cluster["b"].device("bob")
    call = await alice.invite("bob", OFFER)
    await bob.incoming()
    await bob.close()
    with pytest.raises(CallFailed) as failed:
        await call.answered()
    assert failed.value.code == 480


async def test_a_phone_woken_on_another_node_gets_the_held_call_and_answers(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    binding = await cluster["b"].asleep("bob", "bob-phone", PHONE)
    call = await alice.invite("bob", OFFER)
    assert (await call.next_response())["stage"] == "push_sent"
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200

    phone = await cluster["c"].device("bob", "bob-phone", push=binding)  # the load balancer picked node c
    incoming = await phone.incoming()
    assert (incoming.call_id, incoming.sdp) == (call.call_id, OFFER)
    assert (await phone.next_event("ice"))["candidate"] == CANDIDATE
    kinds = [(f["type"], f.get("method")) for f in phone.history]
    assert kinds[:3] == [("response", "register"), ("invite", None), ("ice", None)]
    assert (await call.next_response())["stage"] == "callee_connected"

    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    await call.ack()
    await phone.next_event("ack")
    assert cluster.pushes() == [f"a:{call.call_id}:bob-phone"]  # one push, from the call's owner

    # Registering again on yet another node (a token refresh from a new socket) does not ring it twice.
    again = await cluster["b"].device("bob", "bob-phone", push=binding)
    assert [f for f in await settled(again) if f["type"] == "invite"] == []


async def test_a_phone_woken_on_another_node_after_the_caller_cancelled_is_told_ended(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    binding = await cluster["b"].asleep("bob", "bob-phone", PHONE)
    call = await alice.invite("bob", OFFER)
    assert (await call.next_response())["stage"] == "push_sent"
    assert (await call.cancel())["code"] == 200

    phone = await cluster["c"].device("bob", "bob-phone", push=binding)
    frames = await settled(phone)
    assert [(f["type"], f.get("reason")) for f in frames] == [("ended", "remote_ended"), ("missed", None)]


async def test_a_device_registering_on_another_node_takes_its_ringing_call_along(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    old = await cluster["b"].device("bob", "bob-phone")
    call = await alice.invite("bob", OFFER)
    await old.incoming()

    # The phone moved from Wi-Fi to LTE while ringing and reconnected through node c.
    new = await cluster["c"].device("bob", "bob-phone")
    assert (await old.wait_closed()).code == 4409
    incoming = await new.incoming()
    assert incoming.call_id == call.call_id
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert cluster.pushes() == []


async def test_no_stranger_on_another_node_can_touch_a_call(cluster: Cluster) -> None:
    alice = await cluster["a"].device("alice")
    bob = await cluster["b"].device("bob")
    mallory = await cluster["b"].device("mallory")
    call = await alice.invite("bob", OFFER)
    await bob.incoming()
    for method in ("bye", "cancel", "ice"):
        with pytest.raises(ClientError) as refused:
            await mallory.request(method, call_id=call.call_id, candidate=CANDIDATE if method == "ice" else None)
        assert refused.value.code == 481
    await mallory.send({"type": "response", "seq": 1, "method": "invite", "call_id": call.call_id, "code": 180})
    assert (await mallory.next_event("error"))["code"] == 481
    assert call.responses[-1]["code"] == 100  # the caller heard nothing of it


async def test_on_a_redis_cluster_the_bus_is_sharded_pub_sub(
    redis_cluster: RedisClusterServers, redis_cluster_url: str, manual_clock: ManualClock
) -> None:
    async with nodes(redis_cluster_url, manual_clock) as running_nodes:
        shard_channels: list[bytes | str] = []
        classic_channels: list[bytes | str] = []
        for server in redis_cluster.servers:
            async with redis.asyncio.Redis.from_url(server.url, decode_responses=True) as master:
                shard_channels += await master.pubsub_shardchannels()
                classic_channels += await master.pubsub_channels()
        bus = running_nodes["a"].board.bus
        assert isinstance(bus, RedisBus)
        assert sorted(shard_channels) == [bus.channel(f"node-{name}") for name in "abc"]
        assert classic_channels == []
        # A call between nodes travels over those channels (SPUBLISH), both ways.
        alice = await running_nodes["a"].device("alice")
        bob = await running_nodes["b"].device("bob")
        call = await alice.invite("bob", OFFER)
        await (await bob.incoming()).answer(ANSWER)
        assert (await call.answered())["sdp"] == ANSWER


async def test_a_call_between_nodes_on_a_redis_cluster_reached_over_tls(
    apns_pki: ApnsPki, manual_clock: ManualClock
) -> None:
    # The nodes listen in plain text too, where a TLS client fails: a call that goes through shows every
    # connection, to the nodes the URL names and to those CLUSTER SLOTS names, was TLS.
    tls = TlsFiles(apns_pki.ca_file, apns_pki.server_cert, apns_pki.server_key, apns_pki.client_pem)
    with RedisClusterServers(tls=tls) as servers:
        async with nodes(servers.tls_url, manual_clock, ("a", "b")) as cluster:
            _, bob, call = await established(cluster, "a", "b")
            assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
            assert (await bob.next_event("ice"))["candidate"] == CANDIDATE
            assert (await call.hangup())["code"] == 200
            assert (await bob.next_event("bye"))["reason"] == "remote_hangup"


# ---------------------------------------------------------------------------------------------- Redis restarts


async def test_a_redis_restart_is_ridden_out_and_every_node_restores_itself(manual_clock: ManualClock) -> None:
    with RedisServer() as redis_server:
        async with nodes(redis_server.url, manual_clock, ("a", "b")) as cluster:
            alice = await cluster["a"].device("alice")
            bob = await cluster["b"].device("bob")
            carol = await cluster["a"].device("carol")
            call = await alice.invite("bob", OFFER)
            await (await bob.incoming()).answer(ANSWER)
            await call.answered()
            await call.ack()

            redis_server.stop()
            # New calls are refused with a hint to retry; readiness says so; every socket stays up.
            with pytest.raises(CallFailed) as refused:
                await (await carol.invite("bob", OFFER)).answered()
            assert (refused.value.code, refused.value.response["error"]) == (503, "store_unavailable")
            assert refused.value.response["retry_after"] > 0
            for node in cluster.nodes.values():
                async with aiohttp.ClientSession() as http, http.get(node.url.replace("/ws", "/readyz")) as ready:
                    assert ready.status == 503
            for client in (alice, bob, carol):
                assert (await client.keepalive())["code"] == 200

            redis_server.start()  # the same port, and empty: Redis keeps nothing on disk here
            for node in cluster.nodes.values():
                bus = node.board.bus
                assert isinstance(bus, RedisBus)
                async with asyncio.timeout(10):
                    await bus.subscribed.wait()
            manual_clock.advance(cluster["a"].settings.presence_ttl / 3)
            for node in cluster.nodes.values():
                assert node.board.last_sweep is not None
                await node.board.last_sweep

            store = cluster["a"].board.store
            for user in ("alice", "bob", "carol"):
                assert [b.device_id for b in (await store.presence(user)).bindings] == [f"{user}-phone"]
            # The call that was up all along still relays across nodes, and new calls go through.
            assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
            assert (await bob.next_event("ice"))["candidate"] == CANDIDATE
            second = await carol.invite("bob", OFFER)
            incoming = await bob.incoming()
            assert incoming.call_id == second.call_id


async def test_a_sentinel_failover_is_ridden_out_and_the_nodes_follow_the_new_master(
    manual_clock: ManualClock,
) -> None:
    with RedisSentinelServers(replica=True, down_after=1.0) as servers:
        async with nodes(servers.url, manual_clock, ("a", "b")) as cluster:
            _, bob, call = await established(cluster, "a", "b")
            carol = await cluster["a"].device("carol")

            servers.master.stop()
            await asyncio.to_thread(servers.wait_for_failover)
            # Every node's bus lost its subscription with the old master and subscribes on the new one.
            for node in cluster.nodes.values():
                bus = node.board.bus
                assert isinstance(bus, RedisBus)
                async with asyncio.timeout(10):
                    await bus.subscribed.wait()
            await goes_on(cluster, call, bob, carol)


async def test_a_redis_cluster_failover_is_ridden_out_and_the_bus_follows_its_channel(
    manual_clock: ManualClock,
) -> None:
    with RedisClusterServers(replicas=1, node_timeout=1.0) as servers:
        async with nodes(servers.url, manual_clock, ("a", "b")) as cluster:
            _, bob, call = await established(cluster, "a", "b")
            carol = await cluster["a"].device("carol")

            # The master that serves node b's bus channel goes down; its replica takes over, and node b
            # subscribes the channel there.
            bus = cluster["b"].board.bus
            assert isinstance(bus, RedisBus)
            channel = bus.channel("node-b")
            servers.master_of(channel).stop()
            await asyncio.to_thread(servers.wait_for_failover)
            await asyncio.to_thread(servers.wait_for_shard_channel, channel)
            await goes_on(cluster, call, bob, carol)


async def goes_on(cluster: Cluster, call: OutgoingCall, callee: Client, other: Client) -> None:
    """After Redis came back: the call that was up all along still relays between its nodes (caller on "a",
    bob, the `callee`, on "b"), `other` can call bob, and every node is ready."""
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
    assert (await callee.next_event("ice"))["candidate"] == CANDIDATE
    second = await other.invite("bob", OFFER)
    assert (await callee.incoming()).call_id == second.call_id
    for node in cluster.nodes.values():
        async with aiohttp.ClientSession() as http, http.get(node.url.replace("/ws", "/readyz")) as ready:
            assert ready.status == 200


# ---------------------------------------------------------------------------------------------- network changes


async def established(cluster: Cluster, caller_node: str, callee_node: str) -> tuple[Client, Client, OutgoingCall]:
    alice = await cluster[caller_node].device("alice")
    bob = await cluster[callee_node].device("bob")
    call = await alice.invite("bob", OFFER)
    await (await bob.incoming()).answer(ANSWER)
    await call.answered()
    await call.ack()
    await bob.next_event("ack")
    return alice, bob, call


async def test_a_callee_that_drops_mid_call_re_attaches_through_another_node(cluster: Cluster) -> None:
    alice, bob, call = await established(cluster, "a", "b")
    await bob.close()
    assert (await alice.next_event("peer"))["state"] == "reconnecting"

    back = await cluster["c"].device("bob")
    assert (await back.next_event("peer"))["state"] == "connected"
    assert (await alice.next_event("peer"))["state"] == "connected"
    assert (await call.ice(CANDIDATE, "0", 0))["code"] == 200
    assert (await back.next_event("ice"))["candidate"] == CANDIDATE
    assert (await back.request("ice", call_id=call.call_id, candidate=CANDIDATE))["code"] == 200
    assert (await alice.next_event("ice"))["candidate"] == CANDIDATE
    assert (await back.request("bye", call_id=call.call_id))["code"] == 200
    assert (await alice.next_event("bye"))["reason"] == "remote_hangup"
    assert not cluster["a"].board.calls


async def test_a_caller_that_drops_mid_call_re_attaches_through_another_node(cluster: Cluster) -> None:
    alice, bob, call = await established(cluster, "a", "b")
    await alice.close()
    assert (await bob.next_event("peer"))["state"] == "reconnecting"

    back = await cluster["c"].device("alice")
    assert (await back.next_event("peer"))["state"] == "connected"
    assert (await bob.next_event("peer"))["state"] == "connected"
    update_task = asyncio.create_task(back.request("update", call_id=call.call_id, sdp=OFFER))
    update = await bob.next_event("update")
    await bob.send(
        {
            "type": "response",
            "seq": update["seq"],
            "method": "update",
            "call_id": call.call_id,
            "code": 200,
            "sdp": ANSWER,
        }
    )
    assert (await update_task)["sdp"] == ANSWER
    await back.close()  # dropped again, for good this time
    assert (await bob.next_event("peer"))["state"] == "reconnecting"
    cluster["a"].clock.advance(cluster["a"].settings.reattach_grace)
    assert (await bob.next_event("bye"))["reason"] == "peer_gone"


# ---------------------------------------------------------------------------------------------- drain


async def test_a_draining_node_sends_its_clients_elsewhere_and_keeps_its_calls_until_they_end(
    cluster: Cluster,
) -> None:
    a, b = cluster["a"], cluster["b"]
    alice = await Client.connect(a.url, reconnect=Reconnect(urls=[b.url], initial=0.0))
    a.clients.append(alice)
    await alice.register(a.token("alice"), "alice-phone")
    bob = await b.device("bob")
    call = await alice.invite("bob", OFFER)
    await (await bob.incoming()).answer(ANSWER)
    await call.answered()
    await call.ack()
    await bob.next_event("ack")
    idle = await a.device("carol")

    draining = asyncio.create_task(a.board.drain(timeout=30))
    assert (await idle.next_event("reconnect"))["reason"] == "draining"
    assert (await idle.wait_closed()).code == 1012
    async with aiohttp.ClientSession() as http, http.get(a.url.replace("/ws", "/readyz")) as ready:
        assert ready.status == 503

    # The caller's library connected again by itself, through node b (node a refuses new sockets), and the
    # call it placed on node a re-attached: it goes on while node a drains.
    assert (await alice.next_event("reconnected"))["url"] == b.url
    assert (await alice.next_event("peer"))["state"] == "connected"
    assert (await bob.request("ice", call_id=call.call_id, candidate=CANDIDATE))["code"] == 200
    assert (await alice.next_event("ice"))["candidate"] == CANDIDATE
    assert not draining.done()
    assert (await alice.request("bye", call_id=call.call_id))["code"] == 200
    assert (await bob.next_event("bye"))["reason"] == "remote_hangup"
    async with asyncio.timeout(5):
        await draining  # its last call ended: the node is done
    assert not a.board.calls


async def test_a_draining_node_gives_up_its_calls_at_the_drain_timeout(cluster: Cluster) -> None:
    a = cluster["a"]
    alice = await a.device("alice")
    bob = await cluster["b"].device("bob")
    call = await alice.invite("bob", OFFER)
    await (await bob.incoming()).answer(ANSWER)
    await call.answered()
    async with asyncio.timeout(5):
        await a.board.drain(timeout=0.05)  # the caller never comes back
    assert list(a.board.calls) == [call.call_id]  # still waiting for its caller when the drain gave up
    assert (await alice.wait_closed()).code == 1012
    with pytest.raises(CallFailed) as refused:
        await (await bob.invite("alice", OFFER)).answered()  # bob is on node b, which is not draining
    assert refused.value.code == 480
