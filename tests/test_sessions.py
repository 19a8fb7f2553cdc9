"""Connections end to end: authentication, impersonation, registration lifetime, and every class of bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgpack
import pytest

from signaling.client import CallFailed, Client, ClientError
from signaling.clock import ManualClock
from signaling.models import CallRecord
from signaling.store import MemoryStore
from signaling.store.base import CallOpened, Presence
from tests.harness import ANSWER, OFFER, PUSH, Harness, make_settings, running

# ---------------------------------------------------------------------------------------------- identity


async def test_register_binds_the_authenticated_user(sip: Harness) -> None:
    phone = await sip.connect()
    response = await phone.register(sip.token("alice"), "alice-phone", push=PUSH)
    assert (response["code"], response["user"], response["device_id"]) == (200, "alice", "alice-phone")
    assert response["expires"] == int(sip.settings.presence_ttl)
    presence = await sip.board.store.presence("alice")
    assert [(b.device_id, b.node_id) for b in presence.bindings] == [("alice-phone", "node-a")]
    assert presence.devices[0].push is not None
    assert presence.devices[0].push.voip_token == PUSH["voip_token"]


@pytest.mark.parametrize(
    ("make_token", "detail"),
    [
        (lambda sip: sip.token("alice", key="another-secret-of-sufficient-length!!"), "signature"),
        (lambda sip: sip.token("alice", ttl=-120), "expired"),
        (lambda sip: "not.a.jwt", "malformed"),
    ],
    ids=["forged", "expired", "garbage"],
)
async def test_bad_tokens_get_401_and_the_socket_closed(sip: Harness, make_token: object, detail: str) -> None:
    client = await sip.connect()
    with pytest.raises(ClientError) as refused:
        await client.register(make_token(sip), "phone")  # type: ignore[operator]
    assert (refused.value.code, refused.value.error) == (401, "auth_failed")
    assert detail in refused.value.response["detail"]
    assert (await client.wait_closed()).code == 4401
    assert (await sip.board.store.presence("alice")).bindings == ()


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({}, "token missing"),
        ({"token": None}, "token missing"),
        ({"token": ""}, "token missing"),
        ({"token": "   "}, "token missing"),
        ({"token": 12345}, "token must be a string"),
        ({"token": {"sub": "alice"}}, "token must be a string"),
        ({"token": "e" * 8193}, "token longer than 8192 characters"),
    ],
    ids=["absent", "null", "empty", "blank", "integer", "map", "oversized"],
)
async def test_missing_token_is_refused(sip: Harness, fields: dict[str, Any], detail: str) -> None:
    """No token is treated as a forged one: 401, then close 4401, and nothing registered."""
    client = await sip.connect()
    with pytest.raises(ClientError) as refused:
        await client.request("register", device_id="alice-phone", **fields)
    response = refused.value.response
    assert (response["code"], response["error"], response["method"], response["detail"]) == (
        401,
        "auth_failed",
        "register",
        detail,
    )
    assert (await client.wait_closed()).code == 4401
    assert (await sip.board.store.presence("alice")).bindings == ()


async def test_a_renewal_without_a_token_closes_the_registered_connection(sip: Harness) -> None:
    alice = await sip.device("alice")
    with pytest.raises(ClientError) as refused:
        await alice.request("register", device_id="alice-phone")
    assert (refused.value.code, refused.value.error) == (401, "auth_failed")
    assert (await alice.wait_closed()).code == 4401


async def test_a_connection_cannot_switch_user(sip: Harness) -> None:
    mallory = await sip.device("mallory")
    with pytest.raises(ClientError) as refused:
        await mallory.register(sip.token("bob"), "bob-phone")
    assert refused.value.code == 403
    assert (await sip.board.store.presence("bob")).bindings == ()


async def test_identity_claims_in_frames_are_ignored(sip: Harness) -> None:
    mallory = await sip.device("mallory")
    bob = await sip.device("bob")
    claims: dict[str, object] = {"from": "alice", "from_name": "Alice"}
    await mallory.send({"type": "invite", "seq": 100, "call_id": "c-imp", "to": "bob", "sdp": OFFER, **claims})
    incoming = await bob.incoming()
    assert (incoming.caller, incoming.caller_name) == ("mallory", None)


async def test_a_stranger_cannot_touch_someone_elses_call(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    carol = await sip.device("carol")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("cancel", {}),
        ("bye", {}),
        ("ack", {}),
        ("update", {"sdp": OFFER}),
        ("ice", {"candidate": "candidate:1 1 udp 1 192.0.2.66 1 typ host"}),
    ]
    for kind, fields in cases:
        with pytest.raises(ClientError) as refused:
            await carol.request(kind, call_id=call.call_id, **fields)
        assert refused.value.code == 481, kind
    # Carol answering bob's INVITE in his place is refused too, and said so.
    await carol.send(
        {"type": "response", "seq": 1, "method": "invite", "call_id": call.call_id, "code": 200, "sdp": ANSWER}
    )
    notice = await carol.next_event("error")
    assert (notice["code"], notice["error"], notice["call_id"]) == (481, "no_such_call", call.call_id)
    # The callee cannot CANCEL or ACK the caller's INVITE either.
    with pytest.raises(ClientError) as refused:
        await bob.request("cancel", call_id=call.call_id)
    assert refused.value.code == 481
    # The call went on untouched.
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER


async def test_reregistering_a_device_replaces_the_old_connection_and_keeps_its_call(sip: Harness) -> None:
    alice = await sip.device("alice")
    old = await sip.device("bob", "bob-phone")
    call = await alice.invite("bob", OFFER)
    await old.incoming()
    new = await sip.device("bob", "bob-phone")
    closed = await old.wait_closed()
    assert closed.code == 4409
    presence = await sip.board.store.presence("bob")
    assert len(presence.bindings) == 1
    # The ringing call moved to the new connection (a phone that changed networks keeps ringing).
    incoming = await new.incoming()
    assert incoming.call_id == call.call_id
    await incoming.answer(ANSWER)
    assert (await call.answered())["code"] == 200
    # Registering again on the same connection does not offer the call a second time.
    await new.register(sip.token("bob"), "bob-phone")
    await call.ack()
    assert (await new.next_event("ack"))["call_id"] == call.call_id
    assert new.pending_events() == []


async def test_token_renewal_on_the_same_connection(sip: Harness) -> None:
    bob = await sip.connect()
    await bob.register(sip.token("bob", ttl=100), "bob-phone")
    sip.clock.advance(60)
    await bob.register(sip.token("bob", ttl=3600), "bob-phone")
    for _ in range(10):  # well past the first token's expiry (100 s + leeway)
        sip.clock.advance(20)
        assert (await bob.keepalive())["code"] == 200


async def test_token_renewal_without_push_keeps_the_push_binding(sip: Harness) -> None:
    bob = await sip.connect()
    await bob.register(sip.token("bob"), "bob-phone", push=PUSH)
    await bob.register(sip.token("bob"), "bob-phone")
    [device] = (await sip.board.store.presence("bob")).devices
    assert device.push is not None and device.push.voip_token == PUSH["voip_token"]


async def test_expired_token_closes_the_connection(sip: Harness) -> None:
    bob = await sip.connect()
    await bob.register(sip.token("bob", ttl=20), "bob-phone")
    sip.clock.advance(20 + sip.settings.jwt_leeway)
    assert (await bob.wait_closed()).code == 4401


# ---------------------------------------------------------------------------------------------- lifetime


async def test_clean_disconnect_removes_the_binding_at_once(sip: Harness) -> None:
    bob = await sip.device("bob")
    server_side = sip.board.bound[("bob", "bob-phone")]
    await bob.close()
    async with asyncio.timeout(5):
        await server_side.finished.wait()
    presence: Presence = await sip.board.store.presence("bob")
    assert presence.bindings == ()
    assert [d.device_id for d in presence.devices] == ["bob-phone"]


async def test_no_register_in_time_closes_4408(sip: Harness) -> None:
    client = await sip.connect()
    await client.send({"type": "keepalive", "seq": 1})
    await client.next_event()
    sip.clock.advance(sip.settings.register_timeout)
    assert (await client.wait_closed()).code == 4408


async def test_silent_device_is_dropped_and_keepalives_keep_it(sip: Harness) -> None:
    quiet = await sip.device("bob", "bob-quiet")
    chatty = await sip.device("bob", "bob-chatty")
    step = sip.settings.presence_ttl / 3
    for _ in range(4):
        await chatty.keepalive()
        sip.clock.advance(step)
    assert (await quiet.wait_closed()).code == 4408
    await chatty.keepalive()
    presence = await sip.board.store.presence("bob")
    assert [b.device_id for b in presence.bindings] == ["bob-chatty"]


async def test_bindings_are_refreshed_while_connected(sip: Harness) -> None:
    bob = await sip.device("bob")
    for _ in range(9):
        await bob.keepalive()
        sip.clock.advance(sip.settings.presence_ttl / 3)
        assert sip.board.last_sweep is not None
        await sip.board.last_sweep  # the sweep the clock just set off, store refresh included
    assert [b.device_id for b in (await sip.board.store.presence("bob")).bindings] == ["bob-phone"]


# ---------------------------------------------------------------------------------------------- bad input


async def test_undecodable_frames_get_an_error_and_the_connection_stays(sip: Harness) -> None:
    client = await sip.connect()
    await client.send_raw(b"\xc1\xff")
    notice = await client.next_event("error")
    assert (notice["code"], notice["error"]) == (400, "malformed")
    await client.send_raw("{nope")
    assert (await client.next_event("error"))["error"] == "malformed"
    await client.send_raw(msgpack.packb("a string"))
    assert (await client.next_event("error"))["error"] == "malformed"
    assert (await client.register(sip.token("alice"), "phone"))["code"] == 200


@pytest.mark.parametrize(
    ("kind", "fields", "code", "error", "field"),
    [
        ("teleport", {}, 400, "unknown_type", None),
        ("keepalive", {"v": 9}, 400, "unsupported_version", None),
        ("invite", {"call_id": "c", "to": "bob"}, 400, "missing_field", "sdp"),
        ("invite", {"call_id": 5, "to": "bob", "sdp": "x"}, 400, "invalid_field", "call_id"),
        ("invite", {"call_id": "c", "to": "bob", "sdp": "x", "video": "yes"}, 400, "invalid_field", "video"),
        ("bye", {"call_id": "nope"}, 481, "no_such_call", None),
        ("update", {"call_id": "nope", "sdp": "x"}, 481, "no_such_call", None),
    ],
)
async def test_bad_requests_get_their_documented_error_and_the_connection_stays(
    sip: Harness, kind: str, fields: dict[str, Any], code: int, error: str, field: str | None
) -> None:
    client = await sip.device("alice")
    with pytest.raises(ClientError) as refused:
        await client.request(kind, **fields)
    response = refused.value.response
    assert (response["code"], response["error"], response.get("field")) == (code, error, field)
    assert response["seq"] == 2  # it answers the request that was refused
    assert (await client.keepalive())["code"] == 200


async def test_stale_and_duplicate_seq_get_400(sip: Harness) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sip.url, protocols=("siplite.v1.json",)) as ws,
    ):
        await ws.send_str(json.dumps({"type": "register", "seq": 5, "token": sip.token("a"), "device_id": "p"}))
        assert json.loads(await ws.receive_str())["code"] == 200
        for seq in (5, 4):
            await ws.send_str(json.dumps({"type": "keepalive", "seq": seq}))
            reply = json.loads(await ws.receive_str())
            assert (reply["seq"], reply["code"], reply["error"]) == (seq, 400, "stale_seq")
        await ws.send_str(json.dumps({"type": "keepalive", "seq": 6}))
        assert json.loads(await ws.receive_str())["code"] == 200


async def test_requests_before_register_get_403(sip: Harness) -> None:
    client = await sip.connect()
    with pytest.raises(ClientError) as refused:
        await client.request("invite", call_id="c1", to="bob", sdp=OFFER)
    assert (refused.value.code, refused.value.error) == (403, "not_registered")
    assert (await client.register(sip.token("alice"), "phone"))["code"] == 200


async def test_duplicate_invite_call_id_is_refused_and_the_first_call_survives(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER, call_id="dup-1")
    incoming = await bob.incoming()
    with pytest.raises(ClientError) as refused:
        await (await alice.invite("bob", OFFER, call_id="dup-1")).answered()
    assert (refused.value.code, refused.value.error) == (400, "call_id_in_use")
    await incoming.answer(ANSWER)
    assert (await call.answered())["code"] == 200


async def test_duplicate_bye_gets_481(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    await call.hangup()
    with pytest.raises(ClientError) as refused:
        await call.hangup()
    assert refused.value.code == 481


async def refused(client: Client, kind: str, **fields: Any) -> tuple[int, str | None]:
    """Send a request that must be refused; its (code, error id)."""
    with pytest.raises(ClientError) as refusal:
        await client.request(kind, **fields)
    return refusal.value.code, refusal.value.error


async def test_out_of_order_requests_in_a_live_call_are_refused_and_the_call_goes_on(sip: Harness) -> None:
    carol, dave = await sip.device("carol"), await sip.device("dave")
    other = await carol.invite("dave", OFFER)
    await (await dave.incoming()).answer(ANSWER)
    await other.answered()
    await other.ack()

    alice, bob = await sip.device("alice"), await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    call_id = call.call_id
    assert await refused(alice, "ack", call_id=call_id) == (481, "invalid_state")  # ACK before the 200
    assert await refused(bob, "bye", call_id=call_id) == (
        481,
        "invalid_state",
    )  # a ringing device declines instead
    await incoming.answer(ANSWER)
    assert (await call.answered())["sdp"] == ANSWER
    assert await refused(alice, "cancel", call_id=call_id) == (481, "invalid_state")  # CANCEL after the answer
    assert await refused(alice, "update", call_id=call_id, sdp=OFFER) == (481, "invalid_state")  # before the ACK
    await call.ack()
    assert (await bob.next_event("ack"))["call_id"] == call_id
    assert await refused(alice, "ack", call_id=call_id) == (481, "invalid_state")  # ACK twice
    assert bob.pending_events() == []  # none of it reached bob

    # An UPDATE while another is pending, from either side: 491, and the first one completes.
    first = asyncio.create_task(call.update(OFFER + "a=sendonly\r\n"))
    update = await bob.next_event("update")
    assert await refused(bob, "update", call_id=call_id, sdp=ANSWER) == (491, "request_pending")
    assert await refused(alice, "update", call_id=call_id, sdp=OFFER) == (491, "request_pending")
    await incoming.answer_update(update, 200, ANSWER + "a=recvonly\r\n")
    assert (await first)["sdp"].endswith("a=recvonly\r\n")

    assert (await call.hangup())["code"] == 200
    assert (await bob.next_event("bye"))["reason"] == "remote_hangup"
    assert await refused(alice, "bye", call_id=call_id) == (481, "no_such_call")  # BYE twice
    assert await refused(bob, "bye", call_id=call_id) == (481, "no_such_call")

    # Both connections stayed open, and the other call was not disturbed.
    assert [(await c.keepalive())["code"] for c in (alice, bob)] == [200, 200]
    assert not alice.closed and not bob.closed
    assert (await other.ice("candidate:5 1 udp 1 192.0.2.5 5 typ host"))["code"] == 200
    assert (await dave.next_event("ice"))["candidate"].startswith("candidate:5 ")


async def test_an_answer_to_an_update_that_crossed_the_end_of_the_call_is_taken_quietly(sip: Harness) -> None:
    alice, bob = await sip.device("alice"), await sip.device("bob")
    # While ringing: the caller replaces its offer, then gives up before the phone has taken it.
    ringing = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    assert (await ringing.update(OFFER + "a=sendonly\r\n"))["code"] == 200
    update = await bob.next_event("update")
    await ringing.cancel()
    assert (await bob.next_event("cancel"))["reason"] == "caller_cancelled"
    await incoming.answer_update(update, 100)
    # Established: the caller hangs up while its UPDATE waits for bob's answer.
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()
    pending = asyncio.create_task(call.update(OFFER + "a=sendonly\r\n"))
    update = await bob.next_event("update")
    await call.hangup()
    with pytest.raises(ClientError) as ended:
        await pending
    assert ended.value.code == 487
    assert (await bob.next_event("bye"))["reason"] == "remote_hangup"
    await incoming.answer_update(update, 200, ANSWER)
    # Neither late answer was refused: no error frame, and the connection is fine.
    assert (await bob.keepalive())["code"] == 200
    assert [f for f in bob.pending_events() if f["type"] == "error"] == []


async def test_more_outgoing_calls_than_allowed_get_403_limit_exceeded(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    limit = sip.settings.max_calls_per_connection
    calls = [await alice.invite("bob", OFFER) for _ in range(limit)]
    assert [c.responses[0]["code"] for c in calls] == [100] * limit
    with pytest.raises(ClientError) as refusal:
        await (await alice.invite("bob", OFFER, call_id="one-too-many")).answered()
    response = refusal.value.response
    assert (response["code"], response["error"], response["call_id"]) == (403, "limit_exceeded", "one-too-many")
    assert [(await bob.incoming()).call_id for _ in range(limit)] == [c.call_id for c in calls]
    # One call ends: there is room again, on the same connection.
    assert (await calls[0].cancel())["code"] == 200
    again = await alice.invite("bob", OFFER)
    assert again.responses[0]["code"] == 100
    assert (await bob.incoming()).call_id == again.call_id


class FailingStore(MemoryStore):
    """A real in-memory store that fails unexpectedly (as a bug would) when a call to "broken" is opened."""

    async def open_call(self, record: CallRecord, ttl: float) -> CallOpened:
        if record.callee_user == "broken":
            raise RuntimeError("simulated fault in the store")
        return await super().open_call(record, ttl)


async def test_a_server_fault_gets_500_internal_and_disturbs_nothing_else(manual_clock: ManualClock) -> None:
    async with running(make_settings(), FailingStore(manual_clock), manual_clock) as sip:
        alice, bob = await sip.device("alice"), await sip.device("bob")
        await sip.device("broken")
        failed = await alice.invite("broken", OFFER)
        assert failed.responses[0]["code"] == 100
        with pytest.raises(ClientError) as fault:
            await failed.answered()
        response = fault.value.response
        assert (response["code"], response["error"], response["call_id"]) == (500, "internal", failed.call_id)
        assert response["reason"] == "Server Internal Error"
        assert failed.call_id not in sip.board.calls
        # The connection stays open and the next call from it goes through.
        call = await alice.invite("bob", OFFER)
        await (await bob.incoming()).answer(ANSWER)
        assert (await call.answered())["code"] == 200


async def test_oversized_frame_closes_1009(sip: Harness) -> None:
    client = await sip.device("alice")
    await client.start_request("invite", call_id="big", to="bob", sdp="a" * sip.settings.max_frame_bytes)
    assert (await client.wait_closed()).code == 1009


async def test_a_client_that_keeps_sending_garbage_is_disconnected_and_others_are_not(sip: Harness) -> None:
    alice = await sip.device("alice")
    bob = await sip.device("bob")
    call = await alice.invite("bob", OFFER)
    incoming = await bob.incoming()
    await incoming.answer(ANSWER)
    await call.answered()
    await call.ack()

    vandal = await sip.device("vandal")
    for _ in range(sip.settings.max_consecutive_errors):
        await vandal.send_raw(b"\xc1")
    assert (await vandal.wait_closed()).code == 1008

    assert (await call.hangup())["code"] == 200
    assert (await bob.next_event("bye"))["reason"] == "remote_hangup"


async def test_frame_flood_is_rate_limited(sip: Harness) -> None:
    client = await sip.device("alice")  # the REGISTER took one token of the burst
    burst = sip.settings.rate_burst
    txns = [await client.start_request("keepalive") for _ in range(burst + 2)]
    answers = [await asyncio.wait_for(txn.responses.get(), 5) for txn in txns]
    assert [a["code"] for a in answers].count(200) == burst - 1
    limited = [a for a in answers if a["code"] != 200]
    assert [(a["code"], a["error"]) for a in limited] == [(503, "rate_limited")] * 3
    assert limited[0]["retry_after"] > 0
    sip.clock.advance(1)
    assert (await client.keepalive())["code"] == 200


async def test_unknown_subprotocol_is_refused_at_the_handshake(sip: Harness) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await Client.connect(sip.url, protocols=("siplite.v2.msgpack",))
    assert refused.value.status == 400


async def test_no_subprotocol_means_json(sip: Harness) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(sip.url) as ws:
        await ws.send_str(json.dumps({"type": "keepalive", "seq": 1}))
        reply = json.loads(await ws.receive_str())
        assert (reply["code"], reply["error"]) == (403, "not_registered")


async def test_health_endpoints(sip: Harness) -> None:
    base = sip.url.removesuffix("/ws")
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(base + "/readyz") as resp:
            assert resp.status == 200


async def _stalled_device(url: str, token: str, device_id: str) -> socket.socket:
    """A device that registers over a raw socket with a tiny receive buffer and then never reads again."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no window autotuning
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (parts.hostname, parts.port))
    handshake = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: siplite.v1.msgpack\r\n\r\n"
    )
    await loop.sock_sendall(sock, handshake.encode())
    payload = msgpack.packb({"type": "register", "seq": 1, "token": token, "device_id": device_id})
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 1 << 16
    await loop.sock_sendall(sock, bytes((0x82, 0x80 | 126)) + len(payload).to_bytes(2, "big") + mask + masked)
    received = b""

    def frame() -> bytes:  # the first frame after the handshake, once whole (a short one: 2-byte header)
        body = received.partition(b"\r\n\r\n")[2]
        return body[2 : 2 + body[1]] if len(body) >= 2 and len(body) >= 2 + body[1] else b""

    async with asyncio.timeout(5):
        while not frame():
            received += await loop.sock_recv(sock, 4096)
    assert received.startswith(b"HTTP/1.1 101")
    assert msgpack.unpackb(frame())["code"] == 200
    return sock


