"""Throwaway `redis-server` processes for tests, multi-process tests and benchmarks.

    with RedisServer() as server:           # free port on 127.0.0.1, no persistence
        use(server.url)
    with RedisClusterServers() as cluster:  # three masters, no replicas, every slot assigned
        use(cluster.url)                    # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
    with RedisSentinelServers() as servers: # a master and one Sentinel that monitors it
        use(servers.url)                    # redis+sentinel://127.0.0.1:p/siplite

`start()` returns once the server answers PING (a cluster: once every node says `cluster_state:ok`; Sentinel:
once it names the master); `stop()` ends it and removes its working directory. A stopped server can be started
again on the same port (with empty data), which is how tests simulate a Redis restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

import redis
import redis.exceptions
import redis.sentinel

__all__ = [
    "RedisClusterServers",
    "RedisSentinelServers",
    "RedisServer",
    "RedisServerError",
    "TlsFiles",
    "free_port",
]


class _Started:
    """`start()` and `stop()` as a context manager; `stop()` also cleans up after a `start()` that failed."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisServerError(RuntimeError):
    """redis-server is missing, exited during start-up, or did not answer PING in time."""


class RedisServer(_Started):
    """One `redis-server` child process listening on `host:port`, persistence off.

    `port=None` lets the first `start()` pick a free port (retrying with another if a race takes it first);
    later starts reuse it. `extra_args` are appended
    to the command line, for example `["--requirepass", "secret"]`; with a password the server still counts
    as up when it answers PING with NOAUTH. `config` is the text of a configuration file, written to the
    working directory and named first on the command line (Sentinel needs a file it can rewrite).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
        config: str | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.extra_args = tuple(extra_args)
        self.config = config
        self.executable = executable
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        """The listening port; known once `start()` has chosen it."""
        if self._port is None:
            raise RedisServerError("the port is chosen by start()")
        return self._port

    @property
    def url(self) -> str:
        """`redis://host:port/0` (without credentials, even if `extra_args` set a password)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Spawn the server and return once it answers PING; raise `RedisServerError` otherwise."""
        if self.running:
            raise RedisServerError("already running")
        executable = shutil.which(self.executable)
        if executable is None:
            raise RedisServerError(f"{self.executable!r} not found on PATH")
        # A port is chosen once and kept, so a restarted server is found where the old one was.
        choose_port = self._port is None
        attempts = 3 if choose_port else 1
        for attempt in range(attempts):
            if choose_port:
                self._port = free_port(self.host)
            self._spawn(executable)
            try:
                self._wait_until_ready()
                return
            except RedisServerError:
                log = self._log_text()
                self.stop()
                if attempt + 1 < attempts and "Address already in use" in log:
                    continue
                raise

    def stop(self) -> None:
        """Terminate the server (killing it if it lingers) and delete its working directory; idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _spawn(self, executable: str) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="siplite-redis-"))
        # The log goes to a file, not a pipe nobody reads, so a chatty server can never block on it.
        self._log = (self._workdir / "redis.log").open("w+b")
        config = []
        if self.config is not None:
            (self._workdir / "redis.conf").write_text(self.config)
            config = [str(self._workdir / "redis.conf")]
        command = [
            executable,
            *config,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._workdir),
            *self.extra_args,
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pause = 0.002
        while True:
            if self._process is None or self._process.poll() is not None:
                raise RedisServerError(f"redis-server exited during start-up:\n{self._log_text()}")
            if _answers_ping(self.host, self.port):
                return
            if time.monotonic() >= deadline:
                raise RedisServerError(
                    f"redis-server did not answer PING within {self.startup_timeout}s:\n{self._log_text()}"
                )
            # Polling, not synchronisation: the deadline above bounds the wait.
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS port needs: a server certificate for 127.0.0.1 and its key, a client certificate with its key
    in one PEM file (the cluster bus asks its peers for one), and the CA that signed both."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_pem: Path

    def args(self, tls_port: int) -> list[str]:
        """redis-server arguments for a TLS port beside the plain one (clients need no certificate)."""
        return [
            *("--tls-port", str(tls_port), "--tls-cert-file", str(self.cert_file)),
            *("--tls-key-file", str(self.key_file), "--tls-ca-cert-file", str(self.ca_file)),
            *("--tls-client-cert-file", str(self.client_pem), "--tls-client-key-file", str(self.client_pem)),
            *("--tls-auth-clients", "no", "--tls-replication", "yes"),
        ]


class _Group(_Started):
    """Servers started together and stopped together."""

    servers: list[RedisServer]

    def stop(self) -> None:
        """Stop every server; idempotent."""
        for server in self.servers:
            server.stop()


