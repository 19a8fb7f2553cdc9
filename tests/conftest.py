"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from signaling.clock import ManualClock
from signaling.store import MemoryStore, Store
from signaling.store.redis import RedisStore
from tests.harness import Harness, make_settings, running
from tests.redis_server import RedisServer

# --- time --------------------------------------------------------------------------------------------------------


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock that moves only when the test calls `advance()`."""
    return ManualClock()


# --- Redis -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session, started on first use; fails if it is not on PATH."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, emptied (FLUSHALL) so the test starts from nothing."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    yield redis_server.url


# --- a running server ----------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def sip(request: pytest.FixtureRequest, manual_clock: ManualClock) -> AsyncIterator[Harness]:
    """A SIP-lite server on a real socket, over each store backend, with a manual clock."""
    settings = make_settings()
    store: Store
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, manual_clock)
    else:
        store = MemoryStore(manual_clock)
    async with running(settings, store, manual_clock) as harness:
        yield harness