async def test_a_client_that_stops_reading_is_dropped_and_stalls_no_one(manual_clock: ManualClock) -> None:
    # A small send buffer, so that a few large INVITEs fill it once the kernel's socket buffers are full.
    async with running(make_settings(max_send_buffer=64 * 1024), MemoryStore(manual_clock), manual_clock) as sip:
        stuck = await _stalled_device(sip.url, sip.token("bob"), "bob-phone")
        with stuck:
            server_side = sip.board.bound[("bob", "bob-phone")]
            big_offer = OFFER + "a=x-padding:" + "p" * 60_000 + "\r\n"
            calls = []
            # Enough INVITEs to fill the kernel's socket buffers (up to tcp_wmem's maximum, 4 MiB here) and then
            # the server's own; bounded, in case the server never gives up on the device.
            for i in range(400):
                if server_side.finished.is_set():
                    break
                caller = await sip.device(f"caller{i}")
                for _ in range(sip.settings.max_calls_per_connection):
                    calls.append(await caller.invite("bob", big_offer))
            async with asyncio.timeout(10):
                await server_side.finished.wait()
            assert ("bob", "bob-phone") not in sip.board.bound
            # Every call to the dropped device ends for its caller; none waits on it.
            for call in calls:
                with pytest.raises(CallFailed):
                    await call.answered()
            # Others still call each other.
            carol, dave = await sip.device("carol"), await sip.device("dave")
            call = await carol.invite("dave", OFFER)
            await (await dave.incoming()).answer(ANSWER)
            assert (await call.answered()) is not None
