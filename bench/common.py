"""Shared helpers: CPU pinning, file limits, /proc readings, percentiles, progress lines, machine and versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
VENV_BIN: Final = Path(sys.executable).parent
# HS256 secret the benchmark servers are started with (SIPLITE_JWT_SECRET); tokens are signed with it.
SECRET: Final = "bench-secret-0123456789abcdef0123456789abcdef"  # noqa: S105 - loopback benchmark only
OFFER: Final = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp-mux\r\na=mid:0\r\na=sendrecv\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B\r\n"
)
ANSWER: Final = OFFER.replace("4611731400430051336", "5822193117040034872")
VOIP_TOKEN: Final = "ab" * 32
PUSH_BINDING: Final = {
    "platform": "ios",
    "bundle_id": "com.example.bench",
    "environment": "sandbox",
    "voip_token": VOIP_TOKEN,
}
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


# --- CPUs and limits ---------------------------------------------------------------------------------------------


def cpus() -> list[int]:
    """CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load CPUs): the server alone on the first CPU, everything else on the others.

    None for both when the machine has a single CPU (nothing is pinned then)."""
    available = cpus()
    if len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


def pin(pid: int, cpu_set: set[int] | None) -> bool:
    """Pin every thread of `pid` to `cpu_set`. False if that was not possible."""
    if cpu_set is None:
        return False
    ok = False
    task_dir = Path(f"/proc/{pid}/task")
    tids = [int(t) for t in os.listdir(task_dir)] if task_dir.exists() else [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpu_set)
            ok = True
        except OSError:
            pass
    return ok


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def install_uvloop() -> bool:
    """Use uvloop for asyncio.run() in this process, when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# --- /proc -------------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all threads), from /proc/PID/stat; NaN if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy ticks, total ticks) from /proc/stat; busy is everything but idle and iowait."""
    out: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values[:8]]
                total = sum(ticks)
                out[int(name[3:])] = (total - ticks[3] - ticks[4], total)
    return out


def busy_fraction(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpu_set: Iterable[int] | None
) -> float | None:
    """Share of time the CPUs in `cpu_set` were busy (any process, interrupts included) between two readings."""
    if cpu_set is None:
        return None
    busy = total = 0
    for cpu in cpu_set:
        if cpu in before and cpu in after:
            busy += after[cpu][0] - before[cpu][0]
            total += after[cpu][1] - before[cpu][1]
    return busy / total if total else None


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS), in bytes; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def nofile_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) open-files limit of process `pid`, from /proc/PID/limits."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                parts = line.split()
                return int(parts[3]), int(parts[4])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- statistics --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: Iterable[float]) -> dict[str, float | int]:
    """n, p50, p90, p99, max and mean of durations given in seconds, reported in milliseconds."""
    values = sorted(seconds)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p90_ms": round(percentile(values, 90) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "max_ms": round(values[-1] * 1000, 3),
        "mean_ms": round(sum(values) / len(values) * 1000, 3),
    }


# --- progress ----------------------------------------------------------------------------------------------------


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, one line every few seconds otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = 0.0
        self._width = 0
        self.started = time.monotonic()

    def update(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        line = f"[bench {elapsed:6.1f}s] {text}"
        if self._tty:
            if force or now - self._last >= 0.2:
                pad = max(0, self._width - len(line))
                sys.stderr.write("\r" + line + " " * pad)
                sys.stderr.flush()
                self._width = len(line)
                self._last = now
        elif force or now - self._last >= 5.0:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self._last = now

    def done(self, text: str) -> None:
        """A line that stays."""
        if self._tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            self._width = 0
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"[bench {elapsed:6.1f}s] {text}\n")
        sys.stderr.flush()
        self._last = 0.0


# --- machine and versions ----------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(cpus()),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "nofile_soft": soft,
        "nofile_hard": hard,
    }


def versions() -> dict[str, Any]:
    import msgpack

    msgpack_c = not msgpack.Packer.__module__.endswith("fallback")
    return {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "aiohttp": _version("aiohttp"),
        "aiohttp_c_extensions": not _aiohttp_no_extensions(),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "hiredis_present": _version("hiredis") is not None,
        "msgpack": _version("msgpack"),
        "msgpack_c_extension": msgpack_c,
        "uvloop": _version("uvloop"),
        "structlog": _version("structlog"),
        "pyjwt": _version("PyJWT"),
        "aioapns": _version("aioapns"),
        "matplotlib": _version("matplotlib"),
        "sip_lite": _version("sip-lite"),
    }


def _aiohttp_no_extensions() -> bool:
    try:
        from aiohttp import http_parser

        return bool(http_parser.HttpRequestParser is http_parser.HttpRequestParserPy)
    except (ImportError, AttributeError):
        return True
