"""The store contract, written once and run against every backend.

Time is a `ManualClock` shared by the test and the store: expiry is driven by `advance()`, never by sleeping,
and Redis TTLs (garbage collection only) never come into play. Tests at the end are Redis-specific: key
layout, command counts, and failure reporting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling import redis_url
from signaling.clock import ManualClock
from signaling.errors import StoreUnavailable
from signaling.models import (
    Binding,
    CallPhase,
    CallRecord,
    CallRef,
    Device,
    Notice,
    NoticeKind,
    Platform,
    PushBinding,
    PushEnvironment,
)
from signaling.store.base import MAX_NOTICES, CallOpened, Presence, Registered, Store
from signaling.store.memory import DEFAULT_DEVICE_TTL, SWEEP_INTERVAL, MemoryStore
from signaling.store.redis import GC_SLACK, RedisStore
from tests.redis_server import RedisClusterServers, RedisServer, free_port

PUSH = PushBinding(
    platform=Platform.IOS,
    bundle_id="org.example.siplite",
    environment=PushEnvironment.PRODUCTION,
    voip_token="ab" * 32,
    alert_token="cd" * 32,
)

MANY = 100
"""A `max_devices` that no test reaches unless it means to."""


# --- fixtures ----------------------------------------------------------------------------------------------------


class MakeStore(Protocol):
    async def __call__(self, *, device_ttl: float = DEFAULT_DEVICE_TTL) -> Store: ...


REDIS_URL_FIXTURES = {"redis": "redis_url", "cluster": "redis_cluster_url", "sentinel": "redis_sentinel_url"}
"""The fixture that gives an empty Redis of each kind: one server, a Redis Cluster, a master Sentinel names."""


@pytest.fixture(params=["memory", *REDIS_URL_FIXTURES])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory backend, else the URL of an empty Redis of the kind under test."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue(REDIS_URL_FIXTURES[request.param])
    return url


@pytest.fixture
async def make_store(backend_url: str | None, manual_clock: ManualClock) -> AsyncIterator[MakeStore]:
    """Build started stores of the backend under test (all on `manual_clock`), closed at teardown."""
    stores: list[Store] = []

    async def make(*, device_ttl: float = DEFAULT_DEVICE_TTL) -> Store:
        store: Store
        if backend_url is None:
            store = MemoryStore(manual_clock, device_ttl=device_ttl)
        else:
            store = RedisStore(backend_url, manual_clock, device_ttl=device_ttl)
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


@dataclass(frozen=True)
class EmptyRedis:
    url: str
    """What a store is given."""
    masters: tuple[str, ...]
    """A `redis://` URL for each master (one, or each of a cluster's), for per-server statistics."""


@pytest.fixture(params=["redis", "cluster"])
def empty_redis(request: pytest.FixtureRequest) -> EmptyRedis:
    """An empty redis-server, or an empty Redis Cluster, for the tests that look at what the store wrote."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return EmptyRedis(url, (url,))
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return EmptyRedis(request.getfixturevalue("redis_cluster_url"), tuple(s.url for s in cluster.servers))


@pytest.fixture
async def redis_store(empty_redis: EmptyRedis, manual_clock: ManualClock) -> AsyncIterator[RedisStore]:
    store = RedisStore(empty_redis.url, manual_clock)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def redis_client(empty_redis: EmptyRedis) -> AsyncIterator[redis_url.Client]:
    """A separate client for looking behind the store's back (a cluster client on a cluster)."""
    client = redis_url.parse(empty_redis.url).connect(decode_responses=True)
    yield client.client
    await client.aclose()


# --- helpers -----------------------------------------------------------------------------------------------------


def make_device(
    clock: ManualClock,
    user_id: str = "alice",
    device_id: str = "phone",
    *,
    push: PushBinding | None = PUSH,
    registered_at: float | None = None,
) -> Device:
    at = clock.now() if registered_at is None else registered_at
    return Device(user_id=user_id, device_id=device_id, push=push, registered_at=at)


def make_binding(
    clock: ManualClock,
    user_id: str = "alice",
    device_id: str = "phone",
    conn_id: str = "conn-1",
    *,
    node_id: str = "node-1",
    ttl: float = 60.0,
) -> Binding:
    return Binding(user_id, device_id, conn_id, node_id, expires_at=clock.now() + ttl)


async def register(
    store: Store,
    clock: ManualClock,
    user_id: str = "alice",
    device_id: str = "phone",
    conn_id: str = "conn-1",
    *,
    node_id: str = "node-1",
    ttl: float = 60.0,
    max_devices: int = MANY,
    registered_at: float | None = None,
) -> tuple[Binding, Registered]:
    """Register (user, device) on `conn_id`; return the new binding and what the store answered."""
    binding = make_binding(clock, user_id, device_id, conn_id, node_id=node_id, ttl=ttl)
    device = make_device(clock, user_id, device_id, registered_at=registered_at)
    return binding, await store.register(binding, device, max_devices)


async def take_notices(
    store: Store, clock: ManualClock, user_id: str = "alice", device_id: str = "phone"
) -> tuple[Notice, ...]:
    """Register (user, device) and return the notices it took."""
    _, registered = await register(store, clock, user_id, device_id)
    return registered.notices


def make_notice(
    clock: ManualClock,
    call_id: str = "call-1",
    *,
    kind: NoticeKind = NoticeKind.MISSED,
    at: float | None = None,
    ttl: float = 3600.0,
    caller_name: str | None = "Bob Example",
    video: bool = False,
    reason: str | None = None,
) -> Notice:
    when = clock.now() if at is None else at
    return Notice(
        kind=kind,
        call_id=call_id,
        caller_id="bob",
        caller_name=caller_name,
        video=video,
        at=when,
        expires_at=clock.now() + ttl,
        reason=reason,
    )


def make_call(call_id: str = "call-1", callee: str = "bob", **changes: Any) -> CallRecord:
    record = CallRecord(
        call_id=call_id,
        caller_user="alice",
        caller_device="phone",
        callee_user=callee,
        node_id="node-1",
        phase=CallPhase.RINGING,
        created_at=1_800_000_000.25,
    )
    return dataclasses.replace(record, **changes)


def device_ids(presence: Presence) -> list[str]:
    return [d.device_id for d in presence.devices]


def conn_ids(presence: Presence) -> list[str]:
    return [b.conn_id for b in presence.bindings]


# --- registration and presence -----------------------------------------------------------------------------------


async def test_register_then_presence(store: Store, manual_clock: ManualClock) -> None:
    binding, registered = await register(store, manual_clock)

    assert registered == Registered(replaced=None, notices=())
    assert await store.presence("alice") == Presence(devices=(make_device(manual_clock),), bindings=(binding,))
    assert await store.presence("bob") == Presence(devices=(), bindings=())


async def test_presence_of_unknown_user_is_empty(store: Store) -> None:
    assert await store.presence("nobody") == Presence(devices=(), bindings=())


async def test_presence_lists_every_device_and_only_live_bindings(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, device_id="phone", conn_id="c1", ttl=10)
    await register(store, manual_clock, device_id="ipad", conn_id="c2", ttl=100)
    manual_clock.advance(10)

    presence = await store.presence("alice")

    assert device_ids(presence) == ["ipad", "phone"]
    assert conn_ids(presence) == ["c2"]


async def test_reregister_from_another_connection_returns_the_replaced_binding(
    store: Store, manual_clock: ManualClock
) -> None:
    old, _ = await register(store, manual_clock, conn_id="c1", node_id="node-1")
    manual_clock.advance(5)

    new, registered = await register(store, manual_clock, conn_id="c2", node_id="node-2")

    assert registered.replaced == old
    presence = await store.presence("alice")
    assert presence.bindings == (new,)
    assert presence.devices == (make_device(manual_clock),)


async def test_reregister_from_the_same_connection_replaces_nothing(
    store: Store, manual_clock: ManualClock
) -> None:
    await register(store, manual_clock, conn_id="c1")
    manual_clock.advance(5)

    new, registered = await register(store, manual_clock, conn_id="c1", ttl=120)

    assert registered.replaced is None
    assert (await store.presence("alice")).bindings == (new,)


async def test_expired_binding_is_absent_and_not_reported_as_replaced(
    store: Store, manual_clock: ManualClock
) -> None:
    old, _ = await register(store, manual_clock, conn_id="c1", ttl=30)
    manual_clock.advance(29.5)
    assert (await store.presence("alice")).bindings == (old,)

    manual_clock.advance(0.5)  # now == expires_at: expired
    presence = await store.presence("alice")
    assert presence.bindings == ()
    assert device_ids(presence) == ["phone"]

    _, registered = await register(store, manual_clock, conn_id="c2")
    assert registered.replaced is None


async def test_register_rejects_inconsistent_arguments(store: Store, manual_clock: ManualClock) -> None:
    binding = make_binding(manual_clock, device_id="phone")
    with pytest.raises(ValueError, match="device_id"):
        await store.register(binding, make_device(manual_clock, device_id="ipad"), MANY)
    with pytest.raises(ValueError, match="max_devices"):
        await store.register(binding, make_device(manual_clock), 0)
    assert await store.presence("alice") == Presence(devices=(), bindings=())


async def test_unregister_only_by_the_owning_connection(store: Store, manual_clock: ManualClock) -> None:
    binding, _ = await register(store, manual_clock, conn_id="c1")

    assert await store.unregister("alice", "phone", "c2") is False
    assert (await store.presence("alice")).bindings == (binding,)

    assert await store.unregister("alice", "phone", "c1") is True
    presence = await store.presence("alice")
    assert presence.bindings == ()
    assert device_ids(presence) == ["phone"]  # the device record stays, for push
    assert await store.unregister("alice", "phone", "c1") is False
    assert await store.unregister("nobody", "phone", "c1") is False


async def test_unregister_by_a_replaced_connection_leaves_the_new_binding(
    store: Store, manual_clock: ManualClock
) -> None:
    await register(store, manual_clock, conn_id="c1")
    new, _ = await register(store, manual_clock, conn_id="c2")

    assert await store.unregister("alice", "phone", "c1") is False
    assert (await store.presence("alice")).bindings == (new,)


async def test_unregister_of_an_expired_binding_reports_nothing_removed(
    store: Store, manual_clock: ManualClock
) -> None:
    await register(store, manual_clock, conn_id="c1", ttl=10)
    manual_clock.advance(10)

    assert await store.unregister("alice", "phone", "c1") is False


async def test_refresh_extends_owned_bindings_and_ignores_the_rest(
    store: Store, manual_clock: ManualClock
) -> None:
    await register(store, manual_clock, "alice", "phone", "c1", ttl=30)
    await register(store, manual_clock, "alice", "ipad", "c2", ttl=30)
    await register(store, manual_clock, "bob", "phone", "c3", ttl=30)
    await register(store, manual_clock, "carol", "phone", "c4", ttl=30)
    await register(store, manual_clock, "carol", "phone", "c5", ttl=30)  # c4 lost carol's phone
    manual_clock.advance(20)

    extended = [
        make_binding(manual_clock, "alice", "phone", "c1", ttl=60),
        make_binding(manual_clock, "bob", "phone", "c3", node_id="node-2", ttl=60),
    ]
    ignored = [
        make_binding(manual_clock, "carol", "phone", "c4", ttl=60),  # no longer the owner
        make_binding(manual_clock, "alice", "ipad", "c9", ttl=60),  # never the owner
        make_binding(manual_clock, "dave", "phone", "c6", ttl=60),  # never registered
    ]
    # Only the binding with no live owner at all is reported lost; carol's phone moved to c5.
    assert await store.refresh([*extended, *ignored]) == [ignored[2]]
    manual_clock.advance(30)  # past the original expiry, before the new one

    assert (await store.presence("alice")).bindings == (extended[0],)
    assert (await store.presence("bob")).bindings == (extended[1],)
    assert (await store.presence("carol")).bindings == ()
    assert await store.presence("dave") == Presence(devices=(), bindings=())


async def test_refresh_does_not_revive_an_expired_binding(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, conn_id="c1", ttl=10)
    manual_clock.advance(10)

    lost = make_binding(manual_clock, conn_id="c1", ttl=60)
    assert await store.refresh([lost]) == [lost]  # reported, for the caller to register again

    assert (await store.presence("alice")).bindings == ()


async def test_refresh_of_nothing_is_a_no_op(store: Store) -> None:
    assert await store.refresh([]) == []


async def test_max_devices_evicts_the_least_recently_registered(store: Store, manual_clock: ManualClock) -> None:
    for n, device_id in enumerate(["d1", "d2", "d3"]):
        await register(store, manual_clock, device_id=device_id, conn_id=f"c{n}", max_devices=3)
        manual_clock.advance(1)
    # Re-registering a known device at the limit evicts nothing, and makes d1 the most recent.
    await register(store, manual_clock, device_id="d1", conn_id="c9", max_devices=3)
    assert device_ids(await store.presence("alice")) == ["d1", "d2", "d3"]
    manual_clock.advance(1)

    _, registered = await register(store, manual_clock, device_id="d4", conn_id="c4", max_devices=3)

    assert registered.replaced is None  # eviction is not replacement
    presence = await store.presence("alice")
    assert device_ids(presence) == ["d1", "d3", "d4"]
    assert sorted(conn_ids(presence)) == ["c2", "c4", "c9"]  # d2's binding went with it
    assert await store.unregister("alice", "d2", "c1") is False


async def test_max_devices_never_evicts_the_device_being_registered(
    store: Store, manual_clock: ManualClock
) -> None:
    await register(store, manual_clock, device_id="new", conn_id="c1")
    await register(store, manual_clock, device_id="newer", conn_id="c2")
    oldest = manual_clock.now() - 1000

    await register(store, manual_clock, device_id="old", conn_id="c3", registered_at=oldest, max_devices=1)

    presence = await store.presence("alice")
    assert device_ids(presence) == ["old"]
    assert conn_ids(presence) == ["c3"]


async def test_max_devices_breaks_ties_by_device_id_in_byte_order(store: Store, manual_clock: ManualClock) -> None:
    for device_id in ["b", "a", "Z", "ü"]:  # byte order: "Z" < "a" < "b" < "ü"
        await register(store, manual_clock, device_id=device_id, conn_id=device_id)

    await register(store, manual_clock, device_id="new", conn_id="new", max_devices=3)

    assert device_ids(await store.presence("alice")) == ["b", "new", "ü"]


async def test_max_devices_counts_per_user(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, "alice", "phone", "c1", max_devices=1)
    await register(store, manual_clock, "bob", "phone", "c2", max_devices=1)

    assert device_ids(await store.presence("alice")) == ["phone"]
    assert device_ids(await store.presence("bob")) == ["phone"]


async def test_devices_not_reregistered_within_device_ttl_are_forgotten(
    make_store: MakeStore, manual_clock: ManualClock
) -> None:
    store = await make_store(device_ttl=100)
    await register(store, manual_clock, device_id="old", conn_id="c1", ttl=1000)
    manual_clock.advance(50)
    await register(store, manual_clock, device_id="new", conn_id="c2", ttl=1000)
    manual_clock.advance(50)  # "old" is now device_ttl old

    presence = await store.presence("alice")
    assert device_ids(presence) == ["new"]
    assert conn_ids(presence) == ["c2"]  # a forgotten device's binding is not presence

    await register(store, manual_clock, device_id="old", conn_id="c3")
    assert device_ids(await store.presence("alice")) == ["new", "old"]
    manual_clock.advance(100)
    assert await store.presence("alice") == Presence(devices=(), bindings=())


async def test_expired_devices_do_not_count_towards_max_devices(
    make_store: MakeStore, manual_clock: ManualClock
) -> None:
    store = await make_store(device_ttl=100)
    await register(store, manual_clock, device_id="stale", conn_id="c1")
    manual_clock.advance(90)
    await register(store, manual_clock, device_id="live", conn_id="c2")
    manual_clock.advance(10)

    await register(store, manual_clock, device_id="third", conn_id="c3", max_devices=2)

    assert device_ids(await store.presence("alice")) == ["live", "third"]


async def test_forget_device_drops_the_record_and_its_binding(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, device_id="phone", conn_id="c1")
    ipad, _ = await register(store, manual_clock, device_id="ipad", conn_id="c2")

    await store.forget_device("alice", "phone")

    presence = await store.presence("alice")
    assert device_ids(presence) == ["ipad"]
    assert presence.bindings == (ipad,)
    assert await store.unregister("alice", "phone", "c1") is False
    await store.forget_device("alice", "phone")  # again: not an error
    await store.forget_device("nobody", "phone")


@pytest.mark.parametrize(
    "push",
    [
        PUSH,
        PushBinding(Platform.IOS, "org.example.débug", PushEnvironment.SANDBOX, "ff" * 32, None),
        PushBinding(Platform.IOS, "org.example.siplite", PushEnvironment.PRODUCTION, None, "ee"),
        PushBinding(Platform.IOS, "org.example.siplite", PushEnvironment.SANDBOX, None, None),
        None,
    ],
    ids=["both-tokens", "voip-only", "alert-only", "no-tokens", "no-push"],
)
async def test_device_records_round_trip_exactly(
    store: Store, manual_clock: ManualClock, push: PushBinding | None
) -> None:
    device = Device("alice", "phone", push, registered_at=manual_clock.now() + 0.123456789)
    binding = Binding("alice", "phone", "c1", "node-1", expires_at=manual_clock.now() + 59.987654321)

    await store.register(binding, device, MANY)

    assert await store.presence("alice") == Presence(devices=(device,), bindings=(binding,))


# --- notices -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "notice",
    [
        Notice(NoticeKind.MISSED, "call-1", "bob", "Bob Example", False, 1_800_000_000.123456789, 1.9e9),
        Notice(NoticeKind.MISSED, "call:{2}", "{bob}", None, True, 1_800_000_000.0, 1_800_000_059.987654321),
        Notice(NoticeKind.ENDED, "call-3", "bób", 'Bób "/\u2028 用户', True, 1.7e9, 1.9e9, "answeredElsewhere"),
        Notice(NoticeKind.ENDED, "", "", "", False, 0.5, 1_800_000_000.000001, "remoteEnded"),
    ],
    ids=["missed", "missed-no-name", "ended-odd-text", "ended-empty"],
)
async def test_notices_round_trip_exactly(store: Store, manual_clock: ManualClock, notice: Notice) -> None:
    await store.add_notices("alice", [("phone", notice)])

    assert await take_notices(store, manual_clock) == (notice,)


