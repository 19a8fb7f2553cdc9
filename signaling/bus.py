"""The node bus: how one server process reaches a connection that another process holds.

Every process subscribes to one channel of its own, `P` + `node:{<node_id>}`, and a message for a connection is
published to the channel of the node its binding names (bindings carry `node_id`, see `signaling.models`). There
is no coordinator and no sticky routing: the call's owner (the caller's node) talks to each callee device's node
directly, and any node can find any device through the store.

Why Redis pub/sub and not streams: a message on the bus is a frame for a live socket, useful for a few hundred
milliseconds and to one process only. Pub/sub delivers it in one hop, in order per publisher, at the cost of one
PUBLISH, and keeps nothing: a process that is down has lost its sockets too, so there is nobody to replay to, and
a call whose party is gone is ended by the presence and ring timers, not by a backlog. Streams would add an XADD,
a blocking XREAD per node, trimming and acknowledgement for durability nobody can use. The one thing pub/sub does
not give, knowing that a message reached a socket, the protocol gets end to end: a `deliver` that finds no
connection is answered with `lost` (see `signaling.server`).

Messages are msgpack maps with an `op` and the sending node in `from`; frames for clients travel as the maps
`signaling.wire.to_map` makes (the receiving connection numbers and encodes them), frames from clients as the
bytes the client sent.

The bus takes the store's URL (see `signaling.redis_url`). On a Redis Cluster (`redis+cluster://`) it uses
sharded pub/sub, SSUBSCRIBE and SPUBLISH (Redis 7+): the channel name carries the node id as a hash tag, so each
channel lives in one slot and a message goes to the one master that serves it, where classic PUBLISH would be
copied over the cluster bus to every node (before Redis 7, which has no sharded pub/sub, the bus falls back to
that classic pub/sub on a cluster too). When the channel's master fails, the subscriber subscribes again
where the slot map says the channel now lives (a replica that took over); redis-py moves a subscription whose
slot migrates while its node stays up. Behind Sentinel (`redis+sentinel://`) it is classic pub/sub on the
master, subscribed again on the new master after a failover. Either way, messages published in between are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import msgpack
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from signaling import log, redis_url
from signaling.errors import StoreUnavailable

logger = log.get_logger("signaling.bus")

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[None]]

# Seconds between reconnection attempts of a subscriber that lost Redis.
_RESUBSCRIBE_DELAY: Final = 0.5

# Longest wait for one read of a cluster subscription. A read returns as soon as a message arrives; the bound
# only lets redis-py move the subscription between reads when the channel's slot changes hands.
_SHARDED_READ_TIMEOUT: Final = 1.0


class Bus(Protocol):
    """Publish to another node's channel; receive this node's messages, in order, one at a time."""

    async def start(self, node_id: str, handler: Handler) -> None:
        """Subscribe to `node_id`'s channel; `handler` is awaited for each message, in arrival order."""
        ...

    async def publish(self, node_id: str, message: Message) -> None:
        """Send `message` to `node_id`'s channel. Raises `StoreUnavailable` when the bus cannot be reached."""
        ...

    async def close(self) -> None: ...


class LocalBus:
    """The bus of a single process (the in-memory store): there is no other node to reach."""

    async def start(self, node_id: str, handler: Handler) -> None:
        self._node_id = node_id
        self._handler = handler

    async def publish(self, node_id: str, message: Message) -> None:
        # Bindings of the in-memory store all name this process; a message for another node has no recipient.
        if node_id == self._node_id:
            await self._handler(message)
        else:
            logger.warning("bus.no_such_node", node_id=node_id, op=message.get("op"))

    async def close(self) -> None:
        return None


