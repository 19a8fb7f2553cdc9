"""A running SIP-lite server on a real socket, with a manual clock, and helpers to connect clients to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from push.base import PushProvider
from signaling.auth import issue_token
from signaling.client import Client
from signaling.clock import ManualClock
from signaling.config import Settings
from signaling.server import SWITCHBOARD, Switchboard, create_app
from signaling.store import Store

SECRET = "test-secret-0123456789abcdef0123456789"
OFFER = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
ANSWER = "v=0\r\no=- 2 1 IN IP4 192.0.2.2\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
PUSH = {"platform": "ios", "bundle_id": "com.example.app", "environment": "sandbox", "voip_token": "ab" * 32}


def make_settings(**overrides: Any) -> Settings:
    base = Settings(jwt_secret=SECRET, node_id="node-a", log_level="warning", log_format="json")
    return replace(base, **overrides).validate()


@dataclass
class Harness:
    """A server plus the clients a test opened on it (closed at the end)."""

    url: str
    clock: ManualClock
    settings: Settings
    app: web.Application
    clients: list[Client] = field(default_factory=list)

    @property
    def board(self) -> Switchboard:
        return self.app[SWITCHBOARD]

    def token(self, user: str, *, ttl: float = 3600.0, name: str | None = None, key: str = SECRET) -> str:
        return issue_token(user, key=key, now=self.clock.now(), ttl=ttl, name=name)

    async def settle(self) -> None:
        """Wait until every task the server has spawned is done, and those they spawned in turn: the work a
        `clock.advance()` set off (timers firing, VoIP pushes and their answers). Frames it sent are then on their
        way; a client's round trip (`keepalive()`) after this has them all. For asserting that something did
        not happen."""
        tasks = self.board._tasks
        async with asyncio.timeout(5):
            while tasks:
                await asyncio.wait(set(tasks))

    async def connect(self, *, encoding: str = "msgpack", protocols: tuple[str, ...] | None = None) -> Client:
        client = await Client.connect(self.url, encoding=encoding, protocols=protocols)
        self.clients.append(client)
        return client

    async def device(
        self,
        user: str,
        device_id: str | None = None,
        *,
        encoding: str = "msgpack",
        name: str | None = None,
        push: dict[str, Any] | None = None,
    ) -> Client:
        """A connected, registered device of `user`."""
        client = await self.connect(encoding=encoding)
        await client.register(self.token(user, name=name), device_id or f"{user}-phone", push=push)
        return client

    async def asleep(self, user: str, device_id: str, voip_token: str, **push: Any) -> dict[str, Any]:
        """Register a device with a VoIP token, then close it cleanly, as iOS does to an app it suspends.
        Returns the push binding it registered (for registering again when woken)."""
        binding = {**PUSH, "voip_token": voip_token, **push}
        client = await self.device(user, device_id, push=binding)
        server_side = self.board.bound[(user, device_id)]
        await client.close()
        self.clients.remove(client)
        # The server handles the close on its own schedule; wait until it has dropped the binding.
        async with asyncio.timeout(5):
            await server_side.finished.wait()
        return binding


@asynccontextmanager
async def running(
    settings: Settings, store: Store | None, clock: ManualClock, push: PushProvider | None = None
) -> AsyncIterator[Harness]:
    app = create_app(settings, store=store, clock=clock, push=push)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    harness = Harness(str(server.make_url("/ws")), clock, settings, app)
    try:
        yield harness
    finally:
        for client in harness.clients:
            await client.close()
        await server.close()
