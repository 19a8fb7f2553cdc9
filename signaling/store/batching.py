"""Automatic pipelining: the Redis commands that store operations issue close together share round trips.

Each awaited round trip through redis-py's asyncio client costs this process far more CPU (pool checkout, a
timeout context, a write that wakes Redis, a read) than the command itself, and a signaling server issues its
store operations from many calls at once. `Batcher` queues every command issued while one event-loop iteration
runs and sends them as one pipeline when that iteration ends, so under load one round trip carries the commands
of many calls. An operation on its own still takes exactly one round trip, and one operation's commands always
travel together, in order.

At most `max_in_flight` pipelines are in flight at once (so at most that many pooled connections are in use:
redis-py's pool raises once it has handed out all of its connections, it does not wait); commands issued while
all of them are busy wait for the next one and go together.

Replies are returned as they come, errors included: a command that failed resolves to its exception instance
(as `Pipeline.execute(raise_on_error=False)` gives it), and only a failure of the whole round trip (the
connection) is raised, to every command of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "Batcher", "Pipelined"]

DEFAULT_MAX_IN_FLIGHT: Final = 8

Command = tuple[Any, ...]


class _Pipeline(Protocol):
    def execute_command(self, *args: Any, **options: Any) -> Any: ...

    async def execute(self, raise_on_error: bool = True) -> list[Any]: ...


class Pipelined(Protocol):
    """What a `Batcher` needs of a client: redis-py's `Redis` and `RedisCluster` both qualify."""

    def pipeline(self, transaction: bool = ...) -> Any: ...


class Batcher:
    """Send the commands issued during one event-loop iteration as one pipeline (see the module docstring)."""

    def __init__(
        self, client: Pipelined, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, timeout: float | None = None
    ) -> None:
        """`timeout` bounds each round trip (seconds; None: no bound): one deadline for the whole pipeline is
        much cheaper than redis-py's `socket_timeout`, which opens a timeout context for every reply read.
        A round trip past it raises redis-py's `TimeoutError`, and redis-py drops the connection whose read
        was cut short, so no late reply is ever taken for another command's."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._client = client
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        # One entry per `execute` call: its commands, and the future of their replies.
        self._queued: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self.round_trips = 0
        """Pipelines sent so far (for tests and benchmarks)."""

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` (each a command name and its arguments) with whatever else is issued in this
        iteration, and return their replies in order; a failed command's reply is its exception. Raises what
        the client raised if the round trip itself failed."""
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queued.append((commands, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        # A caller cancelled before its commands left takes them out of the batch (the future is done).
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        if len(self._in_flight) >= self._max_in_flight:
            return  # the pipeline that finishes next sends what is queued
        batch = [(commands, future) for commands, future in self._queued if not future.done()]
        self._queued = []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._queued and not self._scheduled:
            self._flush()

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        self.round_trips += 1
        try:
            sent = [command for commands, _ in batch for command in commands]
            replies = await self._pipeline(sent)
            # A Redis Cluster pipeline hands a node's connection failure back as the reply of each command
            # sent to that node, where one server's pipeline raises it and its client retries once (a pooled
            # connection that died). Those commands are sent once more, as one server's client would: by then
            # the cluster client has asked for a fresh slot map, so after a failover they reach the new master.
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, RedisConnectionError)]
            if lost:
                self.round_trips += 1
                for i, reply in zip(lost, await self._pipeline([sent[i] for i in lost]), strict=True):
                    replies[i] = reply
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        at = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[at : at + len(commands)])
            at += len(commands)

    async def _pipeline(self, commands: Sequence[Command]) -> list[Any]:
        pipe: _Pipeline = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            async with asyncio.timeout(self._timeout):
                return list(await pipe.execute(raise_on_error=False))
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no reply from Redis within {self._timeout:g} s") from exc

    async def close(self) -> None:
        """Wait for the pipelines in flight (their callers get their replies)."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
