"""Load processes: spawned with multiprocessing, pinned to the load CPUs, driven over a pipe by the parent.

`Worker("callsetup", {...})` starts a process that runs `bench.load.callsetup(ctl, ...)`; the parent talks to it
with `send()`/`recv()` and reads its progress counter without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable
from typing import Any

from bench import common


class Ctl:
    """The worker's end of the pipe, readable without blocking the event loop, plus the progress counter."""

    def __init__(self, pipe: multiprocessing.connection.Connection, counter: Any) -> None:
        self.pipe = pipe
        self.counter = counter

    def send(self, message: Any) -> None:
        # uvloop leaves a descriptor it has polled (`recv`) non-blocking: a large message (a long run's latency
        # samples) then fails with EAGAIN once the pipe's buffer is full, instead of waiting for the parent.
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send(message)

    async def recv(self) -> Any:
        loop = asyncio.get_running_loop()
        fd = self.pipe.fileno()
        while not self.pipe.poll():
            ready: asyncio.Future[None] = loop.create_future()

            def wake(ready: asyncio.Future[None] = ready) -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        return self.pipe.recv()

    def progress(self, value: int) -> None:
        self.counter.value = value


def _main(
    target: str,
    kwargs: dict[str, Any],
    pipe: multiprocessing.connection.Connection,
    counter: Any,
    cpu_set: set[int] | None,
    use_uvloop: bool,
) -> None:
    if cpu_set is not None:
        common.pin(os.getpid(), cpu_set)
    common.raise_nofile()
    if use_uvloop:
        common.install_uvloop()
    from bench import load

    func: Callable[..., Any] = getattr(load, target)
    try:
        asyncio.run(func(Ctl(pipe, counter), **kwargs))
    except BaseException as exc:
        try:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            raise


class WorkerError(RuntimeError):
    pass


class Worker:
    def __init__(
        self,
        target: str,
        kwargs: dict[str, Any],
        *,
        cpu_set: set[int] | None,
        use_uvloop: bool = True,
        name: str | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.counter: Any = ctx.RawValue("q", 0)
        self.name = name or target
        self.process = ctx.Process(
            target=_main,
            args=(target, kwargs, child, self.counter, cpu_set, use_uvloop),
            name=f"bench-{self.name}",
            daemon=True,
        )
        self.process.start()
        child.close()

    @property
    def progress(self) -> int:
        return int(self.counter.value)

    def send(self, message: Any) -> None:
        # uvloop leaves a descriptor it has polled (`recv`) non-blocking: a large message (a long run's latency
        # samples) then fails with EAGAIN once the pipe's buffer is full, instead of waiting for the parent.
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send(message)

    def recv(self, timeout: float, on_wait: Callable[[], None] | None = None) -> Any:
        """The worker's next message; raises WorkerError if it died, failed or said nothing for `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pipe.poll(0.2):
                try:
                    message = self.pipe.recv()
                except EOFError:
                    raise WorkerError(f"worker {self.name} exited (code {self.process.exitcode})") from None
                if isinstance(message, tuple) and message and message[0] == "error":
                    raise WorkerError(f"worker {self.name} failed: {message[1]}")
                return message
            if not self.process.is_alive():
                raise WorkerError(f"worker {self.name} exited (code {self.process.exitcode})")
            if on_wait is not None:
                on_wait()
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {self.name} did not answer within {timeout:.0f}s")

    def request(self, message: Any, timeout: float, on_wait: Callable[[], None] | None = None) -> Any:
        self.send(message)
        return self.recv(timeout, on_wait)

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the worker to close its connections and exit; terminate it if it does not."""
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.pipe.send(("close",))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.pipe.close()