async def test_notices_are_taken_once(store: Store, manual_clock: ManualClock) -> None:
    notice = make_notice(manual_clock)
    await store.add_notices("alice", [("phone", notice)])

    assert await take_notices(store, manual_clock) == (notice,)
    assert await take_notices(store, manual_clock) == ()


async def test_take_notices_hands_each_notice_out_once_between_it_and_register(
    store: Store, manual_clock: ManualClock
) -> None:
    first, second = make_notice(manual_clock, "first"), make_notice(manual_clock, "second", ttl=1)
    await store.add_notices("alice", [("phone", first), ("phone", second), ("ipad", first)])
    manual_clock.advance(2)  # `second` has expired

    assert await store.take_notices("alice", "phone") == (first,)
    assert await store.take_notices("alice", "phone") == ()
    assert await take_notices(store, manual_clock) == ()  # register finds nothing left
    assert await take_notices(store, manual_clock, device_id="ipad") == (first,)
    assert await store.take_notices("alice", "ipad") == ()
    assert await store.take_notices("nobody", "phone") == ()


async def test_notices_come_oldest_first_by_time_then_insertion(store: Store, manual_clock: ManualClock) -> None:
    t = manual_clock.now()
    first_batch = [make_notice(manual_clock, "c", at=t - 5), make_notice(manual_clock, "a", at=t - 10)]
    second_batch = [make_notice(manual_clock, "d", at=t - 5), make_notice(manual_clock, "b", at=t - 7)]
    await store.add_notices("alice", [("phone", n) for n in first_batch])
    await store.add_notices("alice", [("phone", n) for n in second_batch])

    assert [n.call_id for n in await take_notices(store, manual_clock)] == ["a", "b", "c", "d"]


