"""`signaling demo`: the push wake-up story as a real process (JSON and text), and in process with failures."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from push.local_apns import Answer, ApnsPki, ApnsServer
from signaling import demo

RUN_TIMEOUT = 60.0

# Stages that happen strictly one after the other. The phone's held INVITE and the caller's 183 callee_connected
# are sent together by the server, so they may arrive in either order: each has its own chain.
CHAINS = (
    ("invite_sent", "trying", "push_received", "push_sent", "register_sent", "invite_received", "ringing"),
    ("register_sent", "callee_connected", "ringing", "answered", "ack", "bye"),
)


def _env() -> dict[str, str]:
    # The demo reads no configuration: a SIPLITE_* setting (even a Redis URL) must not matter.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIPLITE_")}
    return {**base, "SIPLITE_REDIS_URL": "redis://127.0.0.1:1/0", "SIPLITE_PORT": "eighty"}


async def _run_demo(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signaling",
        "demo",
        *args,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _assert_story(stages: list[dict[str, Any]]) -> dict[str, float]:
    """Every stage once, in time order, each causal chain in order. Returns stage -> ms."""
    names = [s["stage"] for s in stages]
    assert sorted(names) == sorted(demo.STAGES), names
    ms = {s["stage"]: s["ms"] for s in stages}
    assert [s["ms"] for s in stages] == sorted(s["ms"] for s in stages)
    assert ms["invite_sent"] == 0
    for chain in CHAINS:
        positions = [names.index(name) for name in chain]
        assert positions == sorted(positions), (chain, names)
    return ms


async def test_the_demo_command_tells_the_whole_story_as_json() -> None:
    code, out, err = await _run_demo("--json", "--wake-delay", "0", "--talk", "0")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True
    ms = _assert_story(doc["stages"])

    # Exactly one push reached the local APNs: a VoIP push for CallKit, naming the call.
    assert doc["pushes"] == 1
    push = doc["push"]
    assert push["headers"]["apns-push-type"] == "voip"
    assert push["headers"]["apns-topic"] == "com.example.app.voip"
    assert push["headers"]["apns-priority"] == "10"
    assert push["headers"]["apns-expiration"].isdigit()
    assert push["call_id"] == push["payload"]["siplite"]["call_id"] == doc["call_id"]
    received = next(s for s in doc["stages"] if s["stage"] == "push_received")
    assert "apns-push-type=voip" in received["detail"]
    assert f"call_id={doc['call_id']}" in received["detail"]

    latency = doc["latency_ms"]
    assert set(latency) == set(demo.LATENCIES)
    assert latency["invite_to_answer"] == ms["answered"]
    assert latency["push_to_connect"] == pytest.approx(ms["callee_connected"] - ms["push_received"], abs=0.01)
    # The server logs only warnings and above, to stderr (JSON lines off a terminal): none is an error here.
    assert "Traceback" not in err
    for line in err.splitlines():
        if line.startswith("{"):
            assert json.loads(line)["level"] == "warning", line


async def test_the_demo_command_prints_a_readable_timeline() -> None:
    code, out, err = await _run_demo("--wake-delay", "0.05", "--talk", "0")
    assert code == 0, err
    for text in (
        "-> INVITE bob",
        "<- 100 Trying",
        "<- VoIP push apns-push-type=voip apns-topic=com.example.app.voip apns-expiration=",
        "<- 183 push_sent",
        "-> REGISTER",
        "<- held INVITE from alice",
        "<- 183 callee_connected",
        "<- 180 ringing",
        "<- 200 answered",
        "-> ACK",
        "-> BYE",
        "push to connect",
        "register to invite",
    ):
        assert text in out, (text, out)
    assert out.index("-> INVITE bob") < out.index("<- VoIP push") < out.index("-> BYE") < out.index("OK: one VoIP")


async def test_in_process_the_wake_delay_shows_in_push_to_connect() -> None:
    seen: list[str] = []
    timeline = demo.Timeline(on_stage=lambda stage, ms: seen.append(stage.name))
    result = await demo.run(demo.DemoOptions(wake_delay=0.1, talk=0.0, timeout=10.0), timeline)
    assert seen == [s["stage"] for s in result.timeline.as_list()]
    _assert_story(result.timeline.as_list())
    assert result.pushes == 1
    assert result.push.headers["apns-push-type"] == "voip"
    latency = result.timeline.latencies()
    assert latency["push_to_connect"] >= 100.0
    assert latency["invite_to_answer"] >= latency["push_to_connect"]
    assert json.loads(json.dumps(result.as_json()))["ok"] is True


def _apns_answering(answer: Answer) -> type[ApnsServer]:
    class Scripted(ApnsServer):
        def __init__(self, pki: ApnsPki) -> None:
            super().__init__(pki)
            self.default_answer = answer

    return Scripted


async def test_a_push_apns_rejects_fails_the_demo_naming_the_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "ApnsServer", _apns_answering(Answer(410, "Unregistered")))
    with pytest.raises(demo.DemoFailed, match="183 push_sent: the call failed with 480"):
        await demo.run(demo.DemoOptions(wake_delay=0.0, talk=0.0, timeout=5.0))


async def test_a_push_never_answered_times_out_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "ApnsServer", _apns_answering(Answer(hang=True)))
    with pytest.raises(demo.DemoFailed, match=r"did not happen within 0\.3 s"):
        await demo.run(demo.DemoOptions(wake_delay=0.0, talk=0.0, timeout=0.3))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_a_failed_demo_exits_1_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "ApnsServer", _apns_answering(Answer(410, "Unregistered")))
    out, err = io.StringIO(), io.StringIO()
    code = demo.main(wake_delay=0.0, talk=0.0, timeout=5.0, as_json=True, out=out, err=err)
    assert code == 1
    doc = json.loads(out.getvalue())
    assert doc["ok"] is False
    assert "480" in doc["error"]
    assert [s["stage"] for s in doc["stages"]] == ["invite_sent", "trying", "push_received"]
    assert "signaling demo: FAILED: 183 push_sent" in err.getvalue()
