"""Processes under test: the SIP-lite server (`signaling serve`, or `bench.serve` with switches, optionally under
py-spy), the baseline relay, and redis-server. Each is pinned, logs to a file, and is stopped by its own pid."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import common

_EVENT_RE = re.compile(r'"event": "([^"]+)"')
_LEVEL_RE = re.compile(r'"level": "(warning|error|critical)"')
# Expected, and logged once at start: the in-memory store's single-process warning.
_EXPECTED_WARNINGS = frozenset({"store.embedded", "auth.dev_secret"})


class ProcError(RuntimeError):
    pass


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SIPLITE_* and library switches, plus `extra`."""
    drop = ("SIPLITE_", "MSGPACK_PUREPYTHON", "AIOHTTP_NO_EXTENSIONS", "PYTHONASYNCIODEBUG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def siplite_env(redis_url: str | None, **overrides: str) -> dict[str, str]:
    settings = {
        "SIPLITE_HOST": "127.0.0.1",
        "SIPLITE_PORT": "0",
        "SIPLITE_JWT_SECRET": common.SECRET,
        "SIPLITE_LOG_FORMAT": "json",
        "SIPLITE_LOG_LEVEL": "info",
        "SIPLITE_NODE_ID": "bench-node",
        # The per-connection rate limit (50 frames/s) would throttle a load pair, not the server; the bucket is
        # still checked for every frame.
        "SIPLITE_RATE_LIMIT": "100000",
        "SIPLITE_RATE_BURST": "100000",
    }
    if redis_url is not None:
        settings["SIPLITE_REDIS_URL"] = redis_url
        settings["SIPLITE_REDIS_PREFIX"] = "bench:"
    settings.update(overrides)
    return clean_env(**settings)


class Server:
    """A server process whose log says which port it listens on (`ready_event` with a `port` field)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path,
        cpu_set: set[int] | None,
        *,
        ready_event: str = "server.listening",
        pyspy_output: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.cpu_set = cpu_set
        self.ready_event = ready_event
        self.port = 0
        self.pinned = False
        self.returncode: int | None = None
        self.pyspy_output = pyspy_output
        command = list(argv)
        if pyspy_output is not None:
            pyspy = shutil.which("py-spy", path=str(common.VENV_BIN)) or shutil.which("py-spy")
            if pyspy is None:
                raise ProcError("py-spy is not installed")
            command = [
                pyspy,
                "record",
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(pyspy_output),
                "--",
                *command,
            ]
        self.command = command
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 - our own argv
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=common.REPO,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def wait_ready(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ProcError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            if self.pyspy_output is not None and self.pid == self.process.pid:
                child = _first_child(self.process.pid)
                if child is not None:
                    common.pin(self.process.pid, _other_cpus(self.cpu_set))
                    self.pid = child
            if not self.pinned and (self.pyspy_output is None or self.pid != self.process.pid):
                self.pinned = common.pin(self.pid, self.cpu_set)
            for event in self.events():
                if event.get("event") == self.ready_event and "port" in event:
                    self.port = int(event["port"])
                    # Threads started since (the store's, the loop's executor) get the same CPU.
                    common.pin(self.pid, self.cpu_set)
                    return self.port
            time.sleep(0.05)
        raise ProcError(f"{self.name} did not report {self.ready_event} within {timeout}s:\n{self.tail()}")

    def events(self) -> Iterator[dict[str, Any]]:
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            for line in log:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def cpu(self) -> float:
        return common.cpu_seconds(self.pid)

    def rss(self) -> int:
        return common.rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server (by pid), wait, kill if it lingers. Returns its exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                if self.process.pid != self.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(10)
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait(5)
        self._log.close()
        self.returncode = self.process.returncode
        return self.returncode

    def log_report(self) -> dict[str, Any]:
        """Counts of every event, and the warnings/errors (except the expected start-up ones) with samples."""
        events: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        samples: list[str] = []
        tracebacks = 0
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            for raw in log:
                line = raw.decode(errors="replace").rstrip()
                match = _EVENT_RE.search(line)
                event = match.group(1) if match else None
                if event is not None:
                    events[event] += 1
                if "Traceback" in line:
                    tracebacks += 1
                level = _LEVEL_RE.search(line)
                unstructured = not line.startswith("{") and line.strip() and not line.startswith("py-spy>")
                if (level and event not in _EXPECTED_WARNINGS) or unstructured:
                    key = f"{level.group(1) if level else 'raw'}: {event or line[:100]}"
                    problems[key] += 1
                    if len(samples) < 12:
                        samples.append(line[:600])
        return {
            "events": dict(events),
            "problems": dict(problems),
            "samples": samples,
            "tracebacks": tracebacks,
            "returncode": self.returncode,
        }


def _first_child(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
    return None


def _other_cpus(cpu_set: set[int] | None) -> set[int] | None:
    if cpu_set is None:
        return None
    rest = set(common.cpus()) - cpu_set
    return rest or None


def siplite_command(
    *,
    no_hiredis: bool = False,
    pure_msgpack: bool = False,
    timings: Path | None = None,
    gc_log: bool = False,
    cprofile: Path | None = None,
) -> list[str]:
    """The real `signaling serve`, or `bench.serve` (same server, with switches) when any switch is set."""
    if not (no_hiredis or pure_msgpack or timings or gc_log or cprofile):
        signaling = shutil.which("signaling", path=str(common.VENV_BIN))
        if signaling is not None:
            return [signaling, "serve", "--host", "127.0.0.1", "--port", "0"]
    flags = [
        *(["--no-hiredis"] if no_hiredis else []),
        *(["--pure-msgpack"] if pure_msgpack else []),
        *(["--timings", str(timings)] if timings else []),
        *(["--gc-log"] if gc_log else []),
        *(["--cprofile", str(cprofile)] if cprofile else []),
    ]
    return [sys.executable, "-m", "bench.serve", *flags, "--", "serve", "--host", "127.0.0.1", "--port", "0"]


def relay_command(redis_url: str | None, *, uvloop: bool = False) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.relay",
        "--port",
        "0",
        *(["--redis-url", redis_url] if redis_url else []),
        *(["--uvloop"] if uvloop else []),
    ]


class Redis:
    """Our own redis-server (tests/redis_server.py): a free port, no persistence, pinned to the load CPUs."""

    def __init__(self, cpu_set: set[int] | None) -> None:
        from tests.redis_server import RedisServer

        self.server = RedisServer()
        self.server.start()
        self.pid = self.server.pid or 0
        common.pin(self.pid, cpu_set)
        import redis

        self.client = redis.Redis.from_url(self.server.url, decode_responses=True)

    @property
    def url(self) -> str:
        return self.server.url

    def reset(self) -> None:
        self.client.flushall()
        self.client.config_resetstat()

    def info(self, section: str) -> dict[str, Any]:
        return dict(self.client.info(section))

    def version(self) -> str:
        return str(self.info("server").get("redis_version"))

    def cpu(self) -> float:
        return common.cpu_seconds(self.pid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        self.server.stop()