async def test_expired_notices_are_never_returned(store: Store, manual_clock: ManualClock) -> None:
    short = make_notice(manual_clock, "short", ttl=10)
    long = make_notice(manual_clock, "long", ttl=100)
    await store.add_notices("alice", [("phone", short), ("phone", long), ("ipad", short)])
    await store.add_notices("alice", [("phone", make_notice(manual_clock, "dead-on-arrival", ttl=0))])
    manual_clock.advance(10)  # now == short.expires_at: expired

    assert await take_notices(store, manual_clock, device_id="phone") == (long,)
    assert await take_notices(store, manual_clock, device_id="ipad") == ()


async def test_notices_are_per_device_and_per_user(store: Store, manual_clock: ManualClock) -> None:
    for_phone = make_notice(manual_clock, "k1")
    for_ipad = [make_notice(manual_clock, "k2", kind=NoticeKind.ENDED, reason="unanswered"), for_phone]
    await register(store, manual_clock, "alice", "ipad", "c1")
    await store.add_notices("alice", [("phone", for_phone), ("ipad", for_ipad[0]), ("ipad", for_ipad[1])])
    await store.add_notices("bob", [("tablet", for_phone)])

    assert await take_notices(store, manual_clock, "alice", "tablet") == ()
    assert await take_notices(store, manual_clock, "bob", "phone") == ()
    assert await take_notices(store, manual_clock, "alice", "ipad") == tuple(for_ipad)
    assert await take_notices(store, manual_clock, "alice", "phone") == (for_phone,)
    assert await take_notices(store, manual_clock, "bob", "tablet") == (for_phone,)


async def test_notices_are_capped_keeping_the_newest(store: Store, manual_clock: ManualClock) -> None:
    t = manual_clock.now()
    # Added newest first, so insertion order and age disagree: the cap goes by age.
    notices = [make_notice(manual_clock, f"k{i}", at=t - i) for i in range(MAX_NOTICES + 7)]
    await store.add_notices("alice", [("phone", n) for n in notices[:3]])
    await store.add_notices("alice", [("phone", n) for n in notices[3:]])
    await store.add_notices("alice", [("ipad", n) for n in notices[:MAX_NOTICES]])

    assert await take_notices(store, manual_clock) == tuple(reversed(notices[:MAX_NOTICES]))
    assert await take_notices(store, manual_clock, device_id="ipad") == tuple(reversed(notices[:MAX_NOTICES]))


async def test_expired_notices_do_not_count_towards_the_cap(store: Store, manual_clock: ManualClock) -> None:
    t = manual_clock.now()
    old = [make_notice(manual_clock, f"old{i}", at=t, ttl=10) for i in range(MAX_NOTICES)]
    await store.add_notices("alice", [("phone", n) for n in old])
    manual_clock.advance(10)
    fresh = make_notice(manual_clock, "fresh", at=t - 1)  # older `at` than every expired one

    await store.add_notices("alice", [("phone", fresh)])

    assert await take_notices(store, manual_clock) == (fresh,)


