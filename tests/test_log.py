"""Logs never carry a token, a push token or an SDP body in full, whatever the call site passes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import signal
import sys
from collections.abc import Iterator

import pytest
import structlog

from signaling import log
from tests.harness import ANSWER, OFFER, PUSH, Harness
from tests.test_cli import STARTUP_TIMEOUT, env, serving


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    log.configure("debug", "json", stream=buffer, cache=False)
    yield buffer
    structlog.reset_defaults()


def test_redact_processor_shortens_secrets_at_any_depth(captured: io.StringIO) -> None:
    log.get_logger("t").info(
        "push.sent",
        token="eyJhbGciOiJIUzI1NiJ9.secret.signature",
        sdp=OFFER,
        push={"voip_token": "ab" * 32, "bundle_id": "com.example.app"},
    )
    line = json.loads(captured.getvalue())
    assert line["token"].startswith("eyJhbG…")
    assert "secret" not in line["token"]
    assert line["sdp"] == f"<{len(OFFER)} bytes>"
    assert line["push"]["voip_token"] == "ababab…(64)"
    assert line["push"]["bundle_id"] == "com.example.app"


async def test_a_whole_call_logs_no_token_and_no_sdp(sip: Harness, captured: io.StringIO) -> None:
    token = sip.token("alice")
    alice = await sip.connect()
    await alice.register(token, "alice-phone", push=PUSH)
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    await call.hangup()
    await bob.next_event("bye")
    text = captured.getvalue()
    events = [json.loads(line)["event"] for line in text.splitlines()]
    assert {"presence.registered", "call.started", "call.state_changed", "call.ended"} <= set(events)
    for secret in (token, token.split(".")[2], PUSH["voip_token"], "m=audio", "192.0.2.1"):
        assert secret not in text


ANSI = re.compile(r"\x1b\[[0-9;]*m")


async def test_serve_logs_readable_lines_on_a_terminal() -> None:
    """`signaling serve` with its output on a terminal (a pty here) writes console lines, not JSON."""
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "serve", env=env(SIPLITE_LOG_FORMAT="auto"), stdout=slave, stderr=slave
    )
    os.close(slave)
    loop = asyncio.get_running_loop()
    output = bytearray()
    listening = asyncio.Event()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process has gone and closed its side
            data = b""
        output.extend(data)
        if not data or b"server.listening" in output:
            listening.set()
        if not data:
            loop.remove_reader(master)

    os.set_blocking(master, False)
    loop.add_reader(master, readable)
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            await listening.wait()
        text = ANSI.sub("", output.decode(errors="replace"))
        [line] = [line for line in text.splitlines() if "server.listening" in line]
        with pytest.raises(ValueError):
            json.loads(line)
        assert re.search(r"\[info\s*\] server\.listening\s+(\w+=\S+ )*host=127\.0\.0\.1 port=\d+", line), line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 0
    finally:
        loop.remove_reader(master)
        os.close(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_logs_json_lines_when_its_output_is_not_a_terminal() -> None:
    async with serving(env(SIPLITE_LOG_FORMAT="auto")) as (proc, _, lines):
        # `serving` parsed every line up to server.listening as JSON.
        assert [line["event"] for line in lines][-1] == "server.listening"
        assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 0
