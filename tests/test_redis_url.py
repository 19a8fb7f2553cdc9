"""Redis URLs: the forms `signaling.redis_url` accepts, what they parse to, and what a bad one is told."""

from __future__ import annotations

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from signaling import config
from signaling.redis_url import Kind, parse


@pytest.mark.parametrize(
    ("url", "kind", "where"),
    [
        ("redis://localhost:6380/2", Kind.SINGLE, "localhost:6380"),
        ("rediss://:pw@cache.example:6390", Kind.SINGLE, "cache.example:6390"),
        ("unix:///run/redis.sock?db=1", Kind.SINGLE, "/run/redis.sock"),
        ("redis+cluster://a:7000,b:7001,c", Kind.CLUSTER, "cluster a:7000,b:7001,c:6379"),
        ("REDISS+CLUSTER://[::1]:7000/0", Kind.CLUSTER, "cluster [::1]:7000"),
        ("redis+sentinel://s1,s2:26380/main", Kind.SENTINEL, "master 'main' of Sentinel s1:26379,s2:26380"),
        ("rediss+sentinel://u:p@s1:26379/main/3", Kind.SENTINEL, "master 'main' of Sentinel s1:26379"),
    ],
)
def test_every_form_parses_and_names_where_it_points(url: str, kind: Kind, where: str) -> None:
    parsed = parse(url)
    assert (parsed.kind, parsed.where) == (kind, where)
    assert parsed.tls == url.lower().startswith("rediss")


def test_cluster_and_sentinel_urls_carry_credentials_and_options_for_every_connection() -> None:
    cluster = parse("redis+cluster://app:s%40cret@a:7000,b:7001?socket_timeout=0.5&client_name=sip")
    assert cluster.nodes == (("a", 7000), ("b", 7001))
    assert cluster.options == {
        "username": "app",
        "password": "s@cret",
        "socket_timeout": 0.5,
        "client_name": "sip",
    }
    sentinel = parse("redis+sentinel://:master-pw@s1:26379,s2/main/3?sentinel_password=sentinel-pw")
    assert (sentinel.nodes, sentinel.master) == ((("s1", 26379), ("s2", 26379)), "main")
    assert sentinel.options == {"password": "master-pw", "db": 3}
    assert sentinel.sentinel_options == {"password": "sentinel-pw"}
    assert "pw" not in repr(sentinel)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost", "must start with one of redis://"),
        ("localhost:6379", "must start with one of"),
        ("redis+cluster://a:7000/1", "database 0 only"),
        ("redis+cluster://a:7000?db=2", "database 0 only"),
        ("redis+cluster://a:7000,:7001", "needs a name"),
        ("redis+cluster://a:seven", "'seven' is not a port number"),
        ("redis+cluster://a:70000", "out of range"),
        ("redis+sentinel://s1:26379", "names the master"),
        ("redis+sentinel://s1:26379/main/0/extra", "names the master"),
        ("redis+sentinel://:hunter2@s1/main?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_malformed_url_is_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        parse(url)
    assert "hunter2" not in str(refused.value)


def test_a_bad_url_is_a_configuration_error_naming_the_setting() -> None:
    with pytest.raises(config.ConfigError, match="SIPLITE_REDIS_URL: a Sentinel URL names the master"):
        config.load({"SIPLITE_REDIS_URL": "redis+sentinel://s1:26379"})
    assert config.load({"SIPLITE_REDIS_URL": "redis+cluster://a:7000"}).redis_url == "redis+cluster://a:7000"


def test_explanations_leave_out_passwords_and_client_reprs() -> None:
    url = parse("redis+sentinel://:p%40ss@s1/main?sentinel_password=other")
    noisy = RedisConnectionError(
        "No master found for 'main' : <redis.asyncio.client.Redis(<Pool(<Conn(password=p@ss, x=(1, 2))>)>)> - "
        "network:ConnectionError: refused (p%40ss, other)"
    )
    assert url.explain(noisy) == (
        "ConnectionError: No master found for 'main' : network:ConnectionError: refused (***, ***)"
    )


async def test_clients_are_built_for_each_kind_without_connecting() -> None:
    single = parse("redis://127.0.0.1:1/0").connect()
    cluster = parse("redis+cluster://127.0.0.1:1,127.0.0.1:2").connect(decode_responses=True)
    sentinel = parse("redis+sentinel://127.0.0.1:1/main/2?password=pw").connect(socket_timeout=0.25)
    try:
        assert isinstance(single.client, redis.asyncio.Redis)
        assert isinstance(cluster.client, redis.asyncio.RedisCluster)
        assert [(n.host, n.port) for n in cluster.client.startup_nodes] == [("127.0.0.1", 1), ("127.0.0.1", 2)]
        assert isinstance(sentinel.client, redis.asyncio.Redis)
        kwargs = sentinel.client.connection_pool.connection_kwargs
        assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (2, "pw", 0.25)
    finally:
        for client in (single, cluster, sentinel):
            await client.aclose()