async def test_notices_wait_for_the_next_register(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, conn_id="c1")
    first = make_notice(manual_clock, "k1")
    await store.add_notices("alice", [("phone", first)])
    await store.refresh([make_binding(manual_clock, conn_id="c1")])
    assert await store.unregister("alice", "phone", "c1") is True

    _, registered = await register(store, manual_clock, conn_id="c2")
    assert registered.notices == (first,)

    second = make_notice(manual_clock, "k2")
    await store.add_notices("alice", [("phone", second)])
    _, registered = await register(store, manual_clock, conn_id="c3")  # replacing c2 takes them too
    assert registered == Registered(replaced=make_binding(manual_clock, conn_id="c2"), notices=(second,))
    _, registered = await register(store, manual_clock, conn_id="c3")
    assert registered.notices == ()


async def test_forget_device_drops_its_notices(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, device_id="phone", conn_id="c1")
    notice = make_notice(manual_clock)
    await store.add_notices("alice", [("phone", notice), ("ipad", notice)])

    await store.forget_device("alice", "phone")
    await store.forget_device("alice", "tablet")

    assert await take_notices(store, manual_clock, device_id="phone") == ()
    assert await take_notices(store, manual_clock, device_id="ipad") == (notice,)


async def test_eviction_drops_the_evicted_devices_notices(store: Store, manual_clock: ManualClock) -> None:
    await register(store, manual_clock, device_id="old", conn_id="c1")
    manual_clock.advance(1)
    await register(store, manual_clock, device_id="kept", conn_id="c2")
    notice = make_notice(manual_clock)
    await store.add_notices("alice", [("old", notice), ("kept", notice)])
    manual_clock.advance(1)

    await register(store, manual_clock, device_id="new", conn_id="c3", max_devices=2)

    assert device_ids(await store.presence("alice")) == ["kept", "new"]
    assert await take_notices(store, manual_clock, device_id="old") == ()
    assert await take_notices(store, manual_clock, device_id="kept") == (notice,)


async def test_notices_outlive_an_expired_device_record_until_their_own_expiry(
    make_store: MakeStore, manual_clock: ManualClock
) -> None:
    """A device record lapsing (device_ttl) is not forgetting it: its notices keep their own deadline."""
    store = await make_store(device_ttl=100)
    await register(store, manual_clock, device_id="phone", conn_id="c1")
    notice = make_notice(manual_clock, ttl=1000)
    await store.add_notices("alice", [("phone", notice)])
    manual_clock.advance(SWEEP_INTERVAL + 100)
    await register(store, manual_clock, device_id="ipad", conn_id="c2")  # drops the lapsed phone record

    assert device_ids(await store.presence("alice")) == ["ipad"]
    assert await take_notices(store, manual_clock, device_id="phone") == (notice,)


async def test_adding_no_notices_is_a_no_op(store: Store) -> None:
    await store.add_notices("alice", [])


# --- push claims -------------------------------------------------------------------------------------------------


async def test_claim_push_once_per_call_and_device_within_ttl(store: Store, manual_clock: ManualClock) -> None:
    assert await store.claim_push("call-1", "phone", ttl=30) is True
    assert await store.claim_push("call-1", "phone", ttl=30) is False
    assert await store.claim_push("call-1", "ipad", ttl=30) is True
    assert await store.claim_push("call-2", "phone", ttl=30) is True
    manual_clock.advance(29.5)
    assert await store.claim_push("call-1", "phone", ttl=30) is False

    manual_clock.advance(0.5)  # now == the claim's expiry: expired

    assert await store.claim_push("call-1", "phone", ttl=0.25) is True
    assert await store.claim_push("call-1", "phone", ttl=30) is False
    manual_clock.advance(0.25)
    assert await store.claim_push("call-1", "phone", ttl=30) is True


async def test_claim_push_keys_do_not_collide(store: Store) -> None:
    pairs = [("a", "b:c"), ("a:b", "c"), ("{a}", "b"), ("a", "{b}"), ("", ""), ("%", "")]
    for call_id, device_id in pairs:
        assert await store.claim_push(call_id, device_id, ttl=30) is True
    for call_id, device_id in pairs:
        assert await store.claim_push(call_id, device_id, ttl=30) is False


# --- rejected tokens ---------------------------------------------------------------------------------------------


async def register_device(store: Store, device: Device) -> None:
    binding = Binding(device.user_id, device.device_id, "c1", "node-1", expires_at=device.registered_at + 60)
    await store.register(binding, device, MANY)


@pytest.mark.parametrize(
    ("token", "left"),
    [
        (PUSH.voip_token, dataclasses.replace(PUSH, voip_token=None)),
        (PUSH.alert_token, dataclasses.replace(PUSH, alert_token=None)),
    ],
    ids=["voip", "alert"],
)
async def test_reject_token_removes_that_token_only(
    store: Store, manual_clock: ManualClock, token: str, left: PushBinding
) -> None:
    device = make_device(manual_clock, registered_at=manual_clock.now() + 0.123456789)
    await register_device(store, device)
    binding = (await store.presence("alice")).bindings

    assert await store.reject_token("alice", "phone", token, invalid_since=None) is True

    assert await store.presence("alice") == Presence(
        devices=(dataclasses.replace(device, push=left),), bindings=binding
    )
    assert await store.reject_token("alice", "phone", token, invalid_since=None) is False


async def test_reject_both_tokens_leaves_no_push_binding(store: Store, manual_clock: ManualClock) -> None:
    push = PushBinding(Platform.IOS, "org.example/débug", PushEnvironment.SANDBOX, 'aa/"x', "用户")
    device = make_device(manual_clock, push=push, registered_at=manual_clock.now() - 0.987654321)
    await register_device(store, device)

    assert await store.reject_token("alice", "phone", 'aa/"x', invalid_since=None) is True
    voip_gone = dataclasses.replace(device, push=dataclasses.replace(push, voip_token=None))
    assert (await store.presence("alice")).devices == (voip_gone,)
    assert await store.reject_token("alice", "phone", "用户", invalid_since=None) is True

    assert (await store.presence("alice")).devices == (dataclasses.replace(device, push=None),)
    assert await store.reject_token("alice", "phone", "用户", invalid_since=None) is False


async def test_reject_a_token_used_for_both_clears_both(store: Store, manual_clock: ManualClock) -> None:
    push = dataclasses.replace(PUSH, alert_token=PUSH.voip_token)
    device = make_device(manual_clock, push=push)
    await register_device(store, device)

    assert await store.reject_token("alice", "phone", "ab" * 32, invalid_since=None) is True

    assert (await store.presence("alice")).devices == (dataclasses.replace(device, push=None),)


async def test_reject_an_unknown_token_changes_nothing(store: Store, manual_clock: ManualClock) -> None:
    await register_device(store, make_device(manual_clock))
    await register_device(store, make_device(manual_clock, device_id="bare", push=None))
    before = await store.presence("alice")

    assert await store.reject_token("alice", "phone", "ef" * 32, invalid_since=None) is False
    assert await store.reject_token("alice", "phone", "", invalid_since=None) is False
    assert await store.reject_token("alice", "bare", "ab" * 32, invalid_since=None) is False
    assert await store.reject_token("alice", "ipad", "ab" * 32, invalid_since=None) is False
    assert await store.reject_token("bob", "phone", "ab" * 32, invalid_since=None) is False

    assert await store.presence("alice") == before


async def test_reject_token_keeps_a_token_registered_after_it_became_invalid(
    store: Store, manual_clock: ManualClock
) -> None:
    registered_at = manual_clock.now() - 100
    device = make_device(manual_clock, registered_at=registered_at)
    await register_device(store, device)

    assert await store.reject_token("alice", "phone", "ab" * 32, invalid_since=registered_at - 0.001) is False
    assert (await store.presence("alice")).devices == (device,)

    assert await store.reject_token("alice", "phone", "ab" * 32, invalid_since=registered_at) is True
    assert await store.reject_token("alice", "phone", "cd" * 32, invalid_since=registered_at + 50) is True
    assert (await store.presence("alice")).devices == (dataclasses.replace(device, push=None),)


