"""The call state machine without I/O: every (state, event) pair, and random event sequences."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling import call as core
from signaling.errors import InvalidInState, NoSuchCall, PeerError, RequestPending
from signaling.wire import (
    ByeNotice,
    CallKitReason,
    CancelNotice,
    EndReason,
    IceCandidate,
    InviteOffer,
    Method,
    PeerNotice,
    PeerState,
    Response,
    Stage,
)

NOW = 1_000.0
TIMEOUTS = core.Timeouts(ring=60, update=30, ack_grace=2)
CAND = IceCandidate("candidate:1 1 udp 1 192.0.2.1 1 typ host", "0", 0)


def new_call(
    devices: tuple[str, ...] = ("d1", "d2"),
    sleeping: tuple[str, ...] = ("d3",),
    timeouts: core.Timeouts = TIMEOUTS,
) -> tuple[core.Call, list[core.Effect]]:
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
        timeouts=timeouts,
        sleeping=sleeping,
        pushable={"d1", *sleeping},
        absent=("d9",),
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
        call.push_reported,
        call.connect_reported,
        tuple(sorted(call.detached, key=str)),
        tuple(
            (d, leg.state, leg.code, tuple(leg.candidates), leg.acked, leg.pushed, leg.push_failed)
            for d, leg in sorted(call.legs.items())
        ),
    )


def sample_events(kind: type[core.Event]) -> list[core.Event]:
    """Instances of one event type, from the caller, the ringing devices and a stranger."""
    timers: list[core.Event] = [core.TimerFired(k) for k in core.TimerKind]
    timers.append(core.TimerFired(core.TimerKind.LEG_ACK, "d1"))
    timers.append(core.TimerFired(core.TimerKind.REATTACH, "d1"))
    samples: dict[type[core.Event], list[core.Event]] = {
        core.LegProgressed: [core.LegProgressed(d, c) for d in ("d1", "d2", "d3", "zz") for c in (100, 180)],
        core.LegAnswered: [core.LegAnswered(d, "answer") for d in ("d1", "d2", "d3", "zz")],
        core.LegRejected: [core.LegRejected(d, c) for d in ("d1", "d2", "zz") for c in (486, 603)],
        core.LegLost: [core.LegLost(d) for d in ("d1", "d2", "zz")],
        core.CallerAcked: [core.CallerAcked(20)],
        core.CallerCancelled: [core.CallerCancelled(20)],
        core.CallerLost: [core.CallerLost()],
        core.HangupReceived: [core.HangupReceived(20, d) for d in (None, "d1", "d2", "zz")],
        core.UpdateReceived: [core.UpdateReceived(20, d, "sdp") for d in (None, "d1", "d2", "zz")],
        core.UpdateAnswered: [core.UpdateAnswered(d, 200, "sdp") for d in (None, "d1", "d2", "zz")],
        core.IceReceived: [core.IceReceived(20, d, CAND) for d in (None, "d1", "d2", "zz")],
        core.TimerFired: timers,
        core.PushAccepted: [core.PushAccepted(d) for d in ("d1", "d3")],
        core.PushFailed: [core.PushFailed(d, c) for d in ("d1", "d3") for c in (True, False)],
        core.DeviceConnected: [core.DeviceConnected(d) for d in ("d1", "d3", "zz")],
        core.PartyReattached: [core.PartyReattached(d) for d in (None, "d1", "d2", "zz")],
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


def test_start_offers_online_devices_pushes_sleeping_ones_and_arms_timers() -> None:
    _, effects = new_call(("d1", "d2"), ("d3", "d4"))
    offers = [e for e in effects if isinstance(e, core.SendToDevice)]
    assert [e.device_id for e in offers] == ["d1", "d2"]
    assert all(isinstance(e.frame, InviteOffer) and e.frame.caller == "alice" for e in offers)
    assert [e for e in effects if isinstance(e, core.SendVoipPush)] == [
        core.SendVoipPush("d3"),
        core.SendVoipPush("d4"),
    ]
    assert core.StartTimer(core.TimerKind.RING, NOW + 60) in effects
    # Only the online device that could be pushed gets an acknowledgement grace timer.
    assert [e for e in effects if isinstance(e, core.StartTimer) and e.kind is core.TimerKind.LEG_ACK] == [
        core.StartTimer(core.TimerKind.LEG_ACK, NOW + 2, "d1")
    ]


def test_answer_relays_sdp_and_cancels_the_other_devices() -> None:
    call, _ = new_call(("d1", "d2", "d3"), ())
    effects = call.handle(core.LegAnswered("d2", "answer"), NOW)
    answer = Response(7, Method.INVITE, 200, "c1", sdp="answer", stage=Stage.ANSWERED, at=NOW)
    assert core.SendToCaller(answer) in effects
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
    call, _ = new_call(sleeping=())
    call.handle(core.LegRejected("d1", 486), NOW)
    effects = call.handle(core.LegLost("d2"), NOW)
    assert core.SendToCaller(Response(7, Method.INVITE, 486, "c1")) in effects
    call, _ = new_call(sleeping=())
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
    pushes = Counter(e.device_id for e in log if isinstance(e, core.SendVoipPush))
    assert all(n == 1 for n in pushes.values()), "a device was pushed twice for one call"
    assert set(pushes) <= {"d1", "d3"}, "only devices with a VoIP token are pushed"
    ended = Counter(e.device_id for e in log if isinstance(e, core.RecordEnded))
    assert all(n == 1 for n in ended.values())
    assert set(ended) <= set(pushes), "only pushed devices are told a call ended"
    assert not set(ended) & set(cancels), "a device hears of the end once, by CANCEL or by notice"
    missed = Counter(e.device_id for e in log if isinstance(e, core.RecordMissed))
    assert all(n == 1 for n in missed.values())
    byes = [e for e in log if isinstance(getattr(e, "frame", None), ByeNotice)]
    assert len(byes) <= 1
    if call.answered_by is not None:
        assert call.answered_by not in cancels


# ---------------------------------------------------------------------------------------------- waking devices


def test_sleeping_device_woken_joins_and_caller_sees_each_stage() -> None:
    call, _ = new_call(("d1",), ("d3",))
    call.handle(core.DeviceConnected("zz"), NOW)  # an unrelated device changes nothing
    [push_sent] = call.handle(core.PushAccepted("d3"), NOW + 0.1)
    assert push_sent == core.SendToCaller(
        Response(7, Method.INVITE, 183, "c1", stage=Stage.PUSH_SENT, at=NOW + 0.1)
    )
    assert call.handle(core.PushAccepted("d3"), NOW + 0.2) == []  # reported once
    cand = core.IceReceived(8, None, CAND)
    call.handle(cand, NOW)
    effects = call.handle(core.DeviceConnected("d3"), NOW + 0.9)
    assert isinstance(effects[0], core.SendToDevice) and isinstance(effects[0].frame, InviteOffer)
    assert [e.device_id for e in effects if isinstance(e, core.SendToDevice)] == ["d3", "d3"]  # offer + candidate
    assert (
        core.SendToCaller(Response(7, Method.INVITE, 183, "c1", stage=Stage.CALLEE_CONNECTED, at=NOW + 0.9))
        in effects
    )
    call.handle(core.LegAnswered("d3", "answer"), NOW + 2)
    assert call.answered_by == "d3"


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        (core.CallerCancelled(8), CallKitReason.REMOTE_ENDED),
        (core.CallerLost(), CallKitReason.REMOTE_ENDED),
        (core.LegAnswered("d1", "answer"), CallKitReason.ANSWERED_ELSEWHERE),
        (core.LegRejected("d1", 603), CallKitReason.DECLINED_ELSEWHERE),
        (core.TimerFired(core.TimerKind.RING), CallKitReason.UNANSWERED),
    ],
)
def test_a_device_still_waking_is_told_why_the_call_ended(ending: core.Event, reason: CallKitReason) -> None:
    call, _ = new_call(("d1",), ("d3",))
    effects = call.handle(ending, NOW + 5)
    assert core.RecordEnded("d3", reason) in effects
    assert not any(isinstance(e, core.SendToDevice) and e.device_id == "d3" for e in effects)
    # Once ended, a late connection is not offered the call.
    missed = {e.device_id for e in effects if isinstance(e, core.RecordMissed)}
    unanswered = reason in (CallKitReason.REMOTE_ENDED, CallKitReason.UNANSWERED)
    assert missed == ({"d3", "d9"} if unanswered else set())


def test_silent_online_device_is_pushed_once_after_the_grace() -> None:
    call, _ = new_call(("d1", "d2"), ())
    assert call.handle(core.TimerFired(core.TimerKind.LEG_ACK, "d1"), NOW + 2) == [core.SendVoipPush("d1")]
    assert call.legs["d1"].state is core.LegState.WAKING
    assert call.handle(core.TimerFired(core.TimerKind.LEG_ACK, "d1"), NOW + 3) == []
    # The device had not acknowledged because its socket was stale: it reconnects and is offered the call.
    effects = call.handle(core.DeviceConnected("d1"), NOW + 4)
    assert isinstance(effects[0], core.SendToDevice) and isinstance(effects[0].frame, InviteOffer)


def test_acknowledged_device_is_never_pushed() -> None:
    call, _ = new_call(("d1",), ())
    assert call.handle(core.LegProgressed("d1", 100), NOW + 1) == [core.StopTimer(core.TimerKind.LEG_ACK, "d1")]
    assert call.handle(core.TimerFired(core.TimerKind.LEG_ACK, "d1"), NOW + 2) == []


def test_all_pushes_failing_gives_a_prompt_480() -> None:
    call, _ = new_call((), ("d3", "d4"))
    assert call.handle(core.PushFailed("d3", certain=True), NOW) == []
    effects = call.handle(core.PushFailed("d4", certain=False), NOW)
    assert core.SendToCaller(Response(7, Method.INVITE, 480, "c1")) in effects
    # The push to d4 may still arrive: d4 will be told the call failed when it connects.
    assert core.RecordEnded("d4", CallKitReason.FAILED) in effects
    assert call.state is core.CallState.ENDED


# ---------------------------------------------------------------------------------------------- re-attaching


def established() -> core.Call:
    call = call_in(core.CallState.ESTABLISHED)
    assert call.answered_by == "d1"
    return call


def test_a_party_whose_socket_drops_has_the_grace_to_come_back_and_the_other_is_told() -> None:
    call = established()
    effects = call.handle(core.CallerLost(), NOW)
    reconnecting = PeerNotice("c1", PeerState.RECONNECTING)
    assert effects == [
        core.StartTimer(core.TimerKind.REATTACH, NOW + call.timeouts.reattach, None),
        core.SendToDevice("d1", reconnecting),
    ]
    assert call.state is core.CallState.ESTABLISHED

    effects = call.handle(core.PartyReattached(None), NOW + 3)
    connected = PeerNotice("c1", PeerState.CONNECTED)
    assert effects == [
        core.StopTimer(core.TimerKind.REATTACH, None),
        core.SendToDevice("d1", connected),
        core.SendToCaller(connected),
    ]
    assert call.handle(core.PartyReattached(None), NOW + 4) == []  # once back, a second notice adds nothing
    assert call.handle(core.TimerFired(core.TimerKind.REATTACH, None), NOW + 15) == []  # a raced timer


def test_a_party_that_does_not_come_back_in_time_ends_the_call_for_the_other() -> None:
    call = established()
    call.handle(core.LegLost("d1"), NOW)
    effects = call.handle(core.TimerFired(core.TimerKind.REATTACH, "d1"), NOW + call.timeouts.reattach)
    assert effects[0] == core.SendToCaller(ByeNotice("c1", EndReason.PEER_GONE))
    assert effects[-1] == core.CallFinished(EndReason.PEER_GONE, None)
    assert call.state is core.CallState.ENDED


def test_both_parties_dropping_tell_nobody_and_end_when_the_first_grace_runs_out() -> None:
    call = established()
    call.handle(core.LegLost("d1"), NOW)
    assert call.handle(core.CallerLost(), NOW + 1) == [
        core.StartTimer(core.TimerKind.REATTACH, NOW + 1 + call.timeouts.reattach, None)
    ]
    # The caller comes back first: it learns its peer is still away.
    assert core.SendToCaller(PeerNotice("c1", PeerState.RECONNECTING)) in call.handle(
        core.PartyReattached(None), NOW + 2
    )
    effects = call.handle(core.TimerFired(core.TimerKind.REATTACH, "d1"), NOW + call.timeouts.reattach)
    assert core.SendToCaller(ByeNotice("c1", EndReason.PEER_GONE)) in effects
    assert call.state is core.CallState.ENDED


def test_without_a_grace_a_dropped_party_ends_the_call_at_once() -> None:
    call, _ = new_call(timeouts=core.Timeouts(reattach=0))
    call.handle(core.LegAnswered("d1", "answer"), NOW)
    effects = call.handle(core.CallerLost(), NOW)
    assert core.SendToDevice("d1", ByeNotice("c1", EndReason.PEER_GONE)) in effects
    assert call.state is core.CallState.ENDED


def test_only_the_parties_of_the_answered_call_re_attach() -> None:
    call = established()
    call.handle(core.LegLost("d1"), NOW)
    with pytest.raises(NoSuchCall):
        call.handle(core.PartyReattached("d2"), NOW)
