"""Automatic pipelining (signaling.store.batching) against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from signaling import redis_url
from signaling.store.batching import Batcher
from tests.redis_server import RedisServer, free_port


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    # One connection at most: redis-py raises MaxConnectionsError if the batcher ever needed a second.
    pool = redis.asyncio.ConnectionPool.from_url(redis_url, decode_responses=True, max_connections=1)
    async with redis.asyncio.Redis(connection_pool=pool) as client:
        yield client


async def test_operations_issued_together_share_one_round_trip_and_get_their_own_replies(
    client: redis.asyncio.Redis,
) -> None:
    batcher = Batcher(client, max_in_flight=1)
    replies = await asyncio.gather(
        *(batcher.execute([("SET", f"k{i}", f"v{i}"), ("GET", f"k{i}"), ("INCR", f"n{i}")]) for i in range(50))
    )
    assert replies == [[True, f"v{i}", 1] for i in range(50)]
    assert batcher.round_trips == 1


async def test_an_operation_alone_takes_one_round_trip(client: redis.asyncio.Redis) -> None:
    batcher = Batcher(client)
    for i in range(3):
        assert await batcher.execute([("INCR", "n"), ("GET", "n")]) == [i + 1, str(i + 1)]
    assert batcher.round_trips == 3


async def test_a_failed_command_is_its_own_reply_and_disturbs_no_other(client: redis.asyncio.Redis) -> None:
    batcher = Batcher(client)
    await client.set("text", "not a number")
    bad, good = await asyncio.gather(
        batcher.execute([("INCR", "text"), ("GET", "text")]), batcher.execute([("INCR", "n")])
    )
    assert isinstance(bad[0], ResponseError)
    assert bad[1] == "not a number"
    assert good == [1]


async def test_operations_issued_while_the_pipelines_are_busy_wait_and_go_together(
    client: redis.asyncio.Redis,
) -> None:
    batcher = Batcher(client, max_in_flight=1)

    async def later(i: int) -> list[Any]:
        for _ in range(i % 5):
            await asyncio.sleep(0)  # spread the operations over several loop iterations
        return await batcher.execute([("INCR", "n")])

    replies = await asyncio.gather(*(later(i) for i in range(200)))
    # Every INCR ran once (on one connection: the pool has one), and fewer round trips than operations.
    assert sorted(r[0] for r in replies) == list(range(1, 201))
    assert batcher.round_trips < 200


async def test_a_failed_round_trip_raises_to_every_operation_in_it() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with redis.asyncio.Redis.from_url(url, socket_connect_timeout=1) as client:
        batcher = Batcher(client)
        results = await asyncio.gather(
            batcher.execute([("GET", "a")]), batcher.execute([("GET", "b")]), return_exceptions=True
        )
    assert all(isinstance(r, RedisConnectionError) for r in results)


async def test_a_cancelled_operation_that_has_not_left_is_not_sent(client: redis.asyncio.Redis) -> None:
    batcher = Batcher(client)
    task = asyncio.ensure_future(batcher.execute([("INCR", "n")]))
    await asyncio.sleep(0)  # the operation is queued; its batch leaves at the end of this iteration
    task.cancel()
    assert await batcher.execute([("GET", "n")]) == [None]
    assert task.cancelled()


async def test_on_a_cluster_commands_whose_node_connection_died_are_sent_once_more(redis_cluster_url: str) -> None:
    """A cluster pipeline returns a node's connection failure as its commands' replies; one more round trip
    sends them again, as one server's client retries a pooled connection that died."""
    connected = redis_url.parse(redis_cluster_url).connect()
    cluster = connected.client
    assert isinstance(cluster, redis.asyncio.RedisCluster)
    batcher = Batcher(cluster)
    try:
        keys = [f"k{{{i}}}" for i in range(12)]  # spread over every master
        assert await batcher.execute([("SET", key, key) for key in keys]) == [True] * 12
        # Each master closes the connection the batcher's client pooled with it.
        for node in cluster.get_primaries():
            async with redis.asyncio.Redis(host=node.host, port=int(node.port)) as admin:
                await admin.client_kill_filter(_type="normal", skipme=True)
        before = batcher.round_trips
        assert await batcher.execute([("GET", key) for key in keys]) == [key.encode() for key in keys]
        assert batcher.round_trips == before + 2
    finally:
        await batcher.close()
        await connected.aclose()


async def test_a_redis_that_stops_answering_fails_the_round_trip_at_the_timeout_and_not_later() -> None:
    with RedisServer() as server:
        async with redis.asyncio.Redis.from_url(server.url, decode_responses=True) as client:
            batcher = Batcher(client, timeout=0.3)
            assert await batcher.execute([("SET", "k", "v")]) == [True]
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)  # alive, connected, silent: what a hung Redis looks like
            try:
                with pytest.raises(RedisTimeoutError, match=r"within 0\.3 s"):
                    await asyncio.wait_for(batcher.execute([("GET", "k")]), 5.0)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            # The connection cut short was dropped: the next round trip gets its own reply, not the late one.
            assert await batcher.execute([("GET", "nothing"), ("GET", "k")]) == [None, "v"]