async def test_reject_token_keeps_the_device_records_expiry(
    make_store: MakeStore, manual_clock: ManualClock
) -> None:
    store = await make_store(device_ttl=100)
    await register(store, manual_clock, conn_id="c1", ttl=1000)
    manual_clock.advance(60)

    assert await store.reject_token("alice", "phone", "ab" * 32, invalid_since=None) is True
    manual_clock.advance(40)  # device_ttl after the registration, not after the rejection

    assert await store.presence("alice") == Presence(devices=(), bindings=())
    assert await store.reject_token("alice", "phone", "cd" * 32, invalid_since=None) is False


# --- calls -------------------------------------------------------------------------------------------------------


async def test_open_call_creates_once_and_reads_callee_presence(store: Store, manual_clock: ManualClock) -> None:
    bob, _ = await register(store, manual_clock, "bob", "phone", "c-bob")
    record = make_call()

    opened = await store.open_call(record, ttl=60)

    assert opened == CallOpened(
        created=True,
        callee=Presence(devices=(make_device(manual_clock, "bob", "phone"),), bindings=(bob,)),
    )
    again = await store.open_call(make_call(caller_user="mallory"), ttl=60)
    assert again.created is False
    assert again.callee == opened.callee
    assert await store.get_call("call-1") == record


async def test_open_call_to_an_unknown_user_reports_empty_presence(store: Store) -> None:
    opened = await store.open_call(make_call(callee="nobody"), ttl=60)

    assert opened == CallOpened(created=True, callee=Presence(devices=(), bindings=()))


async def test_update_get_and_close_call(store: Store, manual_clock: ManualClock) -> None:
    await store.open_call(make_call(), ttl=10)
    manual_clock.advance(5)
    answered = make_call(phase=CallPhase.ANSWERED, answered_by="ipad", node_id="node-2")

    await store.update_call(answered, ttl=10)
    manual_clock.advance(8)  # past the first ttl: the update restarted it

    assert await store.get_call("call-1") == answered
    await store.close_call("call-1")
    assert await store.get_call("call-1") is None
    await store.close_call("call-1")  # again: not an error
    assert await store.get_call("never-opened") is None


async def test_call_records_expire_after_their_ttl(store: Store, manual_clock: ManualClock) -> None:
    await store.open_call(make_call(), ttl=30)
    manual_clock.advance(29.5)
    assert await store.get_call("call-1") == make_call()

    manual_clock.advance(0.5)

    assert await store.get_call("call-1") is None
    reopened = await store.open_call(make_call(caller_user="carol"), ttl=30)
    assert reopened.created is True
    assert await store.get_call("call-1") == make_call(caller_user="carol")


async def test_closed_call_id_can_be_opened_again(store: Store) -> None:
    await store.open_call(make_call(), ttl=30)
    await store.close_call("call-1")

    assert (await store.open_call(make_call(), ttl=30)).created is True


# --- identifiers -------------------------------------------------------------------------------------------------

ODD_IDS = [
    "a",
    "a:b",
    "a:b:c",
    "b:a",
    "{a}",
    "{a",
    "a}",
    "}{",
    "%",
    "%7Ba%7D",
    "",
    ":",
    "call:x",
    "ü",
    "用户",
    "a b\tc\n",
]


async def test_unusual_ids_neither_collide_nor_break_keys(store: Store, manual_clock: ManualClock) -> None:
    devices = ["phone", "a:b", "{a}", "b:phone", "", "devs", "b", "ü"]
    for user_id in ODD_IDS:
        for device_id in devices:
            await register(store, manual_clock, user_id, device_id, f"{user_id!r}/{device_id!r}")
    for call_id in ODD_IDS:
        await store.open_call(make_call(call_id, callee=call_id), ttl=60)

    for user_id in ODD_IDS:
        presence = await store.presence(user_id)
        assert device_ids(presence) == sorted(devices)
        assert {b.user_id for b in presence.bindings} == {user_id}
        assert sorted(conn_ids(presence)) == sorted(f"{user_id!r}/{d!r}" for d in devices)
    for call_id in ODD_IDS:
        assert await store.get_call(call_id) == make_call(call_id, callee=call_id)

    await store.forget_device("a", "b")
    await store.close_call("a")
    assert "b" not in device_ids(await store.presence("a"))
    assert device_ids(await store.presence("a:b")) == sorted(devices)
    assert await store.get_call("a:b") is not None


# --- memory only -------------------------------------------------------------------------------------------------


async def test_memory_store_sweeps_out_what_expired(manual_clock: ManualClock) -> None:
    """Reads ignore expired entries anyway; the sweep is about memory, so this looks inside."""
    store = MemoryStore(manual_clock, device_ttl=100)
    await register(store, manual_clock, "alice", "phone", "c1", ttl=10)
    await register(store, manual_clock, "bob", "phone", "c2", ttl=1000)
    await store.open_call(make_call("k1"), ttl=10)
    await store.open_call(make_call("k2"), ttl=1000)
    short, long = make_notice(manual_clock, "k1", ttl=10), make_notice(manual_clock, "k2", ttl=1000)
    await store.add_notices("alice", [("phone", short), ("ipad", short), ("ipad", long)])
    await store.claim_push("k1", "phone", ttl=10)
    await store.claim_push("k2", "phone", ttl=1000)
    manual_clock.advance(SWEEP_INTERVAL)

    await store.refresh([])  # any write runs a sweep that is due

    assert list(store._bindings) == [("bob", "phone")]
    assert list(store._calls) == ["k2"]
    assert store._notices == {("alice", "ipad"): [long]}
    assert list(store._claims) == [("k2", "phone")]
    manual_clock.advance(100)
    await store.close_call("none")  # not a sweeping write
    await store.forget_device("nobody", "phone")
    assert store._devices == {}
    assert store._bindings == {}


# --- both backends agree on random histories -------------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    user: str
    device: str
    conn: str
    ttl: float
    max_devices: int
    age: float

    async def run(self, store: Store, clock: ManualClock) -> object:
        return await register(
            store,
            clock,
            self.user,
            self.device,
            self.conn,
            ttl=self.ttl,
            max_devices=self.max_devices,
            registered_at=clock.now() - self.age,
        )


@dataclass(frozen=True)
class Unregister:
    user: str
    device: str
    conn: str

    async def run(self, store: Store, clock: ManualClock) -> object:
        return await store.unregister(self.user, self.device, self.conn)


@dataclass(frozen=True)
class Refresh:
    bindings: tuple[tuple[str, str, str, float], ...]

    async def run(self, store: Store, clock: ManualClock) -> object:
        await store.refresh([make_binding(clock, u, d, c, ttl=t) for u, d, c, t in self.bindings])
        return None


@dataclass(frozen=True)
class Forget:
    user: str
    device: str

    async def run(self, store: Store, clock: ManualClock) -> object:
        await store.forget_device(self.user, self.device)
        return None


@dataclass(frozen=True)
class OpenCall:
    call_id: str
    callee: str
    ttl: float

    async def run(self, store: Store, clock: ManualClock) -> object:
        return await store.open_call(make_call(self.call_id, self.callee), self.ttl)


@dataclass(frozen=True)
class UpdateCall:
    call_id: str
    ttl: float

    async def run(self, store: Store, clock: ManualClock) -> object:
        record = make_call(self.call_id, phase=CallPhase.ANSWERED, answered_by="ipad")
        await store.update_call(record, self.ttl)
        return None


@dataclass(frozen=True)
class CloseCall:
    call_id: str

    async def run(self, store: Store, clock: ManualClock) -> object:
        await store.close_call(self.call_id)
        return None


