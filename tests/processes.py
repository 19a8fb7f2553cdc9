"""Real `signaling serve` processes on one Redis, for the multi-process tests, and clients registered on them.

    async with serving(redis_url, ("node-a", "node-b"), SIPLITE_NODE_TTL="1") as (a, b):
        alice = await device(a.url, "alice")
        mark = a.mark()
        await alice.close()
        await a.logged("conn.closed", since=mark, user_id="alice")  # a line of its log, when it comes
        a.terminate()                                               # SIGTERM: drain; `kill()` is SIGKILL
        assert await a.exited() == 0

Every process logs JSON at debug level to a pipe that is read all the time (a full pipe would stall the server);
the lines are kept in `Node.log`, and a test waits for the one it needs instead of sleeping. No APNs is
configured, so pushes go to each process's development recorder, read through `GET /dev/pushes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from signaling.auth import issue_token
from signaling.client import Client, Frame, Reconnect, dev_pushes
from tests.harness import SECRET
from tests.test_cli import STARTUP_TIMEOUT, env

# Generous bound on every wait for something another process does, for a loaded 2-core CI machine.
WAIT = 15.0

Line = dict[str, Any]


@dataclass
class Node:
    """One running `signaling serve` process."""

    name: str
    process: asyncio.subprocess.Process
    url: str  # ws://127.0.0.1:port/ws
    log: list[Line] = field(default_factory=list)
    # Notified for each log line, and when the log ends.
    grown: asyncio.Condition = field(default_factory=asyncio.Condition)
    log_ended: bool = False

    @property
    def base(self) -> str:
        return self.url.removesuffix("/ws").replace("ws://", "http://", 1)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].removesuffix("/ws"))

    def kill(self) -> None:
        """SIGKILL: no clean-up, no close frames; its sockets die with it."""
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the process drains (docs/PROTOCOL.md 4.3, close 1012) and exits."""
        self.process.send_signal(signal.SIGTERM)

    async def exited(self, timeout: float = WAIT) -> int:
        """Wait for the process to end; its exit status."""
        async with asyncio.timeout(timeout):
            return await self.process.wait()

    def events(self, name: str) -> list[Line]:
        return [line for line in self.log if line.get("event") == name]

    def mark(self) -> int:
        """Where the log is now: pass it as `since` to wait only for what comes after."""
        return len(self.log)

    async def logged(
        self,
        event: str,
        *,
        since: int = 0,
        count: int = 1,
        where: Callable[[Line], bool] = lambda line: True,
        timeout: float = WAIT,
        **fields: object,
    ) -> Line:
        """The `count`th log line from `since` on with this event name and these field values (and for which
        `where` is true), waiting for it."""

        def found() -> Line | None:
            matching = (
                line
                for line in self.log[since:]
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()) and where(line)
            )
            return next(itertools.islice(matching, count - 1, None), None)

        try:
            async with asyncio.timeout(timeout), self.grown:
                line = await self.grown.wait_for(lambda: found() or self.log_ended)
        except TimeoutError:
            raise AssertionError(f"{self.name} logged no {count} {event} {fields} within {timeout}s") from None
        if not isinstance(line, dict):
            raise AssertionError(f"{self.name} exited without logging {event} {fields}: {self.log[-5:]}")
        return line

    async def ready(self) -> int:
        """The status `GET /readyz` answers (200 ready, 503 not)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.base}/readyz") as response:
            return response.status

    async def pushes(self, token: str, *, wait: float = 0.0) -> list[Frame]:
        """The pushes this process recorded for the devices of `token`'s user (`GET /dev/pushes`)."""
        return await dev_pushes(self.url, token, wait=wait)


async def _read_log(node: Node, stderr: asyncio.StreamReader) -> None:
    while raw := await stderr.readline():
        try:
            line: Line = json.loads(raw)
        except ValueError:  # a traceback or a warning printed past the logger: kept as text
            line = {"event": "stderr", "text": raw.decode(errors="replace")}
        async with node.grown:
            node.log.append(line)
            node.grown.notify_all()
    async with node.grown:
        node.log_ended = True
        node.grown.notify_all()


@asynccontextmanager
async def serving(redis_url: str, names: Sequence[str], **settings: str) -> AsyncIterator[list[Node]]:
    """Start one process per name (its `SIPLITE_NODE_ID`) on `redis_url`, all at once, and yield them once each
    has logged `server.listening`. `settings` are more `SIPLITE_*` variables. Every process still running at the
    end is killed."""
    started: list[tuple[Node, asyncio.Task[None]]] = []
    try:
        for name in names:
            environ = env(
                SIPLITE_REDIS_URL=redis_url,
                SIPLITE_NODE_ID=name,
                SIPLITE_JWT_SECRET=SECRET,
                SIPLITE_LOG_LEVEL="debug",
                **settings,
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "signaling", "serve", env=environ, stderr=PIPE
            )
            assert proc.stderr is not None
            node = Node(name, proc, "")
            started.append((node, asyncio.create_task(_read_log(node, proc.stderr))))
        for node, _ in started:
            listening = await node.logged("server.listening", timeout=STARTUP_TIMEOUT)
            node.url = f"ws://127.0.0.1:{listening['port']}/ws"
        yield [node for node, _ in started]
    finally:
        for node, _ in started:
            if node.process.returncode is None:
                node.kill()
        for node, reader in started:
            await node.process.wait()
            await reader


@asynccontextmanager
async def node(redis_url: str, name: str, **settings: str) -> AsyncIterator[Node]:
    """One process, as `serving` starts them."""
    async with serving(redis_url, (name,), **settings) as (started,):
        yield started


def token(user: str) -> str:
    return issue_token(user, key=SECRET, now=time.time(), ttl=600)


async def device(
    url: str,
    user: str,
    device_id: str | None = None,
    *,
    push: dict[str, Any] | None = None,
    reconnect: Reconnect | None = None,
    keepalive: bool = False,
) -> Client:
    """A client connected to `url` and registered as `user`'s device (`<user>-phone` unless named), whose waits
    default to `WAIT`."""
    client = await Client.connect(url, reconnect=reconnect)
    client.default_timeout = WAIT
    try:
        await client.register(token(user), device_id or f"{user}-phone", push=push, keepalive=keepalive)
    except BaseException:
        with contextlib.suppress(Exception):
            await client.close()
        raise
    return client
