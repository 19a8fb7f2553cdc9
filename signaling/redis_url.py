"""Redis connection URLs: one server, a Redis Cluster, or a master that Redis Sentinel manages.

    redis://[[user]:password@]host[:port][/db][?option=value...]         one server (redis-py's own forms)
    rediss://...                                                            the same over TLS
    unix://[[user]:password@]/path/to/socket[?db=N]                         one server on a Unix socket

    redis+cluster://[[user]:password@]host[:port][,host[:port]...][?option=value...]
    rediss+cluster://...                                                    the same over TLS

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master>[/db][?option=value...]
    rediss+sentinel://...                                                   the same over TLS, to both

A cluster URL lists nodes to discover the cluster from (one reachable node is enough, the rest are found through
it; the port defaults to 6379); a cluster has database 0 only. A Sentinel URL lists the Sentinels (port 26379 by
default) and names the master they monitor; the credentials and the database are the master's, and Sentinels
that ask for a password of their own get `sentinel_password` (and `sentinel_username`) from the query string.
Other query options are redis-py's connection options (`socket_timeout=...`, `ssl_ca_certs=...` and so on) and
apply to every connection. An IPv6 host is written in brackets: `[::1]:7000`.

`parse` checks a URL without connecting and raises `ValueError` with a message that never repeats the URL (it
may hold a password); `RedisUrl.connect` builds the client.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisClusterException, RedisError

__all__ = ["ERRORS", "SCHEMES", "Client", "Kind", "RedisClient", "RedisUrl", "parse"]

Client = redis.asyncio.Redis | redis.asyncio.RedisCluster
"""What `RedisUrl.connect` hands out: a Sentinel-managed master is a plain `Redis` whose pool asks Sentinel."""

ERRORS: Final = (RedisError, RedisClusterException, OSError)
"""What a client raises when Redis fails (redis-py's cluster errors are not all `RedisError`s)."""

# Sentinel's MasterNotFoundError quotes the repr of each Sentinel client, connection options and all.
_CLIENT_REPR: Final = re.compile(r"<redis\..*?\)> - ")


class Kind(enum.Enum):
    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


SCHEMES: Final = {
    "redis": Kind.SINGLE,
    "rediss": Kind.SINGLE,
    "unix": Kind.SINGLE,
    "redis+cluster": Kind.CLUSTER,
    "rediss+cluster": Kind.CLUSTER,
    "redis+sentinel": Kind.SENTINEL,
    "rediss+sentinel": Kind.SENTINEL,
}

_DEFAULT_PORT: Final = {Kind.CLUSTER: 6379, Kind.SENTINEL: 26379}


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A parsed URL: where to connect and with which redis-py connection options. Its repr leaves out the URL
    and the options, which may hold passwords."""

    url: str = field(repr=False)
    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    """Cluster nodes to start from, or the Sentinels; empty for one server (redis-py parses `url` itself)."""
    master: str | None = None
    """The Sentinel service name of the master."""
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """redis-py connection options from the URL (credentials, db, query), for the data connections."""
    sentinel_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def where(self) -> str:
        """Where the URL points, for messages: never a password."""
        if self.kind is Kind.SINGLE:
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return parts.path or "?"
            try:
                port = parts.port or 6379
            except ValueError:
                port = 6379
            return f"{parts.hostname or 'localhost'}:{port}"
        nodes = ",".join(_join_host(host, port) for host, port in self.nodes)
        if self.kind is Kind.CLUSTER:
            return f"cluster {nodes}"
        return f"master {self.master!r} of Sentinel {nodes}"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords the URL holds, as written and decoded, to scrub from error messages."""
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        found = [userinfo.partition(":")[2]] if ":" in userinfo else []
        query = parse_qs(parts.query)
        found += query.get("password", []) + query.get("sentinel_password", [])
        found += [unquote(s) for s in found]
        return tuple(s for s in set(found) if s)

    def explain(self, exc: BaseException) -> str:
        """`exc` as "Type: message", fit for a log line: without passwords or redis-py's client reprs."""
        message = _CLIENT_REPR.sub("", f"{type(exc).__name__}: {exc}")
        for secret in self.secrets:
            message = message.replace(secret, "***")
        return message

    def connect(self, **options: Any) -> RedisClient:
        """A client for this URL (it connects lazily, on the first command). `options` are defaults for
        redis-py's connection options; the URL's own win. Raises `ValueError` if redis-py refuses them."""
        if self.kind is Kind.SINGLE:
            return RedisClient(redis.asyncio.Redis.from_url(self.url, **options))
        merged = {**options, **self.options}
        if self.kind is Kind.CLUSTER:
            # `retry` becomes the cluster's: each retry follows a refresh of the slot map, and it covers
            # ClusterDownError and timeouts too (redis-py's rule, whatever the Retry's supported errors say).
            if self.tls:
                merged["ssl"] = True
            startup = [ClusterNode(host, port) for host, port in self.nodes]
            cluster = redis.asyncio.RedisCluster(startup_nodes=startup, **merged)
            return RedisClient(cluster)
        if self.tls:
            merged["ssl"] = True
        socket_options = {k: v for k, v in merged.items() if k.startswith("socket_")}
        sentinel_options = {**socket_options, **self.sentinel_options}
        if self.tls:
            sentinel_options.setdefault("ssl", True)
        if self.master is None:
            raise ValueError("a Sentinel URL names its master")
        sentinel = Sentinel(list(self.nodes), sentinel_kwargs=sentinel_options)
        return RedisClient(sentinel.master_for(self.master, **merged), sentinel)


class RedisClient:
    """A client and what else it opened (Sentinel's own connections), closed together."""

    def __init__(self, client: Client, sentinel: Sentinel | None = None) -> None:
        self.client = client
        self._sentinel = sentinel

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            if self._sentinel is not None:
                await self._sentinel.aclose()


def parse(url: str) -> RedisUrl:
    """Check `url` and split it into what `RedisUrl.connect` needs; raise `ValueError` if it is malformed."""
    scheme, sep, _ = url.partition("://")
    kind = SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise ValueError(f"the URL must start with one of {', '.join(s + '://' for s in SCHEMES)}")
    tls = scheme.lower().startswith("rediss")
    if kind is Kind.SINGLE:
        try:
            parse_url(url)
        except ValueError as exc:
            raise ValueError(_safe(exc, url)) from None
        return RedisUrl(url, kind, tls)

    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(_split_host(item, _DEFAULT_PORT[kind]) for item in hosts.split(","))
    query = parse_qs(parts.query)
    sentinel_options: dict[str, Any] = {}
    for name in ("sentinel_username", "sentinel_password"):
        if name in query:
            sentinel_options[name.removeprefix("sentinel_")] = query.pop(name)[0]
    path = [unquote(p) for p in parts.path.split("/") if p]
    master = None
    if kind is Kind.CLUSTER:
        if path not in ([], ["0"]):
            raise ValueError("a Redis Cluster has database 0 only: the cluster URL takes no other path")
        db = []
    else:
        if not path or len(path) > 2:
            raise ValueError("a Sentinel URL names the master after the hosts: redis+sentinel://host/<master>")
        master, db = path[0], path[1:]
    # redis-py parses credentials and options; it is given one plain URL of the same shape to do it.
    plain = f"{'rediss' if tls else 'redis'}://{userinfo + '@' if userinfo else ''}{_join_host(*nodes[0])}"
    plain += "/" + "/".join(db)
    if query:
        plain += "?" + urlencode(query, doseq=True)
    try:
        options = dict(parse_url(plain))
    except ValueError as exc:
        raise ValueError(_safe(exc, url)) from None
    for name in ("host", "port", "path"):
        options.pop(name, None)
    options.pop("connection_class", None)  # TLS is `tls`, from the scheme
    if kind is Kind.CLUSTER and options.pop("db", 0):
        raise ValueError("a Redis Cluster has database 0 only")
    return RedisUrl(url, kind, tls, nodes, master, options, sentinel_options)


def _split_host(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):
        host, _, tail = item[1:].partition("]")
        port_text = tail.removeprefix(":") if tail.startswith(":") else tail
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError("every host in the URL needs a name: host[:port][,host[:port]...]")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return unquote(host), port


def _join_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _safe(exc: Exception, url: str) -> str:
    message = str(exc)
    return message.replace(url, "<url>")