@dataclass(frozen=True)
class AddNotices:
    user: str
    notices: tuple[tuple[str, str, float, float], ...]  # device, call id, age, ttl

    async def run(self, store: Store, clock: ManualClock) -> object:
        batch = [(d, make_notice(clock, c, at=clock.now() - age, ttl=t)) for d, c, age, t in self.notices]
        await store.add_notices(self.user, batch)
        return None


@dataclass(frozen=True)
class ClaimPush:
    call_id: str
    device: str
    ttl: float

    async def run(self, store: Store, clock: ManualClock) -> object:
        return await store.claim_push(self.call_id, self.device, self.ttl)


@dataclass(frozen=True)
class RejectToken:
    user: str
    device: str
    token: str
    invalid_age: float | None  # invalid_since, as seconds before now

    async def run(self, store: Store, clock: ManualClock) -> object:
        since = None if self.invalid_age is None else clock.now() - self.invalid_age
        return await store.reject_token(self.user, self.device, self.token, since)


@dataclass(frozen=True)
class Advance:
    seconds: float


Operation = (
    Register
    | Unregister
    | Refresh
    | Forget
    | OpenCall
    | UpdateCall
    | CloseCall
    | AddNotices
    | ClaimPush
    | RejectToken
    | Advance
)

_users = st.sampled_from(["alice", "bob"])
_devices = st.sampled_from(["a", "B", "ü"])
_conns = st.sampled_from(["c1", "c2"])
_calls = st.sampled_from(["k1", "k2"])
_ttls = st.sampled_from([0.5, 5.0, 30.0])
_operations: st.SearchStrategy[Operation] = st.one_of(
    st.builds(Register, _users, _devices, _conns, _ttls, st.integers(1, 3), st.sampled_from([0.0, 20.0])),
    st.builds(Unregister, _users, _devices, _conns),
    st.builds(Refresh, st.lists(st.tuples(_users, _devices, _conns, _ttls), max_size=3).map(tuple)),
    st.builds(Forget, _users, _devices),
    st.builds(OpenCall, _calls, _users, _ttls),
    st.builds(UpdateCall, _calls, _ttls),
    st.builds(CloseCall, _calls),
    st.builds(
        AddNotices,
        _users,
        st.lists(st.tuples(_devices, _calls, st.sampled_from([0.0, 1.0]), _ttls), max_size=MAX_NOTICES + 2).map(
            tuple
        ),
    ),
    st.builds(ClaimPush, _calls, _devices, _ttls),
    st.builds(
        RejectToken,
        _users,
        _devices,
        st.sampled_from([PUSH.voip_token or "", PUSH.alert_token or "", "other"]),
        st.sampled_from([None, 0.0, 10.0, 30.0]),
    ),
    st.builds(Advance, st.sampled_from([0.0, 0.5, 5.0, 30.0, 60.0])),
)


@settings(max_examples=60, deadline=None, database=None)
@given(history=st.lists(_operations, max_size=25))
def test_backends_agree_on_random_histories(redis_server: RedisServer, history: list[Operation]) -> None:
    """After every step of a random history both backends return the same, and report the same state."""

    async def replay() -> None:
        clock = ManualClock()
        async with redis.asyncio.Redis.from_url(redis_server.url) as client:
            await client.flushall()
        memory = MemoryStore(clock, device_ttl=100)
        shared = RedisStore(redis_server.url, clock, device_ttl=100)
        await shared.start()
        try:
            for step, operation in enumerate(history):
                if isinstance(operation, Advance):
                    clock.advance(operation.seconds)
                    continue
                expected = await operation.run(memory, clock)
                assert await operation.run(shared, clock) == expected, f"step {step}: {operation}"
                for user in ["alice", "bob"]:
                    assert await shared.presence(user) == await memory.presence(user), f"step {step}"
                for call_id in ["k1", "k2"]:
                    assert await shared.get_call(call_id) == await memory.get_call(call_id), f"step {step}"
        finally:
            await shared.close()

    asyncio.run(replay())


# --- Redis only --------------------------------------------------------------------------------------------------


async def test_redis_key_layout(
    redis_store: RedisStore, redis_client: redis_url.Client, manual_clock: ManualClock
) -> None:
    await register(redis_store, manual_clock, "alice", "phone", "c1")
    await register(redis_store, manual_clock, "{bob}", "a:b", "c2")
    await redis_store.open_call(make_call("call-1"), ttl=60)
    notice = make_notice(manual_clock)
    await redis_store.add_notices("alice", [("phone", notice), ("ipad", notice)])
    await redis_store.add_notices("{bob}", [("a:b", notice)])
    await redis_store.claim_push("call-1", "phone", ttl=30)
    await redis_store.claim_push("{x}", "a:b", ttl=30)

    keys = {key async for key in redis_client.scan_iter()}

    assert keys == {
        "siplite:{alice}:devs",
        "siplite:{alice}:b:phone",
        "siplite:{alice}:n:phone",
        "siplite:{alice}:n:ipad",
        "siplite:{%7Bbob%7D}:devs",
        "siplite:{%7Bbob%7D}:b:a:b",
        "siplite:{%7Bbob%7D}:n:a:b",
        "siplite:call:{call-1}",
        "siplite:push:{call-1}:phone",
        "siplite:push:{%7Bx%7D}:a:b",
    }


@pytest.mark.parametrize("prefix", ["siplite:", "test:other:"])
async def test_every_redis_key_has_the_prefix_and_a_ttl(
    empty_redis: EmptyRedis, redis_client: redis_url.Client, manual_clock: ManualClock, prefix: str
) -> None:
    store = RedisStore(empty_redis.url, manual_clock, prefix=prefix, device_ttl=3600)
    await store.start()
    try:
        for user_id in ["alice", "bob", "{x}"]:
            for device_id in ["phone", "ipad"]:
                await register(store, manual_clock, user_id, device_id, "c1", ttl=30)
                await register(store, manual_clock, user_id, device_id, "c2", ttl=30)
        await register(store, manual_clock, "alice", "old", "c3", ttl=-10)  # already expired
        await store.refresh([make_binding(manual_clock, "bob", "phone", "c2", ttl=90)])
        await store.open_call(make_call("call-1"), ttl=45)
        await store.update_call(make_call("call-2"), ttl=0.5)
        devs_ttl = await redis_client.ttl(f"{prefix}{{alice}}:devs")
        await store.reject_token("alice", "phone", PUSH.voip_token or "", invalid_since=None)
        await store.reject_token("alice", "ipad", PUSH.voip_token or "", invalid_since=None)
        await store.reject_token("alice", "ipad", PUSH.alert_token or "", invalid_since=None)
        notices = [make_notice(manual_clock, ttl=0.5), make_notice(manual_clock, ttl=600.25)]
        await store.add_notices("alice", [("phone", notices[0]), ("ipad", notices[1]), ("nowhere", notices[0])])
        await store.add_notices("bob", [("phone", notices[1])])
        await store.add_notices("bob", [("phone", notices[0])])  # the later expiry still sets the TTL
        await store.claim_push("call-1", "phone", ttl=30)
        await store.claim_push("call-1", "phone", ttl=30)  # refused: leaves the first claim's TTL
        await store.claim_push("call-1", "ipad", ttl=0.5)
    finally:
        await store.close()

    keys = [key async for key in redis_client.scan_iter()]
    # A hash and a binding per device (alice has three), two call records, four notice lists, two claims.
    assert len(keys) == (1 + 3) + (1 + 2) + (1 + 2) + 2 + 4 + 2
    for key in keys:
        assert key.startswith(prefix)
        ttl = await redis_client.ttl(key)
        assert GC_SLACK <= ttl <= 3600 + GC_SLACK + 1, key
    # Rejecting tokens leaves a device hash's TTL alone (the test takes well under a second).
    assert devs_ttl - 1 <= await redis_client.ttl(f"{prefix}{{alice}}:devs") <= devs_ttl
    # Each notice list lives as long as its latest notice, rounded up, plus the slack.
    for key, lifetime in [(":n:phone", 1), (":n:nowhere", 1), (":n:ipad", 601)]:
        assert lifetime + GC_SLACK - 1 <= await redis_client.ttl(f"{prefix}{{alice}}{key}") <= lifetime + GC_SLACK
    assert 601 + GC_SLACK - 1 <= await redis_client.ttl(f"{prefix}{{bob}}:n:phone") <= 601 + GC_SLACK
    assert 30 + GC_SLACK - 1 <= await redis_client.ttl(f"{prefix}push:{{call-1}}:phone") <= 30 + GC_SLACK


