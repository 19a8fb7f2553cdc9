"""ApnsProvider on the real aioapns client against the local APNs stand-in (tests/apns_server.py).

Waits synchronise on what the server recorded (`wait_until`); time bounds use short configured timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from push.apns import ApnsConfig, ApnsProvider, classify
from push.base import IncomingCallPush, MissedCallAlert, Outcome, PushConfigError
from push.payload import MAX_PAYLOAD_BYTES, call_uuid, incoming_call_payload
from signaling.clock import SystemClock
from signaling.config import Settings
from signaling.models import PushEnvironment
from signaling.server import APNS_SETTINGS, build_push
from tests.apns_server import Answer, ApnsPki, ApnsServer
from tests.harness import make_settings

BUNDLE = "com.example.app"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def tok(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def incoming(
    token: str,
    *,
    ttl: float = 30.0,
    environment: PushEnvironment = PushEnvironment.PRODUCTION,
    caller_name: str | None = "Alice Example",
    call_id: str = "call-1",
) -> IncomingCallPush:
    now = time.time()
    return IncomingCallPush(
        token=token,
        bundle_id=BUNDLE,
        environment=environment,
        call_id=call_id,
        caller_id="alice",
        caller_name=caller_name,
        video=True,
        sent_at=now,
        deadline=now + ttl,
    )


@pytest.fixture
async def server(apns_server: ApnsServer) -> AsyncIterator[ApnsServer]:
    """`apns_server`, checked at the end: the provider never sent a request APNs would refuse."""
    yield apns_server
    assert apns_server.errors == []


async def started(config: ApnsConfig) -> ApnsProvider:
    provider = ApnsProvider(config)
    await provider.start()
    return provider


# --- what goes on the wire --------------------------------------------------------------------------------------


async def test_incoming_call_headers_and_payload(server: ApnsServer, apns_provider: ApnsProvider) -> None:
    push = incoming(tok("a"))
    result = await apns_provider.send_incoming_call(push)

    assert (result.outcome, result.status, result.attempts) == (Outcome.DELIVERED, 200, 1)
    [request] = server.requests
    assert request.token == push.token
    headers = request.headers
    assert headers[":method"] == "POST"
    assert headers[":path"] == f"/3/device/{push.token}"
    assert headers["apns-topic"] == f"{BUNDLE}.voip"
    assert headers["apns-push-type"] == "voip"
    assert headers["apns-priority"] == "10"
    assert headers["apns-expiration"] == str(int(push.deadline))
    assert headers["apns-id"] == result.apns_id
    assert UUID4.fullmatch(result.apns_id)
    assert headers["authorization"].startswith("bearer ")  # and the server verified its ES256 signature
    assert request.payload == {
        "aps": {},
        "siplite": {
            "v": 1,
            "type": "incoming_call",
            "call_id": "call-1",
            "call_uuid": call_uuid("call-1"),
            "caller_id": "alice",
            "caller_name": "Alice Example",
            "video": True,
            "sent_at": push.sent_at,
            "deadline": push.deadline,
        },
    }


def test_call_uuid_is_the_call_id_when_it_is_a_uuid_else_stable_per_call_id() -> None:
    assert call_uuid("6F9619FF-8B86-D011-B42D-00C04FC964FF") == "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    derived = call_uuid("call-1")
    assert UUID(derived).version == 5
    assert derived == call_uuid("call-1") != call_uuid("call-2")


async def test_caller_name_omitted_when_unknown_and_apns_id_fresh_per_push(
    server: ApnsServer, apns_provider: ApnsProvider
) -> None:
    first = await apns_provider.send_incoming_call(incoming(tok("a"), caller_name=None))
    second = await apns_provider.send_incoming_call(incoming(tok("a"), caller_name=None))

    assert "caller_name" not in server.requests[0].payload["siplite"]
    assert first.apns_id != second.apns_id
    assert [r.headers["apns-id"] for r in server.requests] == [first.apns_id, second.apns_id]


async def test_missed_call_alert_uses_plain_topic_and_alert_type(
    server: ApnsServer, apns_provider: ApnsProvider
) -> None:
    alert = MissedCallAlert(
        token=tok("alert"),
        bundle_id=BUNDLE,
        environment=PushEnvironment.PRODUCTION,
        call_id="call-9",
        caller_id="alice",
        caller_name="Alice",
        at=1_700_000_000.5,
    )
    before = time.time()
    result = await apns_provider.send_missed_call(alert)

    assert result.outcome is Outcome.DELIVERED
    [request] = server.requests
    assert request.headers["apns-topic"] == BUNDLE
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-collapse-id"] == "call-9"
    assert int(before + 86400) - 1 <= int(request.headers["apns-expiration"]) <= int(time.time() + 86400)
    assert request.payload == {
        "aps": {"alert": {"title": "Alice", "body": "Missed call"}, "sound": "default"},
        "siplite": {
            "v": 1,
            "type": "missed_call",
            "call_id": "call-9",
            "caller_id": "alice",
            "caller_name": "Alice",
            "at": 1_700_000_000.5,
        },
    }


@pytest.mark.parametrize("name", ["A" * 20_000, "é" * 6_000, "📞" * 3_000])
async def test_huge_caller_name_is_cut_to_fit(server: ApnsServer, apns_provider: ApnsProvider, name: str) -> None:
    result = await apns_provider.send_incoming_call(incoming(tok("a"), caller_name=name))

    assert result.outcome is Outcome.DELIVERED
    [request] = server.requests
    sent = request.payload["siplite"]["caller_name"]
    assert sent.endswith("…") and name.startswith(sent[:-1])
    size = len(incoming_call_payload(incoming(tok("a"), caller_name=name)) or b"")
    assert MAX_PAYLOAD_BYTES - 8 <= size <= MAX_PAYLOAD_BYTES


async def test_payload_too_large_even_without_name_is_permanent(
    server: ApnsServer, apns_provider: ApnsProvider
) -> None:
    result = await apns_provider.send_incoming_call(incoming(tok("a"), call_id="c" * 6000))

    assert (result.outcome, result.reason, result.attempts) == (Outcome.PERMANENT, "payload_too_large", 0)
    assert server.requests == []


async def test_malformed_token_is_rejected_without_a_request(
    server: ApnsServer, apns_provider: ApnsProvider
) -> None:
    result = await apns_provider.send_incoming_call(incoming("not-a-token/../x"))

    assert (result.outcome, result.reason) == (Outcome.TOKEN_REJECTED, "BadDeviceToken")
    assert server.requests == []


async def test_push_past_its_deadline_is_not_sent(server: ApnsServer, apns_provider: ApnsProvider) -> None:
    result = await apns_provider.send_incoming_call(incoming(tok("a"), ttl=-1))

    assert (result.outcome, result.reason, result.attempts) == (Outcome.TEMPORARY, "deadline", 0)
    assert server.requests == []


async def test_sandbox_and_production_go_to_their_own_endpoints(server: ApnsServer, apns_pki: ApnsPki) -> None:
    sandbox = ApnsServer(apns_pki)
    await sandbox.start()
    provider = await started(server.config(sandbox_port=sandbox.port))
    try:
        await provider.send_incoming_call(incoming(tok("s"), environment=PushEnvironment.SANDBOX))
        await provider.send_incoming_call(incoming(tok("p"), environment=PushEnvironment.PRODUCTION))
        await provider.send_incoming_call(incoming(tok("s2"), environment=PushEnvironment.SANDBOX))
    finally:
        await provider.close()
        await sandbox.close()

    assert [r.token for r in sandbox.requests] == [tok("s"), tok("s2")]
    assert [r.token for r in server.requests] == [tok("p")]
    assert (sandbox.connections_made, server.connections_made) == (1, 1)
    assert sandbox.errors == []


async def test_certificate_auth(server: ApnsServer, apns_pki: ApnsPki) -> None:
    provider = await started(
        server.config(key_file=None, key_id=None, team_id=None, cert_file=apns_pki.client_pem)
    )
    try:
        result = await provider.send_incoming_call(incoming(tok("a")))
    finally:
        await provider.close()

    assert result.outcome is Outcome.DELIVERED
    assert "authorization" not in server.requests[0].headers


# --- classification ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "outcome"),
    [
        (200, None, Outcome.DELIVERED),
        (410, "Unregistered", Outcome.TOKEN_REJECTED),
        (410, "ExpiredToken", Outcome.TOKEN_REJECTED),
        (400, "BadDeviceToken", Outcome.TOKEN_REJECTED),
        (400, "DeviceTokenNotForTopic", Outcome.TOKEN_REJECTED),
        (400, "TopicDisallowed", Outcome.TOKEN_REJECTED),
        (400, "BadTopic", Outcome.PERMANENT),
        (400, "BadExpirationDate", Outcome.PERMANENT),
        (403, "InvalidProviderToken", Outcome.PERMANENT),
        (403, "ExpiredProviderToken", Outcome.PERMANENT),
        (403, "MissingProviderToken", Outcome.PERMANENT),
        (404, "BadPath", Outcome.PERMANENT),
        (405, "MethodNotAllowed", Outcome.PERMANENT),
        (413, "PayloadTooLarge", Outcome.PERMANENT),
        (418, None, Outcome.PERMANENT),
        (429, "TooManyRequests", Outcome.TEMPORARY),
        (500, "InternalServerError", Outcome.TEMPORARY),
        (502, None, Outcome.TEMPORARY),
        (503, "ServiceUnavailable", Outcome.TEMPORARY),
        (503, "Shutdown", Outcome.TEMPORARY),
    ],
)
def test_classification_table(status: int, reason: str | None, outcome: Outcome) -> None:
    assert classify(status, reason) is outcome


async def test_unregistered_gives_token_invalid_since(server: ApnsServer, apns_provider: ApnsProvider) -> None:
    token = tok("gone")
    server.script(token, Answer(410, "Unregistered", timestamp_ms=1_700_000_000_123))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.status, result.reason) == (Outcome.TOKEN_REJECTED, 410, "Unregistered")
    assert result.token_invalid_since == pytest.approx(1_700_000_000.123)
    assert len(server.requests) == 1


@pytest.mark.parametrize("reason", ["BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"])
async def test_bad_token_answers_reject_the_token(
    server: ApnsServer, apns_provider: ApnsProvider, reason: str
) -> None:
    token = tok(reason)
    server.script(token, Answer(400, reason))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.status, result.reason) == (Outcome.TOKEN_REJECTED, 400, reason)
    assert result.token_invalid_since is None
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("status", "reason"), [(403, "InvalidProviderToken"), (403, "ExpiredProviderToken"), (400, "BadTopic")]
)
async def test_permanent_answers_are_not_retried(
    server: ApnsServer, apns_provider: ApnsProvider, status: int, reason: str
) -> None:
    token = tok(reason)
    server.script(token, Answer(status, reason))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.PERMANENT,
        status,
        reason,
        1,
    )
    assert len(server.requests) == 1


# --- retries ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"), [(429, "TooManyRequests"), (500, "InternalServerError"), (503, "ServiceUnavailable")]
)
async def test_temporary_answer_is_retried_with_the_same_apns_id(
    server: ApnsServer, apns_provider: ApnsProvider, status: int, reason: str
) -> None:
    token = tok("busy")
    server.script(token, Answer(status, reason), Answer(200))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.status, result.attempts) == (Outcome.DELIVERED, 200, 2)
    assert [r.headers["apns-id"] for r in server.requests] == [result.apns_id] * 2
    assert [r.answer.status for r in server.requests] == [status, 200]  # the device got exactly one push


@pytest.mark.parametrize("answer", [Answer(refuse=True), Answer(goaway=True)], ids=["refused", "goaway"])
async def test_request_the_server_did_not_process_is_retried(
    server: ApnsServer, apns_provider: ApnsProvider, answer: Answer
) -> None:
    token = tok("refused")
    server.script(token, answer, Answer(200))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.attempts) == (Outcome.DELIVERED, 2)
    assert [r.headers["apns-id"] for r in server.requests] == [result.apns_id] * 2


async def test_retries_stop_after_max_attempts(server: ApnsServer, apns_provider: ApnsProvider) -> None:
    token = tok("down")
    server.script(token, Answer(500, "InternalServerError"))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.status, result.reason) == (Outcome.TEMPORARY, 500, "InternalServerError")
    assert result.attempts == 3 == len(server.requests)


async def test_retries_never_run_past_the_deadline(server: ApnsServer) -> None:
    provider = await started(server.config(max_attempts=1000, retry_backoff=0.02))
    token = tok("down")
    server.script(token, Answer(500, "InternalServerError"))
    push = incoming(token, ttl=0.4)
    try:
        result = await provider.send_incoming_call(push)
    finally:
        await provider.close()

    assert (result.outcome, result.status) == (Outcome.TEMPORARY, 500)
    assert time.time() <= push.deadline + 0.1
    assert 2 <= result.attempts == len(server.requests) < 20  # exponential backoff: few attempts in 0.4 s
    assert all(r.received_at <= push.deadline for r in server.requests)


async def test_unreachable_endpoint_fails_promptly_after_retrying(server: ApnsServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    provider = await started(server.config(production_port=closed_port))
    started_at = time.monotonic()
    try:
        result = await provider.send_incoming_call(incoming(tok("a")))
    finally:
        await provider.close()

    assert (result.outcome, result.status, result.reason) == (Outcome.TEMPORARY, None, "connection")
    assert result.attempts == 3  # nothing was sent, so retrying was safe
    assert time.monotonic() - started_at < 1.0


# --- ambiguous failures: never retried --------------------------------------------------------------------------


async def test_hanging_server_times_out_without_retry(server: ApnsServer) -> None:
    provider = await started(server.config(request_timeout=0.2))
    token = tok("hang")
    server.script(token, Answer(hang=True))
    started_at = time.monotonic()
    try:
        result = await provider.send_incoming_call(incoming(token))
        await server.wait_until(lambda: server.resets == 1)  # the given-up stream was cancelled
    finally:
        await provider.close()

    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.TEMPORARY,
        None,
        "timeout",
        1,
    )
    assert 0.2 <= time.monotonic() - started_at < 1.0
    assert len(server.requests) == 1


async def test_deadline_bounds_the_timeout(server: ApnsServer, apns_provider: ApnsProvider) -> None:
    token = tok("hang")
    server.script(token, Answer(hang=True))
    started_at = time.monotonic()

    result = await apns_provider.send_incoming_call(incoming(token, ttl=0.2))  # request_timeout is 2 s

    assert (result.outcome, result.reason) == (Outcome.TEMPORARY, "timeout")
    assert time.monotonic() - started_at < 1.0
    assert len(server.requests) == 1


async def test_connection_dropped_after_sending_is_not_retried(
    server: ApnsServer, apns_provider: ApnsProvider
) -> None:
    token = tok("drop")
    server.script(token, Answer(drop=True), Answer(200))

    result = await apns_provider.send_incoming_call(incoming(token))

    assert (result.outcome, result.status, result.reason, result.attempts) == (
        Outcome.TEMPORARY,
        None,
        "connection",
        1,
    )
    assert len(server.requests) == 1
    # The next push opens a new connection and goes through.
    assert (await apns_provider.send_incoming_call(incoming(tok("b")))).outcome is Outcome.DELIVERED
    assert server.connections_made == 2


# --- aioapns defects --------------------------------------------------------------------------------------------


async def test_b_connection_loss_after_a_timeout_releases_every_waiter(server: ApnsServer) -> None:
    """aioapns: a cancelled request made connection_lost raise half-way, leaving later waiters hanging."""
    provider = await started(server.config(request_timeout=10.0))
    long, short = tok("long"), tok("short")
    server.script(long, Answer(hang=True))
    server.script(short, Answer(hang=True))
    try:
        # The request that times out goes first on the connection: aioapns failed waiters in that order.
        timing_out = asyncio.create_task(provider.send_incoming_call(incoming(short, ttl=0.2)))
        await server.wait_until(lambda: len(server.requests) == 1)
        waiting = asyncio.create_task(provider.send_incoming_call(incoming(long, ttl=10)))
        await server.wait_until(lambda: len(server.requests) == 2)
        assert (await timing_out).reason == "timeout"
        assert server.connections_made == 1  # both requests shared the connection

        server.drop_connections()
        result = await asyncio.wait_for(waiting, 2.0)  # promptly, not after its 10 s timeout
    finally:
        await provider.close()

    assert (result.outcome, result.reason, result.attempts) == (Outcome.TEMPORARY, "connection", 1)
    assert len(server.requests_for(long)) == 1


async def test_c_error_bodies_beyond_the_flow_control_window_do_not_stall(server: ApnsServer) -> None:
    """aioapns never acknowledged received DATA: ~64 KiB of error bodies stalled the connection for good."""
    provider = await started(server.config(max_connections=1, max_in_flight=5000, request_timeout=5.0))
    bad = tok("bad")
    server.script(bad, Answer(400, "BadDeviceToken", pad=400))
    try:
        results = await asyncio.gather(*(provider.send_incoming_call(incoming(bad)) for _ in range(500)))
        after = await provider.send_incoming_call(incoming(tok("good")))
    finally:
        await provider.close()

    assert {r.outcome for r in results} == {Outcome.TOKEN_REJECTED}
    body_bytes = sum(len('{"reason": "BadDeviceToken"}') + r.answer.pad for r in server.requests_for(bad))
    assert body_bytes > 3 * 65_535
    assert after.outcome is Outcome.DELIVERED
    assert server.connections_made == 1


def _apns_settings(server: ApnsServer, apns_pki: ApnsPki, key_file: str) -> Settings:
    """The settings an operator writes for token auth against `server`."""
    return make_settings(
        apns_key_file=key_file,
        apns_key_id=apns_pki.key_id,
        apns_team_id=apns_pki.team_id,
        apns_production_host=server.host,
        apns_sandbox_host=server.host,
        apns_port=server.port,
        apns_ca_file=str(apns_pki.ca_file),
        apns_keepalive=0,
    )


async def test_e_the_key_file_setting_is_a_path_whose_pem_text_signs_every_request(
    server: ApnsServer, apns_pki: ApnsPki, tmp_path: Path
) -> None:
    """aioapns takes `key` as the PEM text, not a path: the .p8 path the operator configures is read at start,
    and its text (never the path) goes to aioapns, so the file may even be gone by the first push."""
    key_file = tmp_path / f"AuthKey_{apns_pki.key_id}.p8"
    key_file.write_bytes(apns_pki.signing_key.read_bytes())
    provider = build_push(_apns_settings(server, apns_pki, str(key_file)), SystemClock())
    await provider.start()
    key_file.unlink()
    try:
        result = await provider.send_incoming_call(incoming(tok("e")))
    finally:
        await provider.close()

    assert (result.outcome, result.status) == (Outcome.DELIVERED, 200)
    # Signed with that key: the server verified the ES256 token (a bad one is answered 403 and kept in `errors`).
    [request] = server.requests
    assert request.headers["authorization"].startswith("bearer ") and request.error is None


@pytest.mark.parametrize("wrong", ["missing", "pem_text"])
async def test_e_a_key_file_setting_that_is_no_readable_path_fails_at_start_naming_it(
    apns_server: ApnsServer, apns_pki: ApnsPki, tmp_path: Path, wrong: str
) -> None:
    """A wrong path fails at start with the setting's name; so does the key's PEM text put where the path
    belongs (what aioapns itself would want), and the key never appears in the message."""
    pem = apns_pki.signing_key.read_text()
    value = str(tmp_path / "AuthKey_MISSING.p8") if wrong == "missing" else pem
    provider = build_push(_apns_settings(apns_server, apns_pki, value), SystemClock())

    with pytest.raises(PushConfigError) as caught:
        await provider.start()

    assert caught.value.setting == "key_file" and APNS_SETTINGS["key_file"] == "apns_key_file"
    message = str(caught.value)
    if wrong == "missing":
        assert message == f"APNs key_file: cannot read {value}: No such file or directory"
    else:
        assert message.startswith("APNs key_file: holds PEM text, not a path")
        assert "BEGIN" not in message and pem.splitlines()[1] not in message


async def test_f_keep_warm_pings_hold_the_connection_open(server: ApnsServer) -> None:
    """aioapns closes a connection idle for 10 s; keep-warm PINGs hold it, so a rare call skips the handshake."""
    provider = await started(server.config(keepalive_interval=0.02, idle_timeout=0.15))
    try:
        await provider.send_incoming_call(incoming(tok("a")))
        await server.wait_until(lambda: server.pings >= 15)  # >= 0.3 s: twice the idle timeout
        result = await provider.send_incoming_call(incoming(tok("b")))
    finally:
        await provider.close()

    assert result.outcome is Outcome.DELIVERED
    assert server.connections_made == 1
    assert [r.connection for r in server.requests] == [1, 1]


async def test_f_without_keep_warm_the_idle_connection_closes(server: ApnsServer) -> None:
    """The control for the test above: same idle timeout, no PINGs, so the second call pays a new handshake."""
    provider = await started(server.config(keepalive_interval=None, idle_timeout=0.15))
    try:
        await provider.send_incoming_call(incoming(tok("a")))
        await server.wait_until(lambda: server.connections_lost == 1)
        await provider.send_incoming_call(incoming(tok("b")))
    finally:
        await provider.close()

    assert server.connections_made == 2
    assert server.pings == 0


async def test_f_keep_warm_reconnects_a_lost_connection(server: ApnsServer) -> None:
    provider = await started(server.config(keepalive_interval=0.02))
    try:
        await provider.send_incoming_call(incoming(tok("a")))
        server.drop_connections()
        await server.wait_until(lambda: server.connections_made == 2)  # reconnected before any push needs it
        result = await provider.send_incoming_call(incoming(tok("b")))
    finally:
        await provider.close()

    assert result.outcome is Outcome.DELIVERED
    assert server.connections_made == 2
    assert server.requests[-1].connection == 2


async def test_f_keep_warm_replaces_a_dead_connection(server: ApnsServer) -> None:
    """A connection whose PING goes unanswered is aborted and replaced, instead of swallowing the next call."""
    provider = await started(server.config(keepalive_interval=0.02, keepalive_timeout=0.1))
    try:
        await provider.send_incoming_call(incoming(tok("a")))
        server.freeze_connections()
        await server.wait_until(lambda: server.connections_made == 2)
        result = await provider.send_incoming_call(incoming(tok("b")))
    finally:
        await provider.close()

    assert result.outcome is Outcome.DELIVERED
    assert server.requests[-1].connection == 2


async def test_f_preconnect_at_start(server: ApnsServer) -> None:
    provider = await started(server.config(preconnect=(PushEnvironment.PRODUCTION,)))
    try:
        await server.wait_until(lambda: server.connections_made == 1)
        await provider.send_incoming_call(incoming(tok("a")))
    finally:
        await provider.close()

    assert server.connections_made == 1


# --- overload ---------------------------------------------------------------------------------------------------


async def test_in_flight_cap_fails_fast(server: ApnsServer) -> None:
    provider = await started(server.config(max_in_flight=2, request_timeout=0.3))
    token = tok("hang")
    server.script(token, Answer(hang=True))
    try:
        hanging = [asyncio.create_task(provider.send_incoming_call(incoming(token))) for _ in range(2)]
        await server.wait_until(lambda: len(server.requests) == 2)
        overloaded = await provider.send_incoming_call(incoming(tok("other")))
        await asyncio.gather(*hanging)
        after = await provider.send_incoming_call(incoming(tok("other")))
    finally:
        await provider.close()

    assert (overloaded.outcome, overloaded.reason, overloaded.attempts) == (Outcome.TEMPORARY, "overloaded", 0)
    assert after.outcome is Outcome.DELIVERED
    assert len(server.requests) == 3
    assert provider.in_flight == 0


# --- configuration ----------------------------------------------------------------------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"key_file": Path("/nonexistent/AuthKey.p8")}, "key_file"),
        ({"key_file": "directory"}, "key_file"),
        ({"key_file": "garbage"}, "key_file"),
        ({"key_file": "rsa"}, "key_file"),
        ({"key_file": "p384"}, "key_file"),
        ({"key_id": None}, "key_id"),
        ({"key_id": " "}, "key_id"),
        ({"team_id": ""}, "team_id"),
        ({"key_file": None}, "key_file"),
        ({"key_file": None, "cert_file": "garbage"}, "cert_file"),
        ({"cert_file": "garbage"}, "cert_file"),
        ({"ca_file": Path("/nonexistent/ca.pem")}, "ca_file"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"max_in_flight": 0}, "max_in_flight"),
    ],
)
async def test_bad_configuration_fails_at_start(
    apns_config: ApnsConfig, tmp_path: Path, change: dict[str, object], setting: str
) -> None:
    (tmp_path / "garbage.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    files = {
        "directory": lambda: tmp_path,
        "garbage": lambda: tmp_path / "garbage.pem",
        "rsa": lambda: _write_key(tmp_path / "rsa.p8", rsa.generate_private_key(65537, 2048)),
        "p384": lambda: _write_key(tmp_path / "p384.p8", ec.generate_private_key(ec.SECP384R1())),
    }
    resolved = {k: files[v]() if isinstance(v, str) and v in files else v for k, v in change.items()}
    provider = ApnsProvider(replace(apns_config, **resolved))  # type: ignore[arg-type]

    with pytest.raises(PushConfigError) as caught:
        await provider.start()

    assert caught.value.setting == setting
    assert setting in str(caught.value)


async def test_d_a_provider_built_outside_any_event_loop_works_inside_one(server: ApnsServer) -> None:
    # aioapns binds its pool to the loop running when a client is made; the provider makes its clients lazily.
    provider = await asyncio.to_thread(ApnsProvider, server.config())
    await provider.start()
    try:
        result = await provider.send_incoming_call(incoming(tok("outside")))
    finally:
        await provider.close()
    assert result.outcome is Outcome.DELIVERED
