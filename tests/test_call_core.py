"""The call state machine without I/O: every (state, event) pair, and random event sequences."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling import call as core
from signaling.errors import InvalidInState, NoSuchCall, PeerError, RequestPending
from signaling.wire import ByeNotice, CancelNotice, EndReason, IceCandidate, InviteOffer, Method, Response

NOW = 1_000.0
CAND = IceCandidate("candidate:1 1 udp 1 192.0.2.1 1 typ host", "0", 0)


def new_call(devices: tuple[str, ...] = ("d1", "d2")) -> tuple[core.Call, list[core.Effect]]:
    call = core.Call(
        call_id="c1",
        caller_user="alice",
        caller_device="a1",
        caller_name="Alice",
        callee_user="bob",
        invite_seq=7,
        sdp="offer",
        video=False,
        devices=devices,
        now=NOW,
        timeouts=core.Timeouts(ring=60, update=30),
    )
    return call, call.start()


def call_in(state: core.CallState) -> core.Call:
    call, _ = new_call()
    steps: list[core.Event] = []
    if state in (core.CallState.ANSWERED, core.CallState.ESTABLISHED, core.CallState.ENDED):
        steps.append(core.LegAnswered("d1", "answer"))
    if state in (core.CallState.ESTABLISHED, core.CallState.ENDED):
        steps.append(core.CallerAcked(8))
    if state is core.CallState.ENDED:
        steps.append(core.HangupReceived(9, None))
    for event in steps:
        call.handle(event, NOW)
    assert call.state is state
    return call


def snapshot(call: core.Call) -> tuple[object, ...]:
    return (
        call.state,
        call.answered_by,
        call.pending_update,
        call.progress_sent,
        tuple(call.caller_candidates),
        tuple((d, leg.state, leg.code, tuple(leg.candidates)) for d, leg in sorted(call.legs.items())),
    )


def sample_events(kind: type[core.Event]) -> list[core.Event]:
    """Instances of one event type, from the caller, the ringing devices and a stranger."""
    samples: dict[type[core.Event], list[core.Event]] = {
        core.LegProgressed: [core.LegProgressed(d, 180) for d in ("d1", "d2", "zz")],
        core.LegAnswered: [core.LegAnswered(d, "answer") for d in ("d1", "d2", "zz")],
        core.LegRejected: [core.LegRejected(d, c) for d in ("d1", "d2", "zz") for c in (486, 603)],
        core.LegLost: [core.LegLost(d) for d in ("d1", "d2", "zz")],
        core.CallerAcked: [core.CallerAcked(20)],
        core.CallerCancelled: [core.CallerCancelled(20)],
        core.CallerLost: [core.CallerLost()],
        core.HangupReceived: [core.HangupReceived(20, d) for d in (None, "d1", "d2", "zz")],
        core.UpdateReceived: [core.UpdateReceived(20, d, "sdp") for d in (None, "d1", "d2", "zz")],
        core.UpdateAnswered: [core.UpdateAnswered(d, 200, "sdp") for d in (None, "d1", "d2", "zz")],
        core.IceReceived: [core.IceReceived(20, d, CAND) for d in (None, "d1", "d2", "zz")],
        core.TimerFired: [core.TimerFired(k) for k in core.TimerKind],
    }
    return samples[kind]


ALL_PAIRS = [(state, kind) for state in core.CallState for kind in core.EVENT_TYPES]


@pytest.mark.parametrize(("state", "kind"), ALL_PAIRS, ids=[f"{s}-{k.__name__}" for s, k in ALL_PAIRS])
def test_every_state_and_event_pair(state: core.CallState, kind: type[core.Event]) -> None:
    """A pair in the table is handled; any other is refused with a 481 and leaves the call untouched."""
    for event in sample_events(kind):
        call = call_in(state)
        before = snapshot(call)
        try:
            call.handle(event, NOW)
        except PeerError as exc:
            assert snapshot(call) == before, f"{event} changed the call although it was refused"
            if (state, kind) not in core.TRANSITIONS:
                assert isinstance(exc, InvalidInState | NoSuchCall)
                assert exc.code == 481
        else:
            assert (state, kind) in core.TRANSITIONS, f"{event} accepted in {state} outside the table"


def test_start_offers_every_device_and_arms_the_ring_timer() -> None:
    _, effects = new_call(("d1", "d2", "d3"))
    offers = [e for e in effects if isinstance(e, core.SendToDevice)]
    assert [e.device_id for e in offers] == ["d1", "d2", "d3"]
    assert all(isinstance(e.frame, InviteOffer) and e.frame.caller == "alice" for e in offers)
    assert core.StartTimer(core.TimerKind.RING, NOW + 60) in effects


def test_answer_relays_sdp_and_cancels_the_other_devices() -> None:
    call, _ = new_call(("d1", "d2", "d3"))
    effects = call.handle(core.LegAnswered("d2", "answer"), NOW)
    assert core.SendToCaller(Response(7, Method.INVITE, 200, "c1", sdp="answer")) in effects
    cancels = {e.device_id for e in effects if isinstance(e, core.SendToDevice)}
    assert cancels == {"d1", "d3"}
    assert core.CallAnswered("d2") in effects
    assert core.StopTimer(core.TimerKind.RING) in effects


def test_only_the_answering_device_acts_on_an_answered_call() -> None:
    call = call_in(core.CallState.ESTABLISHED)
    with pytest.raises(NoSuchCall):
        call.handle(core.HangupReceived(3, "d2"), NOW)
    with pytest.raises(NoSuchCall):
        call.handle(core.IceReceived(3, "d2", CAND), NOW)


def test_update_glare_and_timeout() -> None:
    call = call_in(core.CallState.ESTABLISHED)
    call.handle(core.UpdateReceived(10, None, "hold"), NOW)
    with pytest.raises(RequestPending):
        call.handle(core.UpdateReceived(4, "d1", "other"), NOW)
    effects = call.handle(core.TimerFired(core.TimerKind.UPDATE), NOW + 30)
    assert effects == [core.SendToCaller(Response(10, Method.UPDATE, 408, "c1"))]
    assert call.pending_update is None


def test_all_devices_lost_gives_480_and_busy_wins_over_lost() -> None:
    call, _ = new_call()
    call.handle(core.LegRejected("d1", 486), NOW)
    effects = call.handle(core.LegLost("d2"), NOW)
    assert core.SendToCaller(Response(7, Method.INVITE, 486, "c1")) in effects
    call, _ = new_call()
    call.handle(core.LegLost("d1"), NOW)
    effects = call.handle(core.LegLost("d2"), NOW)
    assert core.SendToCaller(Response(7, Method.INVITE, 480, "c1")) in effects


# ---------------------------------------------------------------------------------------------- properties

EVENT_POOL = [e for kind in core.EVENT_TYPES for e in sample_events(kind)] + [
    core.LegProgressed("d1", 183, "early"),
    core.UpdateAnswered("d1", 488, None),
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(EVENT_POOL), max_size=25))
def test_any_event_sequence_keeps_the_call_consistent(events: list[core.Event]) -> None:
    """Whatever arrives, in whatever order: the caller gets at most one final answer to its INVITE, the call
    finishes at most once, a device is cancelled at most once, and a refused event never changes the call."""
    call, effects = new_call(("d1", "d2"))
    log = list(effects)
    for event in events:
        before = snapshot(call)
        try:
            log += call.handle(event, NOW)
        except PeerError:
            assert snapshot(call) == before
    finals = [
        e
        for e in log
        if isinstance(e, core.SendToCaller)
        and isinstance(e.frame, Response)
        and e.frame.method is Method.INVITE
        and e.frame.seq == 7
        and e.frame.code >= 200
    ]
    assert len(finals) <= 1
    finished = [e for e in log if isinstance(e, core.CallFinished)]
    assert len(finished) <= 1
    assert (call.state is core.CallState.ENDED) == bool(finished)
    cancels = Counter(
        e.device_id for e in log if isinstance(e, core.SendToDevice) and isinstance(e.frame, CancelNotice)
    )
    assert all(n == 1 for n in cancels.values())
    if finished and call.answered_by is None and finished[0].reason is not EndReason.CALLER_GONE:
        # Never connected and not abandoned: the caller was told how it ended.
        assert len(finals) == 1
    byes = [e for e in log if isinstance(getattr(e, "frame", None), ByeNotice)]
    assert len(byes) <= 1
    if call.answered_by is not None:
        assert call.answered_by not in cancels
