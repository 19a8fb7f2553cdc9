"""Logs never carry a token, a push token or an SDP body in full, whatever the call site passes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from signaling import log
from tests.harness import ANSWER, OFFER, PUSH, Harness


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
