"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis

from push.apns import ApnsConfig, ApnsProvider
from signaling.clock import ManualClock
from signaling.store import MemoryStore, Store
from signaling.store.redis import RedisStore
from tests.apns_server import ApnsPki, ApnsServer, make_pki
from tests.harness import Harness, make_settings, running
from tests.redis_server import RedisClusterServers, RedisSentinelServers, RedisServer

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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """One real Redis Cluster (three masters, no replicas) for the whole session, started on first use."""
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> Iterator[str]:
    """The session cluster's `redis+cluster://` URL, every node emptied so the test starts from nothing."""
    redis_cluster.flush()
    yield redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServers]:
    """A real redis-server and a Sentinel monitoring it, for the whole session, started on first use."""
    with RedisSentinelServers() as servers:
        yield servers


@pytest.fixture
def redis_sentinel_url(redis_sentinel: RedisSentinelServers) -> Iterator[str]:
    """The session Sentinel's `redis+sentinel://` URL, its master emptied so the test starts from nothing."""
    redis_sentinel.flush()
    yield redis_sentinel.url


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


# --- APNs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def apns_pki(tmp_path_factory: pytest.TempPathFactory) -> ApnsPki:
    """A CA, server and client certificates and a .p8 signing key for the local APNs stand-in."""
    return make_pki(tmp_path_factory.mktemp("apns-pki"))


@pytest.fixture
async def apns_server(apns_pki: ApnsPki) -> AsyncIterator[ApnsServer]:
    """A local APNs-compatible HTTP/2 server over TLS (see tests/apns_server.py)."""
    server = ApnsServer(apns_pki)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def apns_config(apns_server: ApnsServer) -> ApnsConfig:
    """Token auth, both environments pointing at `apns_server`, 2 s timeout, 10 ms backoff, no keep-warm."""
    return apns_server.config()


@pytest.fixture
async def apns_provider(apns_config: ApnsConfig) -> AsyncIterator[ApnsProvider]:
    """A started `ApnsProvider` on `apns_config` (the real aioapns client), closed at the end."""
    provider = ApnsProvider(apns_config)
    await provider.start()
    yield provider
    await provider.close()


# --- a running server that wakes devices through the local APNs ----------------------------------------------


@dataclass
class Wake:
    """A server whose pushes go through the real aioapns client to the local APNs stand-in."""

    sip: Harness
    apns: ApnsServer


@pytest.fixture(params=["memory", "redis"])
async def wake(
    request: pytest.FixtureRequest, manual_clock: ManualClock, apns_server: ApnsServer
) -> AsyncIterator[Wake]:
    settings = make_settings()
    store: Store = (
        RedisStore(request.getfixturevalue("redis_url"), manual_clock)
        if request.param == "redis"
        else MemoryStore(manual_clock)
    )
    provider = ApnsProvider(apns_server.config(request_timeout=1.0), clock=manual_clock.now)
    async with running(settings, store, manual_clock, provider) as harness:
        yield Wake(harness, apns_server)