class RedisBus:
    """The bus over Redis pub/sub, on a client of its own (binary replies; one connection subscribes): sharded
    pub/sub on a Redis Cluster, classic pub/sub on one server or a Sentinel-managed master. `url` is any form
    `signaling.redis_url` accepts (a malformed one raises `ValueError`).

    `sharded` chooses for a cluster: None (the default) asks the cluster at `start` and uses sharded pub/sub
    from Redis 7 on and classic pub/sub before, which a cluster broadcasts to every node; True or False
    forces one or the other."""

    def __init__(self, url: str, prefix: str, *, sharded: bool | None = None) -> None:
        self._target = redis_url.parse(url)
        self._redis = self._connect()
        self._client = self._redis.client
        self._sharded = sharded if isinstance(self._client, redis.asyncio.RedisCluster) else False
        self._prefix = prefix
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def subscribed(self) -> asyncio.Event:
        """Set while this node's channel is subscribed; cleared while Redis is out of reach."""
        return self._subscribed

    def channel(self, node_id: str) -> str:
        return f"{self._prefix}node:{{{node_id}}}"

    @property
    def sharded(self) -> bool | None:
        """Whether the bus uses sharded pub/sub (known after `start` on a cluster)."""
        return self._sharded

    async def start(self, node_id: str, handler: Handler) -> None:
        if self._sharded is None and isinstance(self._client, redis.asyncio.RedisCluster):
            try:
                info = await self._client.info("server")
            except redis_url.ERRORS as exc:
                raise StoreUnavailable(f"bus start failed: {self._target.explain(exc)}") from exc
            self._sharded = int(str(info["redis_version"]).split(".")[0]) >= 7
        self._reader = asyncio.create_task(self._read(self.channel(node_id), handler), name="bus-reader")
        async with asyncio.timeout(5):
            await self._subscribed.wait()

    async def publish(self, node_id: str, message: Message) -> None:
        channel, data = self.channel(node_id), msgpack.packb(message)
        try:
            if self._sharded and isinstance(self._client, redis.asyncio.RedisCluster):
                await self._client.spublish(channel, data)
            else:
                await self._client.publish(channel, data)
        except redis_url.ERRORS as exc:
            raise StoreUnavailable(f"bus publish failed: {self._target.explain(exc)}") from exc

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._redis.aclose()

    async def _read(self, channel: str, handler: Handler) -> None:
        # Re-subscribes by itself after Redis went away: messages published meanwhile are lost (see above).
        while True:
            try:
                if isinstance(self._client, redis.asyncio.RedisCluster):
                    await self._read_cluster(channel, handler)
                else:
                    await self._read_classic(self._client, channel, handler)
            except asyncio.CancelledError:
                raise
            except redis_url.ERRORS as exc:
                if self._subscribed.is_set():
                    logger.warning("bus.disconnected", error=self._target.explain(exc))
                self._subscribed.clear()
                await asyncio.sleep(_RESUBSCRIBE_DELAY)

    async def _read_classic(self, client: redis_url.Client, channel: str, handler: Handler) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            self._subscribed.set()
            async for item in pubsub.listen():
                if item.get("type") == "message":
                    await self._handle(item["data"], handler)

    async def _read_cluster(self, channel: str, handler: Handler) -> None:
        # Each subscription gets a cluster client of its own, which reads the slot map afresh. A failed
        # (S)SUBSCRIBE does not make redis-py refresh a client's map: after a failover, a client that had read
        # the map before the replica took over would try the dead master again and again.
        subscriber = self._connect()
        try:
            if not isinstance(subscriber.client, redis.asyncio.RedisCluster):
                raise TypeError("a cluster URL gave a client for one server")
            if self._sharded:
                await self._read_sharded(subscriber.client, channel, handler)
            else:
                await self._read_classic(subscriber.client, channel, handler)
        finally:
            await subscriber.aclose()

    async def _read_sharded(self, client: redis.asyncio.RedisCluster, channel: str, handler: Handler) -> None:
        pubsub = client.pubsub()
        try:
            await pubsub.ssubscribe(channel)
            self._subscribed.set()
            while True:
                item = await pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=_SHARDED_READ_TIMEOUT
                )
                if item is not None and item.get("type") == "smessage":
                    await self._handle(item["data"], handler)
        finally:
            await pubsub.aclose()

    def _connect(self) -> redis_url.RedisClient:
        # As in the store: one immediate retry hides a pooled connection that died.
        return self._target.connect(socket_connect_timeout=2.0, retry=Retry(NoBackoff(), retries=1))

    async def _handle(self, data: bytes, handler: Handler) -> None:
        try:
            message = msgpack.unpackb(data)
        except (ValueError, msgpack.ExtraData) as exc:
            logger.error("bus.unreadable", error=str(exc))
            return
        if not isinstance(message, dict):
            logger.error("bus.unreadable", error="not a map")
            return
        try:
            await handler(message)
        except Exception:
            logger.exception("bus.handler_crashed", op=message.get("op"))