class RedisClusterServers(_Group):
    """A Redis Cluster of `masters` cluster-enabled redis-servers on free ports, each with `replicas` replicas.

    The slots are split evenly and assigned by hand (CLUSTER ADDSLOTSRANGE, SET-CONFIG-EPOCH, MEET, REPLICATE),
    which is what `redis-cli --cluster create` does, without its fixed one-second waits. `node_timeout` is the
    cluster-node-timeout, in seconds: how long a silent master has before its replica takes over.
    """

    SLOTS = 16384

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas: int = 0,
        node_timeout: float = 15.0,
        tls: TlsFiles | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.tls = tls
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.startup_timeout = startup_timeout
        self.servers = []
        self._bus_ports: list[int] = []
        self._tls_ports: list[int] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{self.host}:{s.port}" for s in self.servers if s.running)

    @property
    def tls_url(self) -> str:
        """`rediss+cluster://` to the TLS ports, trusting the CA of `tls` (the cluster also speaks TLS between
        its nodes, and tells a TLS client the TLS ports)."""
        if self.tls is None:
            raise RedisServerError("the cluster was started without TLS")
        nodes = ",".join(f"{self.host}:{port}" for port in self._tls_ports)
        return f"rediss+cluster://{nodes}?ssl_ca_certs={self.tls.ca_file}"

    def start(self) -> None:
        """Start the nodes, join them into one cluster, and return once every node reports `cluster_state:ok`
        (and every replica is in sync with its master)."""
        for _ in range(self.masters * (1 + self.replicas)):
            self._start_node()
        clients = [redis.Redis(self.host, s.port, decode_responses=True) for s in self.servers]
        try:
            for i, client in enumerate(clients):
                client.cluster("SET-CONFIG-EPOCH", i + 1)
            for i, client in enumerate(clients[: self.masters]):
                first, last = i * self.SLOTS // self.masters, (i + 1) * self.SLOTS // self.masters - 1
                client.cluster("ADDSLOTSRANGE", first, last)
            for server, bus_port in zip(self.servers[1:], self._bus_ports[1:], strict=True):
                clients[0].cluster("MEET", self.host, server.port, bus_port)
            _poll(lambda: self._agree(clients, state=None), self.startup_timeout, "the nodes did not meet")
            for i, replica in enumerate(clients[self.masters :]):
                replica.cluster("REPLICATE", clients[i % self.masters].cluster("MYID"))
            _poll(lambda: self._agree(clients, state="ok"), self.startup_timeout, "the cluster did not form")
        finally:
            for client in clients:
                client.close()

    def wait_for_failover(self) -> None:
        """Return once a replica serves every slot of the master that was stopped, and every running node
        agrees and says `cluster_state:ok` again."""
        running = {s.port for s in self.servers if s.running}
        clients = [redis.Redis(self.host, port, decode_responses=True) for port in running]

        def taken_over() -> bool:
            for client in clients:
                if any(int(node[1]) not in running for _, _, node, *_ in client.cluster("SLOTS")):
                    return False
            return self._agree(clients, state="ok")

        try:
            _poll(taken_over, self.startup_timeout, "no replica took over")
        finally:
            for client in clients:
                client.close()

    def wait_for_shard_channel(self, channel: str) -> None:
        """Return once the master that serves `channel`'s slot has a shard subscriber to it (SSUBSCRIBE)."""
        with redis.Redis.from_url(self.master_of(channel).url, decode_responses=True) as master:
            _poll(
                lambda: channel in master.pubsub_shardchannels(),
                self.startup_timeout,
                f"nobody subscribed {channel!r}",
            )

    def master_of(self, key: str) -> RedisServer:
        """The running server that serves `key`'s slot now (the others answer MOVED)."""
        for server in self.servers:
            if server.running:
                with redis.Redis(self.host, server.port) as client:
                    try:
                        client.exists(key)
                    except redis.exceptions.MovedError:
                        continue
                    return server
        raise RedisServerError(f"no running master serves {key!r}")

    def flush(self) -> None:
        """Empty every master (FLUSHALL on each: a cluster's keys are spread over them)."""
        for server in self.servers:
            with redis.Redis(self.host, server.port, decode_responses=True) as client:
                if client.info("replication")["role"] == "master":
                    client.flushall()

    def _agree(self, clients: list[redis.Redis], *, state: str | None) -> bool:
        """Every node knows every other (and says `cluster_state:<state>`, and every replica is in sync)."""
        for client in clients:
            info = client.cluster("INFO")
            if int(info["cluster_known_nodes"]) != len(self.servers):
                return False
            if state is None:
                continue
            if info["cluster_state"] != state:
                return False
            replication = client.info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def _start_node(self) -> None:
        # The cluster bus port is chosen like the client port; a race that takes it is retried with another.
        for attempt in range(3):
            bus_port, tls_port = free_port(self.host), free_port(self.host)
            tls = [] if self.tls is None else [*self.tls.args(tls_port), "--tls-cluster", "yes"]
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(bus_port),
                "--cluster-node-timeout",
                str(round(self.node_timeout * 1000)),
                *_NO_SYNC_DELAY,
                *tls,
            ]
            server = RedisServer(host=self.host, extra_args=args, startup_timeout=self.startup_timeout)
            try:
                server.start()
            except RedisServerError as exc:
                if attempt < 2 and "Address already in use" in str(exc):
                    continue
                raise
            self.servers.append(server)
            self._bus_ports.append(bus_port)
            self._tls_ports.append(tls_port)
            return


