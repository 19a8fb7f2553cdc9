"""DevelopmentProvider: records pushes, answers DELIVERED, lets a simulated device react."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from push.base import IncomingCallPush, MissedCallAlert, Outcome, PushProvider
from push.dev import DevelopmentProvider
from signaling.client import dev_pushes
from signaling.models import PushEnvironment
from tests.conftest import Wake
from tests.harness import OFFER, Harness


def call(call_id: str, token: str = "ab" * 32) -> IncomingCallPush:
    return IncomingCallPush(
        token=token,
        bundle_id="com.example.app",
        environment=PushEnvironment.SANDBOX,
        call_id=call_id,
        caller_id="alice",
        caller_name=None,
        video=False,
        sent_at=100.0,
        deadline=130.0,
    )


def missed(call_id: str) -> MissedCallAlert:
    return MissedCallAlert(
        token="cd" * 32,
        bundle_id="com.example.app",
        environment=PushEnvironment.SANDBOX,
        call_id=call_id,
        caller_id="alice",
        caller_name="Alice",
        at=130.0,
    )


async def test_records_every_push_and_delivers() -> None:
    provider: PushProvider = DevelopmentProvider()
    await provider.start()
    first = await provider.send_incoming_call(call("c1"))
    second = await provider.send_missed_call(missed("c1"))
    await provider.close()

    assert (first.outcome, first.status, second.outcome) == (Outcome.DELIVERED, 200, Outcome.DELIVERED)
    assert first.apns_id != second.apns_id
    assert isinstance(provider, DevelopmentProvider)
    assert [(r.request, r.result) for r in provider.records] == [(call("c1"), first), (missed("c1"), second)]


async def test_records_are_bounded() -> None:
    provider = DevelopmentProvider(max_records=2)
    for n in range(3):
        await provider.send_incoming_call(call(f"c{n}"))

    assert [r.request.call_id for r in provider.records] == ["c1", "c2"]


async def test_wait_for_a_push_already_recorded_or_still_to_come() -> None:
    provider = DevelopmentProvider()
    await provider.send_incoming_call(call("early"))

    assert (await provider.wait_for(lambda r: r.request.call_id == "early", timeout=1)).request == call("early")

    waiting = asyncio.create_task(provider.wait_for(lambda r: r.request.call_id == "late", timeout=1))
    await provider.send_incoming_call(call("other"))
    await provider.send_incoming_call(call("late"))
    assert (await waiting).request == call("late")


async def test_wait_for_times_out() -> None:
    provider = DevelopmentProvider()
    await provider.send_incoming_call(call("other"))

    with pytest.raises(TimeoutError):
        await provider.wait_for(lambda r: r.request.call_id == "never", timeout=0.01)


async def test_subscription_wakes_a_simulated_device() -> None:
    provider = DevelopmentProvider()
    queue = provider.subscribe()
    woken: list[str] = []

    async def device() -> None:
        record = await queue.get()
        woken.append(record.request.call_id)

    task = asyncio.create_task(device())
    await provider.send_incoming_call(call("c1"))
    await asyncio.wait_for(task, 1)
    provider.unsubscribe(queue)
    await provider.send_incoming_call(call("c2"))

    assert woken == ["c1"]
    assert queue.empty()


# --- seen from another process: GET /dev/pushes ------------------------------------------------------------------


async def test_a_simulated_phone_sees_its_push_over_http_and_wakes_into_the_call(sip: Harness) -> None:
    alice = await sip.device("alice", name="Alice A.")
    binding = await sip.asleep("bob", "bob-phone", "ab" * 32)
    token = sip.token("bob")
    assert await dev_pushes(sip.url, token) == []

    call = await alice.invite("bob", OFFER)
    [push] = await dev_pushes(sip.url, token, wait=5)
    assert {k: push[k] for k in ("kind", "call_id", "user_id", "device_id", "apns_push_type", "apns_topic")} == {
        "kind": "incoming_call",
        "call_id": call.call_id,
        "user_id": "bob",
        "device_id": "bob-phone",
        "apns_push_type": "voip",
        "apns_topic": "com.example.app.voip",
    }
    assert push["payload"]["siplite"]["call_uuid"] == call.call_id
    assert push["apns_expiration"] == int(sip.clock.now() + sip.settings.ring_timeout)
    assert "ab" * 32 not in json.dumps(push)  # the token itself is never shown
    assert await dev_pushes(sip.url, sip.token("carol")) == []  # nobody sees another user's pushes
    assert await dev_pushes(sip.url, token, after=push["index"]) == []

    phone = await sip.device("bob", "bob-phone", push=binding)
    assert (await phone.incoming()).call_id == call.call_id


@pytest.mark.parametrize(
    ("token", "query", "status"),
    [
        ("forged.jwt.token", {}, 401),
        (None, {}, 401),
        ("bob", {"wait": "31"}, 400),
        ("bob", {"after": "x"}, 400),
    ],
    ids=["forged", "missing", "wait-too-long", "bad-after"],
)
async def test_the_dev_endpoint_refuses_bad_requests(
    sip: Harness, token: str | None, query: dict[str, str], status: int
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {sip.token(token) if token == 'bob' else token}"}
    url = sip.url.removesuffix("/ws").replace("ws://", "http://") + "/dev/pushes"
    async with aiohttp.ClientSession() as http, http.get(url, params=query, headers=headers) as response:
        assert response.status == status
        assert (await response.json())["error"] in ("auth_failed", "invalid_field")


async def test_the_dev_endpoint_does_not_exist_when_apns_is_configured(wake: Wake) -> None:
    url = wake.sip.url.removesuffix("/ws").replace("ws://", "http://") + "/dev/pushes"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 404
