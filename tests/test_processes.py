"""Real `signaling serve` processes on one real Redis, one of them killed with SIGKILL mid-call.

Time here is the real clock (these are separate processes): the processes run with a 1 s node TTL and a 1 s
re-attach grace, so a crash is noticed within about a second and a half; every wait is on a frame the surviving
party receives, bounded by a timeout, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from signaling.auth import issue_token
from signaling.client import Client
from tests.harness import ANSWER, OFFER, PUSH, SECRET
from tests.test_cli import STARTUP_TIMEOUT, env

# Generous bound on "within the node TTL plus a heartbeat", for a loaded CI machine.
NOTICED = 8.0


@dataclass
class Node:
    process: asyncio.subprocess.Process
    url: str
    log: list[dict[str, object]] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL: no clean-up, no close frames; its sockets die with it."""
        self.process.send_signal(signal.SIGKILL)

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in self.log if line.get("event") == name]


@asynccontextmanager
async def node(redis_url: str, name: str) -> AsyncIterator[Node]:
    environ = env(
        SIPLITE_REDIS_URL=redis_url,
        SIPLITE_NODE_ID=name,
        SIPLITE_JWT_SECRET=SECRET,
        SIPLITE_NODE_TTL="1",
        SIPLITE_REATTACH_GRACE="1",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "serve", env=environ, stderr=PIPE
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    log: list[dict[str, object]] = []

    async def read_line() -> dict[str, object] | None:
        raw = await stderr.readline()
        if not raw:
            return None
        line: dict[str, object] = json.loads(raw)
        log.append(line)
        return line

    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while (line := await read_line()) is None or line["event"] != "server.listening":
                if line is None:
                    raise AssertionError(f"{name} exited early: {log}")

        async def keep_reading() -> None:  # a full pipe would stall the server
            while await read_line() is not None:
                pass

        drain = asyncio.create_task(keep_reading())
        yield Node(proc, f"ws://127.0.0.1:{line['port']}/ws", log)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            await drain


def token(user: str) -> str:
    return issue_token(user, key=SECRET, now=time.time(), ttl=600)


async def device(url: str, user: str, push: dict[str, Any] | None = None) -> Client:
    client = await Client.connect(url)
    await client.register(token(user), f"{user}-phone", push=push)
    return client


@pytest.fixture
async def two(redis_url: str) -> AsyncIterator[tuple[Node, Node]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(node(redis_url, "node-a"))
        b = await stack.enter_async_context(node(redis_url, "node-b"))
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
    await phone.close()
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