@pytest.fixture
async def masters(empty_redis: EmptyRedis) -> AsyncIterator[list[redis.asyncio.Redis]]:
    """A plain client on each master, for what only a server can tell about itself (its statistics)."""
    clients = [redis.asyncio.Redis.from_url(url) for url in empty_redis.masters]
    yield clients
    for client in clients:
        await client.aclose()


async def test_each_operation_sends_one_batch_of_commands(
    redis_store: RedisStore, masters: list[redis.asyncio.Redis], manual_clock: ManualClock
) -> None:
    """What each operation sends: one command, or EVALSHAs in one pipeline, and never a hidden SCRIPT EXISTS.
    On a cluster the same commands go out, split by node (the counts are summed over the masters), and
    nothing else: no slot-map refresh, no MOVED retries."""
    clock = manual_clock

    async def counted(operation: Callable[[], Awaitable[object]], *, scripts: bool) -> dict[str, int]:
        # Commands a script runs inside Redis show up in the statistics too: with `scripts`, only the ones a
        # client sends are counted.
        for master in masters:
            await master.config_resetstat()
        await operation()
        calls: dict[str, int] = {}
        for master in masters:
            for name, value in (await master.info("commandstats")).items():
                name = name.removeprefix("cmdstat_")
                if not name.startswith(("config", "info")):
                    calls[name] = calls.get(name, 0) + int(value["calls"])
        sent_by_client = ("evalsha", "eval", "script", "multi", "exec", "ping", "cluster")
        return {name: n for name, n in calls.items() if not scripts or name.startswith(sent_by_client)}

    async def sent(operation: Callable[[], Awaitable[object]]) -> dict[str, int]:
        return await counted(operation, scripts=True)

    async def plain(operation: Callable[[], Awaitable[object]]) -> dict[str, int]:
        return await counted(operation, scripts=False)

    binding = make_binding(clock)
    device = make_device(clock)
    # On one server the scripts of an operation run as one EVALSHA; on a cluster, one each (one per slot).
    one = redis_store.combines_scripts

    def scripts(n: int) -> dict[str, int]:
        return {"evalsha": 1 if one else n}

    assert await sent(lambda: redis_store.register(binding, device, MANY)) == {"evalsha": 1}
    assert await sent(lambda: redis_store.presence("alice")) == {"evalsha": 1}
    assert await sent(lambda: redis_store.refresh([binding, binding])) == scripts(2)
    assert await sent(lambda: redis_store.open_call(make_call(), 60)) == scripts(2)
    assert await sent(lambda: redis_store.unregister("alice", "phone", "conn-1")) == {"evalsha": 1}
    assert await sent(lambda: redis_store.forget_device("alice", "phone")) == {"evalsha": 1}
    notices = [
        ("phone", make_notice(clock, "k1")),
        ("ipad", make_notice(clock, "k2")),
        ("phone", make_notice(clock)),
    ]
    assert await sent(lambda: redis_store.add_notices("alice", notices)) == {"evalsha": 1}
    assert await sent(lambda: redis_store.add_notices("alice", [])) == {}
    assert await sent(lambda: redis_store.register(binding, device, MANY)) == {"evalsha": 1}  # takes them
    assert await sent(lambda: redis_store.claim_push("call-1", "phone", 30)) == {"evalsha": 1}
    assert await sent(lambda: redis_store.reject_token("alice", "phone", "ab" * 32, None)) == {"evalsha": 1}

    assert await plain(lambda: redis_store.update_call(make_call(), 60)) == {"set": 1}
    assert await plain(lambda: redis_store.get_call("call-1")) == {"get": 1}
    assert await plain(lambda: redis_store.close_call("call-1")) == {"del": 1}
    parties = [("alice", "phone"), ("bob", "ipad")]
    assert await sent(lambda: redis_store.update_call(make_call(), 60, parties=parties)) == scripts(3)
    closing = {"del": 1, "hdel": 2, **scripts(3)}  # the DEL and the HDELs run inside the scripts
    assert await plain(lambda: redis_store.close_call("call-1", parties=parties)) == closing


async def test_on_a_redis_cluster_each_users_keys_share_a_slot_and_users_spread_over_the_masters(
    redis_cluster: RedisClusterServers, redis_cluster_url: str, manual_clock: ManualClock
) -> None:
    users = [f"user-{i}" for i in range(9)]
    store = RedisStore(redis_cluster_url, manual_clock)
    await store.start()
    try:
        for user in users:
            for device_id in ("phone", "ipad"):
                await register(store, manual_clock, user, device_id, "c1")
            notice = make_notice(manual_clock)
            await store.add_notices(user, [("phone", notice), ("ipad", notice)])
            ref = CallRef(f"call-{user}", "node-a", caller_id="carol")
            await store.claim_push(f"call-{user}", "phone", ttl=30, waking=(user, ref))
            await store.open_call(make_call(f"call-{user}", user), ttl=60)
    finally:
        await store.close()

    slots: dict[str, set[int]] = {}
    holders: dict[str, set[int]] = {}
    for server in redis_cluster.servers:
        async with redis.asyncio.Redis.from_url(server.url, decode_responses=True) as node:
            async for key in node.scan_iter():
                tag = key[key.index("{") + 1 : key.index("}")]
                slots.setdefault(tag, set()).add(await node.cluster("KEYSLOT", key))
                holders.setdefault(tag, set()).add(server.port)
    # A user's devices, bindings, notices and waking calls; a call's record and its push claims.
    assert set(slots) == {*users, *(f"call-{user}" for user in users)}
    assert all(len(tag_slots) == 1 for tag_slots in slots.values())
    assert len(set().union(*holders.values())) == len(redis_cluster.servers)


@pytest.fixture
def unused_port() -> Iterator[int]:
    yield free_port("127.0.0.1")


async def test_unreachable_redis_raises_store_unavailable(unused_port: int, manual_clock: ManualClock) -> None:
    url = f"redis://:hunter2@127.0.0.1:{unused_port}/0"
    store = RedisStore(url, manual_clock)

    with pytest.raises(StoreUnavailable, match=f"cannot reach Redis at 127.0.0.1:{unused_port}") as e:
        await store.start()
    assert "hunter2" not in str(e.value)
    with pytest.raises(StoreUnavailable) as e:
        await store.presence("alice")
    assert "hunter2" not in str(e.value)
    assert await store.ping() is False
    await store.close()


