"""The node bus on every kind of Redis: a message reaches the node whose channel it names, and only that node."""

from __future__ import annotations

import asyncio

import pytest

from signaling.bus import Message, RedisBus


@pytest.mark.parametrize(
    ("url_fixture", "sharded", "uses_sharded"),
    [
        ("redis_url", None, False),
        ("redis_sentinel_url", None, False),
        ("redis_cluster_url", None, True),  # Redis 7: SSUBSCRIBE and SPUBLISH
        ("redis_cluster_url", False, False),  # what a cluster before Redis 7 gets
    ],
)
async def test_a_message_reaches_the_node_it_names_and_no_other(
    request: pytest.FixtureRequest, url_fixture: str, sharded: bool | None, uses_sharded: bool
) -> None:
    url: str = request.getfixturevalue(url_fixture)
    inboxes: dict[str, asyncio.Queue[Message]] = {}
    buses: list[RedisBus] = []
    try:
        for node_id in ("node-a", "node-b", "node-c"):
            bus = RedisBus(url, "siplite:", sharded=sharded)
            buses.append(bus)
            inboxes[node_id] = asyncio.Queue()
            await bus.start(node_id, inboxes[node_id].put)
            assert bus.sharded is uses_sharded

        await buses[0].publish("node-b", {"op": "deliver", "n": 1})
        await buses[1].publish("node-a", {"op": "lost", "n": 2})
        await buses[2].publish("node-b", {"op": "deliver", "n": 3})
        async with asyncio.timeout(5):
            assert [await inboxes["node-b"].get() for _ in range(2)] == [
                {"op": "deliver", "n": 1},
                {"op": "deliver", "n": 3},
            ]
            assert await inboxes["node-a"].get() == {"op": "lost", "n": 2}
        # Sent last on the connection that sent the first: once it is in, each node has had all it will get.
        await buses[0].publish("node-c", {"op": "deliver", "n": 4})
        async with asyncio.timeout(5):
            assert await inboxes["node-c"].get() == {"op": "deliver", "n": 4}
        assert inboxes["node-a"].empty() and inboxes["node-b"].empty() and inboxes["node-c"].empty()
    finally:
        for bus in buses:
            await bus.close()
