"""A throwaway `redis-server` process for tests, multi-process tests and benchmarks.

    with RedisServer() as server:           # free port on 127.0.0.1, no persistence
        use(server.url)

`start()` returns once the server answers PING; `stop()` ends it and removes its working directory. A stopped
server can be started again on the same port (with empty data), which is how tests simulate a Redis restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["RedisServer", "RedisServerError", "free_port"]


class RedisServerError(RuntimeError):
    """redis-server is missing, exited during start-up, or did not answer PING in time."""


class RedisServer:
    """One `redis-server` child process listening on `host:port`, persistence off.

    `port=None` lets the first `start()` pick a free port (retrying with another if a race takes it first);
    later starts reuse it. `extra_args` are appended
    to the command line, for example `["--requirepass", "secret"]`; with a password the server still counts
    as up when it answers PING with NOAUTH.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self._port = port
        self.extra_args = tuple(extra_args)
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

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, executable: str) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="siplite-redis-"))
        # The log goes to a file, not a pipe nobody reads, so a chatty server can never block on it.
        self._log = (self._workdir / "redis.log").open("w+b")
        command = [
            executable,
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