async def test_a_url_of_the_wrong_kind_is_refused_at_start(
    redis_url: str, redis_cluster: RedisClusterServers, manual_clock: ManualClock
) -> None:
    # A plain URL would reach one node of the cluster, and the keys of the other nodes' slots would fail one
    # by one at run time; a cluster URL on a plain server cannot find a cluster.
    plain_on_a_cluster = RedisStore(redis_cluster.servers[0].url, manual_clock)
    cluster_on_a_server = RedisStore(redis_url.replace("redis://", "redis+cluster://"), manual_clock)
    try:
        with pytest.raises(StoreUnavailable, match=r"is a Redis Cluster node: use a redis\+cluster:// URL"):
            await plain_on_a_cluster.start()
        with pytest.raises(StoreUnavailable, match=r"cannot reach Redis at cluster .*Cluster mode is not enabled"):
            await cluster_on_a_server.start()
    finally:
        await plain_on_a_cluster.close()
        await cluster_on_a_server.close()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to stop and restart."""
    with RedisServer() as server:
        yield server


async def test_wrong_password_raises_store_unavailable_without_the_password(
    manual_clock: ManualClock,
) -> None:
    with RedisServer(extra_args=["--requirepass", "right-secret"]) as server:
        store = RedisStore(f"redis://:wrong-secret@{server.host}:{server.port}/0", manual_clock)
        try:
            with pytest.raises(StoreUnavailable, match="cannot reach Redis") as e:
                await store.start()
            assert "secret" not in str(e.value)
            assert await store.ping() is False
        finally:
            await store.close()


async def test_stopped_redis_raises_and_a_restarted_one_works_again(
    own_redis_server: RedisServer, manual_clock: ManualClock
) -> None:
    store = RedisStore(own_redis_server.url, manual_clock)
    try:
        await store.start()
        await register(store, manual_clock)

        own_redis_server.stop()
        with pytest.raises(StoreUnavailable, match="Redis presence failed"):
            await store.presence("alice")
        with pytest.raises(StoreUnavailable, match="Redis register failed"):
            await register(store, manual_clock)
        assert await store.ping() is False

        own_redis_server.start()  # same port, no data, and no scripts cached: EVALSHA meets NOSCRIPT
        assert await store.ping() is True
        binding, _ = await register(store, manual_clock)
        assert (await store.presence("alice")).bindings == (binding,)
    finally:
        await store.close()


# --- waking calls ------------------------------------------------------------------------------------------------


async def test_a_claimed_push_is_seen_as_waking_by_the_devices_next_registrations(
    store: Store, manual_clock: ManualClock
) -> None:
    from_bob = CallRef("call-2", "node-b", caller_id="bob", caller_name="Bob {B}", video=True)
    from_carol = CallRef("call-1", "node-a", caller_id="carol")
    assert await store.claim_push("call-2", "phone", ttl=30, waking=("alice", from_bob)) is True
    manual_clock.advance(1)
    assert await store.claim_push("call-1", "phone", ttl=60, waking=("alice", from_carol)) is True
    assert await store.claim_push("call-3", "phone", ttl=30) is True  # no waking record asked for
    assert await store.claim_push("call-4", "ipad", ttl=30, waking=("alice", from_carol)) is True

    _, registered = await register(store, manual_clock)
    assert registered.waking == (from_bob, from_carol)  # every field round-trips
    _, again = await register(store, manual_clock, conn_id="conn-2")
    assert again.waking == registered.waking  # not taken: a device may reconnect while the call rings
    _, other = await register(store, manual_clock, "bob")
    assert other.waking == ()

    manual_clock.advance(30)  # call-2's claim has expired
    _, later = await register(store, manual_clock, conn_id="conn-3")
    assert later.waking == (from_carol,)
    await store.forget_device("alice", "phone")
    _, forgotten = await register(store, manual_clock, conn_id="conn-4")
    assert forgotten.waking == ()


async def test_the_parties_of_an_answered_call_see_it_until_it_closes(
    store: Store, manual_clock: ManualClock
) -> None:
    record = make_call("call-1")
    await store.update_call(record, 3600, parties=[("alice", "phone"), ("bob", "ipad")])
    _, alice = await register(store, manual_clock)
    _, bob = await register(store, manual_clock, "bob", "ipad")
    assert alice.waking == bob.waking == (CallRef("call-1", record.node_id, party=True),)

    await store.close_call("call-1", parties=[("alice", "phone"), ("bob", "ipad")])
    _, again = await register(store, manual_clock, conn_id="conn-2")
    assert again.waking == ()
    assert await store.get_call("call-1") is None


async def test_heartbeats_tell_which_nodes_are_alive(store: Store, manual_clock: ManualClock) -> None:
    assert await store.heartbeat("node-a", 10, ["node-b", "node-c"]) == {"node-b", "node-c"}
    assert await store.heartbeat("node-b", 10, ["node-a"]) == frozenset()
    manual_clock.advance(9)
    assert await store.heartbeat("node-a", 10, ["node-b", "node-a"]) == frozenset()
    manual_clock.advance(1)  # node-b is silent for its whole ttl
    assert await store.heartbeat("node-c", 10, ["node-a", "node-b"]) == {"node-b"}


async def test_after_redis_lost_its_data_every_node_gets_a_ttl_to_beat_again(
    redis_store: RedisStore, empty_redis: EmptyRedis, manual_clock: ManualClock
) -> None:
    # node-b beats and is watched by node-a; then Redis restarts empty (FLUSHALL on every master).
    assert await redis_store.heartbeat("node-b", 10, ()) == frozenset()
    assert await redis_store.heartbeat("node-a", 10, ["node-b"]) == frozenset()
    for url in empty_redis.masters:
        with redis.Redis.from_url(url) as master:
            master.flushall()
    manual_clock.advance(3)
    # node-b's record is gone with everything else: it is not taken for dead (its calls would end) ...
    assert await redis_store.heartbeat("node-a", 10, ["node-b", "node-c"]) == frozenset()
    manual_clock.advance(9)
    # ... until it has had a whole ttl since the loss to beat again and did not.
    assert await redis_store.heartbeat("node-a", 10, ["node-b"]) == frozenset()
    manual_clock.advance(1)
    assert await redis_store.heartbeat("node-a", 10, ["node-b", "node-c"]) == {"node-b", "node-c"}


async def test_a_node_that_beats_again_after_redis_lost_its_data_stays_alive(
    redis_store: RedisStore, empty_redis: EmptyRedis, manual_clock: ManualClock
) -> None:
    await redis_store.heartbeat("node-b", 10, ())
    await redis_store.heartbeat("node-a", 10, ["node-b"])
    for url in empty_redis.masters:
        with redis.Redis.from_url(url) as master:
            master.flushall()
    manual_clock.advance(3)
    assert await redis_store.heartbeat("node-a", 10, ["node-b"]) == frozenset()
    await redis_store.heartbeat("node-b", 10, ())
    manual_clock.advance(11)
    await redis_store.heartbeat("node-b", 10, ())
    assert await redis_store.heartbeat("node-a", 10, ["node-b"]) == frozenset()


async def test_when_a_nodes_own_beat_lapsed_it_gives_the_others_a_ttl_to_beat_again(
    store: Store, manual_clock: ManualClock
) -> None:
    await store.heartbeat("node-b", 10, ())
    await store.heartbeat("node-c", 10, ())
    await store.heartbeat("node-a", 10, ["node-b", "node-c"])
    manual_clock.advance(15)  # nobody could beat (Redis out of reach): node-a's own beat lapsed as well
    assert await store.heartbeat("node-a", 10, ["node-b", "node-c"]) == frozenset()
    manual_clock.advance(5)
    await store.heartbeat("node-b", 10, ())  # node-b is back; node-c never comes back
    assert await store.heartbeat("node-a", 10, ["node-b", "node-c"]) == frozenset()
    manual_clock.advance(5)
    assert await store.heartbeat("node-a", 10, ["node-b", "node-c"]) == {"node-c"}


async def test_a_redis_that_stops_answering_makes_operations_fail_at_the_timeout(
    manual_clock: ManualClock,
) -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, manual_clock, timeout=0.3)
        await store.start()
        try:
            binding, device = make_binding(manual_clock), make_device(manual_clock)
            await store.register(binding, device, 10)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)  # connected and silent, as a hung or overloaded Redis is
            try:
                with pytest.raises(StoreUnavailable, match=r"no reply from Redis within 0\.3 s"):
                    await asyncio.wait_for(store.presence("alice"), 5.0)
                assert not await asyncio.wait_for(store.ping(), 5.0)  # /readyz says not ready, promptly
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await store.ping()
            assert [b.device_id for b in (await store.presence("alice")).bindings] == [device.device_id]
        finally:
            await store.close()
