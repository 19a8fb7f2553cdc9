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
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import redis
import redis.sentinel

__all__ = ["RedisClusterServers", "RedisSentinelServers", "RedisServer", "RedisServerError", "free_port"]


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


class _Group(_Started):
    """Servers started together and stopped together."""

    servers: list[RedisServer]

    def stop(self) -> None:
        """Stop every server; idempotent."""
        for server in self.servers:
            server.stop()


class RedisClusterServers(_Group):
    """A Redis Cluster of `masters` cluster-enabled redis-servers on free ports, without replicas.

    The slots are split evenly and assigned by hand (CLUSTER ADDSLOTSRANGE, SET-CONFIG-EPOCH, MEET), which
    is what `redis-cli --cluster create` does, without its fixed one-second waits.
    """

    SLOTS = 16384

    def __init__(self, masters: int = 3, *, host: str = "127.0.0.1", startup_timeout: float = 10.0) -> None:
        self.host = host
        self.masters = masters
        self.startup_timeout = startup_timeout
        self.servers = []
        self._bus_ports: list[int] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{self.host}:{s.port}" for s in self.servers)

    def start(self) -> None:
        """Start the nodes, join them into one cluster, and return once every node reports `cluster_state:ok`."""
        for _ in range(self.masters):
            self._start_node()
        clients = [redis.Redis(self.host, s.port, decode_responses=True) for s in self.servers]
        try:
            for i, client in enumerate(clients):
                client.cluster("SET-CONFIG-EPOCH", i + 1)
                first, last = i * self.SLOTS // self.masters, (i + 1) * self.SLOTS // self.masters - 1
                client.cluster("ADDSLOTSRANGE", first, last)
            for server, bus_port in zip(self.servers[1:], self._bus_ports[1:], strict=True):
                clients[0].cluster("MEET", self.host, server.port, bus_port)

            def joined() -> bool:
                for client in clients:
                    info = client.cluster("INFO")
                    if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != self.masters:
                        return False
                return True

            _poll(joined, self.startup_timeout, "the cluster did not reach cluster_state:ok")
        finally:
            for client in clients:
                client.close()

    def flush(self) -> None:
        """Empty every node (FLUSHALL on each master: a cluster's keys are spread over them)."""
        for server in self.servers:
            with redis.Redis(self.host, server.port) as client:
                client.flushall()

    def _start_node(self) -> None:
        # The cluster bus port is chosen like the client port; a race that takes it is retried with another.
        for attempt in range(3):
            bus_port = free_port(self.host)
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                str(bus_port),
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
            return


class RedisSentinelServers(_Group):
    """A redis-server and one Sentinel that monitors it as `master_name` (quorum 1, no replicas)."""

    def __init__(
        self, master_name: str = "siplite", *, host: str = "127.0.0.1", startup_timeout: float = 10.0
    ) -> None:
        self.host = host
        self.master_name = master_name
        self.startup_timeout = startup_timeout
        self.master = RedisServer(host=host, startup_timeout=startup_timeout)
        self.sentinel: RedisServer | None = None
        self.servers = [self.master]

    @property
    def url(self) -> str:
        if self.sentinel is None:
            raise RedisServerError("the Sentinel's port is chosen by start()")
        return f"redis+sentinel://{self.host}:{self.sentinel.port}/{self.master_name}"

    def start(self) -> None:
        """Start the master, then the Sentinel, and return once the Sentinel names the master."""
        self.master.start()
        config = f"sentinel monitor {self.master_name} {self.host} {self.master.port} 1\n"
        self.sentinel = RedisServer(
            host=self.host, extra_args=["--sentinel"], config=config, startup_timeout=self.startup_timeout
        )
        self.servers.append(self.sentinel)
        self.sentinel.start()
        sentinel = redis.sentinel.Sentinel([(self.host, self.sentinel.port)], socket_timeout=1.0)
        expected = (self.host, self.master.port)

        def ready() -> bool:
            try:
                return bool(sentinel.discover_master(self.master_name) == expected)
            except redis.sentinel.MasterNotFoundError:
                return False

        try:
            _poll(ready, self.startup_timeout, "Sentinel did not name the master")
        finally:
            for client in sentinel.sentinels:
                client.close()

    def flush(self) -> None:
        with redis.Redis.from_url(self.master.url) as client:
            client.flushall()


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