class RedisSentinelServers(_Group):
    """A redis-server and one Sentinel that monitors it as `master_name` (quorum 1), and with `replica` a
    replica of it that Sentinel can promote. `down_after` is Sentinel's down-after-milliseconds, in seconds:
    how long a silent master has before the failover starts."""

    def __init__(
        self,
        master_name: str = "siplite",
        *,
        replica: bool = False,
        down_after: float = 5.0,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.master_name = master_name
        self.down_after = down_after
        self.startup_timeout = startup_timeout
        self.master = RedisServer(host=host, extra_args=_NO_SYNC_DELAY, startup_timeout=startup_timeout)
        self.replica: RedisServer | None = None
        self.sentinel: RedisServer | None = None
        self.servers = [self.master]
        self._with_replica = replica

    @property
    def url(self) -> str:
        return f"redis+sentinel://{self.host}:{self._sentinel().port}/{self.master_name}"

    def start(self) -> None:
        """Start the master (and its replica, once in sync), then the Sentinel; return once the Sentinel
        names the master (and knows the replica)."""
        self.master.start()
        if self._with_replica:
            self.replica = RedisServer(
                host=self.host,
                extra_args=["--replicaof", self.host, str(self.master.port)],
                startup_timeout=self.startup_timeout,
            )
            self.servers.append(self.replica)
            self.replica.start()
            with redis.Redis.from_url(self.replica.url) as replica:
                _poll(
                    lambda: replica.info("replication").get("master_link_status") == "up",
                    self.startup_timeout,
                    "the replica did not sync with the master",
                )
        name = self.master_name
        config = (
            f"sentinel monitor {name} {self.host} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {name} {round(self.down_after * 1000)}\n"
        )
        self.sentinel = RedisServer(
            host=self.host, extra_args=["--sentinel"], config=config, startup_timeout=self.startup_timeout
        )
        self.servers.append(self.sentinel)
        self.sentinel.start()
        replicas = 1 if self._with_replica else 0
        self._wait_for(self.master, replicas, "Sentinel did not name the master")

    def wait_for_failover(self) -> None:
        """Return once Sentinel names the replica as the master (after the master was stopped)."""
        if self.replica is None:
            raise RedisServerError("a failover needs a replica")
        self._wait_for(self.replica, 0, "Sentinel did not promote the replica")

    def flush(self) -> None:
        with redis.Redis.from_url(self.master.url) as client:
            client.flushall()

    def _sentinel(self) -> RedisServer:
        if self.sentinel is None:
            raise RedisServerError("the Sentinel's port is chosen by start()")
        return self.sentinel

    def _wait_for(self, master: RedisServer, replicas: int, failure: str) -> None:
        sentinel = redis.sentinel.Sentinel([(self.host, self._sentinel().port)], socket_timeout=1.0)
        expected = (self.host, master.port)

        def named() -> bool:
            try:
                return bool(
                    sentinel.discover_master(self.master_name) == expected
                    and len(sentinel.discover_slaves(self.master_name)) >= replicas
                )
            except redis.sentinel.MasterNotFoundError:
                return False

        try:
            _poll(named, self.startup_timeout, failure)
        finally:
            for client in sentinel.sentinels:
                client.close()


# A master waits five seconds for more replicas before a diskless full sync, by default.
_NO_SYNC_DELAY: Final = ("--repl-diskless-sync-delay", "0")


def _poll(done: Callable[[], bool], timeout: float, failure: str) -> None:
    """Call `done` until it says so; raise `RedisServerError(failure)` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while not done():
        if time.monotonic() >= deadline:
            raise RedisServerError(f"{failure} within {timeout}s")
        # Polling, not synchronisation: the deadline above bounds the wait.
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (another process may still take it before you do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(host: str, port: int) -> bool:
    """True if the server replies PONG, or NOAUTH (up, but password-protected)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))
