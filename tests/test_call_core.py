"""The call state machine without I/O: every (state, event) pair, and random event sequences."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling import call as core
from signaling.docs import states_reached
from signaling.errors import InvalidInState, NoSuchCall, PeerError, RequestPending
from signaling.wire import (
    AckRelay,
    ByeNotice,
    CallKitReason,
    CancelNotice,
    EndReason,
    IceCandidate,
    IceRelay,
    InviteOffer,
    Method,
    PeerNotice,
    PeerState,
    Response,
    Stage,
    UpdateRelay,
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


def snapshot(call: core.Call) -> dict[str, Any]:
    """Everything the call holds, deep-copied: a refused event must leave all of it as it was."""
    return copy.deepcopy(dict(vars(call)))


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
    """Outside the table: refused with a 481, the call untouched. In it: each sample from the caller, a device or a
    stranger is either refused (481, or 491) with the call untouched, or handled, leaving the call in a state the
    table's "Can move to" column allows, and finished (once) exactly when it ended."""
    handler = core.TRANSITIONS.get((state, kind))
    allowed = {state} | (states_reached(handler) if handler is not None else set())
    for event in sample_events(kind):
        call = call_in(state)
        before = snapshot(call)
        try:
            effects = call.handle(event, NOW)
        except PeerError as exc:
            assert snapshot(call) == before, f"{event} changed the call although it was refused"
            if handler is None:
                assert isinstance(exc, InvalidInState | NoSuchCall)
                assert exc.code == 481
            else:
                assert exc.code in (481, 491), f"{event}: {exc!r}"
        else:
            assert handler is not None, f"{event} accepted in {state} outside the table"
            assert call.state in allowed, f"{event} moved the call to {call.state}; the table allows {allowed}"
            finished = [e for e in effects if isinstance(e, core.CallFinished)]
            assert len(finished) == (call.state is core.CallState.ENDED), f"{event}: {effects}"


# ---------------------------------------------------------------------------------------------- every row, exactly

OFFER1 = "offer"
OFFER2 = "offer 2"


def ringing_with_update() -> core.Call:
    """A ringing call whose caller replaced its offer; neither online device has answered the update yet."""
    call = call_in(core.CallState.RINGING)
    call.handle(core.UpdateReceived(19, None, OFFER2), NOW)
    return call


def answered_after_update() -> core.Call:
    """d1 took the caller's new offer and answered; d2, cancelled, still owes its answer to the update."""
    call = ringing_with_update()
    call.handle(core.UpdateAnswered("d1", 100, None), NOW)
    call.handle(core.LegAnswered("d1", "answer"), NOW)
    return call


def after(state: core.CallState, *events: core.Event) -> Callable[[], core.Call]:
    def prepare() -> core.Call:
        call = call_in(state)
        for event in events:
            call.handle(event, NOW)
        return call

    return prepare


@dataclass
class Row:
    """What one row of the table does to a call prepared as `prepare` says (default: `call_in(state)`)."""

    event: core.Event
    state: core.CallState
    effects: list[core.Effect]
    prepare: Callable[[], core.Call] | None = None
    legs: dict[str, core.LegState] = field(default_factory=dict)


_R, _A, _E, _X = (
    core.CallState.RINGING,
    core.CallState.ANSWERED,
    core.CallState.ESTABLISHED,
    core.CallState.ENDED,
)
L = core.LegState
K = core.TimerKind


def to_caller(seq: int, method: Method, code: int, **extra: Any) -> core.SendToCaller:
    return core.SendToCaller(Response(seq, method, code, "c1", **extra))


def to_device(device_id: str, seq: int, method: Method, code: int) -> core.SendToDevice:
    return core.SendToDevice(device_id, Response(seq, method, code, "c1"))


def cancel(device_id: str, reason: EndReason) -> core.SendToDevice:
    return core.SendToDevice(device_id, CancelNotice("c1", reason))


def finish(reason: EndReason | None, code: int | None, *extra: core.Effect) -> list[core.Effect]:
    """`_finish`'s effects for the standard call: every timer stopped, then CallFinished."""
    stops = [core.StopTimer(K.RING), core.StopTimer(K.UPDATE), core.StopTimer(K.LEG_ACK, "d1")]
    return [*stops, core.StopTimer(K.LEG_ACK, "d3"), *extra, core.CallFinished(reason, code)]


def unanswered_end(reason: EndReason, callkit: CallKitReason) -> list[core.Effect]:
    """Both online devices cancelled, the waking one told, and every device that never rang told it missed."""
    return [
        cancel("d1", reason),
        cancel("d2", reason),
        core.RecordEnded("d3", callkit),
        core.RecordMissed("d3"),
        core.RecordMissed("d9"),
    ]


RECONNECTING = PeerNotice("c1", PeerState.RECONNECTING)
CONNECTED = PeerNotice("c1", PeerState.CONNECTED)
OFFER_RELAY = UpdateRelay("c1", OFFER2)
ROWS: dict[tuple[core.CallState, type[core.Event]], Row] = {
    (_R, core.LegProgressed): Row(
        core.LegProgressed("d2", 180),
        _R,
        [to_caller(7, Method.INVITE, 180, stage=Stage.RINGING, at=NOW)],
        legs={"d2": L.RINGING},
    ),
    (_R, core.LegAnswered): Row(
        core.LegAnswered("d2", "answer"),
        _A,
        [
            core.StopTimer(K.RING),
            to_caller(7, Method.INVITE, 200, sdp="answer", stage=Stage.ANSWERED, at=NOW),
            cancel("d1", EndReason.ANSWERED_ELSEWHERE),
            core.RecordEnded("d3", CallKitReason.ANSWERED_ELSEWHERE),
            core.CallAnswered("d2"),
        ],
        legs={"d1": L.CANCELLED, "d2": L.ANSWERED, "d3": L.CANCELLED},
    ),
    (_R, core.LegRejected): Row(
        core.LegRejected("d1", 603),
        _X,
        [
            core.StopTimer(K.LEG_ACK, "d1"),
            to_caller(7, Method.INVITE, 603),
            cancel("d2", EndReason.DECLINED_ELSEWHERE),
            core.RecordEnded("d3", CallKitReason.DECLINED_ELSEWHERE),
            *finish(EndReason.DECLINED_ELSEWHERE, 603),
        ],
        legs={"d1": L.REJECTED, "d2": L.CANCELLED, "d3": L.CANCELLED},
    ),
    (_R, core.LegLost): Row(core.LegLost("d2"), _R, [], legs={"d2": L.GONE}),
    (_R, core.CallerCancelled): Row(
        core.CallerCancelled(20),
        _X,
        [
            to_caller(20, Method.CANCEL, 200),
            to_caller(7, Method.INVITE, 487),
            *unanswered_end(EndReason.CALLER_CANCELLED, CallKitReason.REMOTE_ENDED),
            *finish(EndReason.CALLER_CANCELLED, 487),
        ],
    ),
    (_R, core.HangupReceived): Row(
        core.HangupReceived(20, None),
        _X,
        [
            to_caller(20, Method.BYE, 200),
            to_caller(7, Method.INVITE, 487),
            *unanswered_end(EndReason.CALLER_CANCELLED, CallKitReason.REMOTE_ENDED),
            *finish(EndReason.CALLER_CANCELLED, 487),
        ],
    ),
    (_R, core.CallerLost): Row(
        core.CallerLost(),
        _X,
        [
            *unanswered_end(EndReason.CALLER_GONE, CallKitReason.REMOTE_ENDED),
            *finish(EndReason.CALLER_GONE, None),
        ],
    ),
    (_R, core.TimerFired): Row(
        core.TimerFired(K.RING),
        _X,
        [
            to_caller(7, Method.INVITE, 408),
            *unanswered_end(EndReason.NO_ANSWER, CallKitReason.UNANSWERED),
            *finish(EndReason.NO_ANSWER, 408),
        ],
    ),
    (_R, core.IceReceived): Row(
        core.IceReceived(20, None, CAND),
        _R,
        [
            to_caller(20, Method.ICE, 200),
            core.SendToDevice("d1", IceRelay("c1", CAND)),
            core.SendToDevice("d2", IceRelay("c1", CAND)),
        ],
    ),
    (_R, core.PushAccepted): Row(
        core.PushAccepted("d3"), _R, [to_caller(7, Method.INVITE, 183, stage=Stage.PUSH_SENT, at=NOW)]
    ),
    (_R, core.PushFailed): Row(core.PushFailed("d3", certain=True), _R, [], legs={"d3": L.GONE}),
    (_R, core.DeviceConnected): Row(
        core.DeviceConnected("d3"),
        _R,
        [
            core.SendToDevice("d3", InviteOffer("c1", "alice", "Alice", OFFER1, False)),
            to_caller(7, Method.INVITE, 183, stage=Stage.CALLEE_CONNECTED, at=NOW),
        ],
        legs={"d3": L.OFFERED},
    ),
    (_R, core.UpdateReceived): Row(
        core.UpdateReceived(20, None, OFFER2),
        _R,
        [
            to_caller(20, Method.UPDATE, 200),
            core.SendToDevice("d1", OFFER_RELAY),
            core.SendToDevice("d2", OFFER_RELAY),
        ],
    ),
    (_R, core.UpdateAnswered): Row(core.UpdateAnswered("d1", 100, None), _R, [], prepare=ringing_with_update),
    (_A, core.LegAnswered): Row(core.LegAnswered("d2", "answer"), _A, [], legs={"d2": L.CANCELLED}),
    (_A, core.LegRejected): Row(core.LegRejected("d2", 487), _A, [], legs={"d2": L.CANCELLED}),
    (_A, core.LegLost): Row(
        core.LegLost("d1"), _A, [core.StartTimer(K.REATTACH, NOW + 15, "d1"), core.SendToCaller(RECONNECTING)]
    ),
    (_A, core.CallerAcked): Row(core.CallerAcked(20), _E, [core.SendToDevice("d1", AckRelay("c1"))]),
    (_A, core.CallerLost): Row(
        core.CallerLost(), _A, [core.StartTimer(K.REATTACH, NOW + 15, None), core.SendToDevice("d1", RECONNECTING)]
    ),
    (_A, core.HangupReceived): Row(
        core.HangupReceived(20, "d1"),
        _X,
        [
            to_device("d1", 20, Method.BYE, 200),
            core.SendToCaller(ByeNotice("c1", EndReason.REMOTE_HANGUP)),
            *finish(EndReason.REMOTE_HANGUP, None),
        ],
    ),
    (_A, core.IceReceived): Row(
        core.IceReceived(20, "d1", CAND),
        _A,
        [to_device("d1", 20, Method.ICE, 200), core.SendToCaller(IceRelay("c1", CAND))],
    ),
    (_A, core.TimerFired): Row(
        core.TimerFired(K.REATTACH, "d1"),
        _X,
        [
            core.SendToCaller(ByeNotice("c1", EndReason.PEER_GONE)),
            *finish(EndReason.PEER_GONE, None, core.StopTimer(K.REATTACH, "d1")),
        ],
        prepare=after(_A, core.LegLost("d1")),
    ),
    (_A, core.PushAccepted): Row(core.PushAccepted("d3"), _A, []),
    (_A, core.PushFailed): Row(core.PushFailed("d3", certain=True), _A, [], legs={"d3": L.CANCELLED}),
    (_A, core.DeviceConnected): Row(core.DeviceConnected("d3"), _A, [], legs={"d3": L.CANCELLED}),
    (_A, core.PartyReattached): Row(
        core.PartyReattached(None),
        _A,
        [core.StopTimer(K.REATTACH, None), core.SendToDevice("d1", CONNECTED), core.SendToCaller(CONNECTED)],
        prepare=after(_A, core.CallerLost()),
    ),
    (_A, core.UpdateAnswered): Row(core.UpdateAnswered("d2", 100, None), _A, [], prepare=answered_after_update),
    (_E, core.LegAnswered): Row(core.LegAnswered("d2", "answer"), _E, []),
    (_E, core.LegRejected): Row(core.LegRejected("d2", 487), _E, []),
    (_E, core.LegLost): Row(
        core.LegLost("d1"), _E, [core.StartTimer(K.REATTACH, NOW + 15, "d1"), core.SendToCaller(RECONNECTING)]
    ),
    (_E, core.CallerLost): Row(
        core.CallerLost(), _E, [core.StartTimer(K.REATTACH, NOW + 15, None), core.SendToDevice("d1", RECONNECTING)]
    ),
    (_E, core.HangupReceived): Row(
        core.HangupReceived(20, None),
        _X,
        [
            to_caller(20, Method.BYE, 200),
            core.SendToDevice("d1", ByeNotice("c1", EndReason.REMOTE_HANGUP)),
            *finish(EndReason.REMOTE_HANGUP, None),
        ],
    ),
    (_E, core.UpdateReceived): Row(
        core.UpdateReceived(20, None, "hold"),
        _E,
        [core.SendToDevice("d1", UpdateRelay("c1", "hold")), core.StartTimer(K.UPDATE, NOW + 30)],
    ),
    (_E, core.UpdateAnswered): Row(
        core.UpdateAnswered("d1", 200, "held"),
        _E,
        [core.StopTimer(K.UPDATE), to_caller(20, Method.UPDATE, 200, sdp="held")],
        prepare=after(_E, core.UpdateReceived(20, None, "hold")),
    ),
    (_E, core.IceReceived): Row(
        core.IceReceived(20, None, CAND),
        _E,
        [to_caller(20, Method.ICE, 200), core.SendToDevice("d1", IceRelay("c1", CAND))],
    ),
    (_E, core.TimerFired): Row(
        core.TimerFired(K.UPDATE),
        _E,
        [to_caller(20, Method.UPDATE, 408)],
        prepare=after(_E, core.UpdateReceived(20, None, "hold")),
    ),
    (_E, core.PushAccepted): Row(core.PushAccepted("d3"), _E, []),
    (_E, core.PushFailed): Row(core.PushFailed("d3", certain=False), _E, []),
    (_E, core.DeviceConnected): Row(core.DeviceConnected("d3"), _E, [], legs={"d3": L.CANCELLED}),
    (_E, core.PartyReattached): Row(
        core.PartyReattached("d1"),
        _E,
        [core.StopTimer(K.REATTACH, "d1"), core.SendToCaller(CONNECTED), core.SendToDevice("d1", CONNECTED)],
        prepare=after(_E, core.LegLost("d1")),
    ),
}


def test_every_row_of_the_table_has_an_expectation() -> None:
    assert set(ROWS) == set(core.TRANSITIONS)


ROW_KEYS = list(ROWS)


@pytest.mark.parametrize(("state", "kind"), ROW_KEYS, ids=[f"{s}-{k.__name__}" for s, k in ROW_KEYS])
def test_every_row_of_the_table_does_what_it_says(state: core.CallState, kind: type[core.Event]) -> None:
    """Each row's handler, on a call in the row's state, gives exactly the effects and the next state the table
    describes, and that state is one its "Can move to" column names."""
    row = ROWS[(state, kind)]
    assert isinstance(row.event, kind)
    call = row.prepare() if row.prepare is not None else call_in(state)
    assert call.state is state
    assert row.state in {state} | states_reached(core.TRANSITIONS[(state, kind)])
    assert call.handle(row.event, NOW) == row.effects
    assert call.state is row.state
    assert {d: call.legs[d].state for d in row.legs} == row.legs


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


def test_a_caller_update_while_ringing_replaces_the_offer_for_every_device() -> None:
    call = ringing_with_update()
    assert call.offer == OFFER2
    # d1 answered the first offer before it saw the update: refused, and it keeps ringing.
    before = snapshot(call)
    with pytest.raises(RequestPending):
        call.handle(core.LegAnswered("d1", "answer to offer 1"), NOW)
    with pytest.raises(RequestPending):
        call.handle(core.LegProgressed("d1", 183, "early media for offer 1"), NOW)
    assert snapshot(call) == before
    # Ringing without SDP is fine meanwhile.
    assert call.handle(core.LegProgressed("d1", 180), NOW)[-1] == to_caller(
        7, Method.INVITE, 180, stage=Stage.RINGING, at=NOW
    )
    # A device woken now is offered the new offer and owes nothing.
    [offer, _] = call.handle(core.DeviceConnected("d3"), NOW)
    assert offer == core.SendToDevice("d3", InviteOffer("c1", "alice", "Alice", OFFER2, False))
    # d1 takes the new offer, then its answer (to it) wins.
    assert call.handle(core.UpdateAnswered("d1", 100, None), NOW) == []
    with pytest.raises(InvalidInState):
        call.handle(core.UpdateAnswered("d1", 100, None), NOW)  # nothing more to answer
    effects = call.handle(core.LegAnswered("d1", "answer to offer 2"), NOW)
    assert to_caller(7, Method.INVITE, 200, sdp="answer to offer 2", stage=Stage.ANSWERED, at=NOW) in effects
    # d2's answer to the update crosses its CANCEL: taken quietly, once.
    assert call.handle(core.UpdateAnswered("d2", 100, None), NOW) == []
    with pytest.raises(NoSuchCall):
        call.handle(core.UpdateAnswered("d2", 100, None), NOW)


def test_every_caller_update_while_ringing_must_be_answered_before_the_invite() -> None:
    call = ringing_with_update()
    call.handle(core.UpdateReceived(20, None, "offer 3"), NOW)
    call.handle(core.UpdateAnswered("d2", 100, None), NOW)
    with pytest.raises(RequestPending):
        call.handle(core.LegAnswered("d2", "answer"), NOW)
    call.handle(core.UpdateAnswered("d2", 100, None), NOW)
    assert call.handle(core.LegAnswered("d2", "answer"), NOW)[1] == to_caller(
        7, Method.INVITE, 200, sdp="answer", stage=Stage.ANSWERED, at=NOW
    )


def test_a_ringing_device_refusing_the_new_offer_rejects_the_call_with_that_code() -> None:
    call, _ = new_call(sleeping=())
    call.handle(core.UpdateReceived(8, None, OFFER2), NOW)
    assert call.handle(core.UpdateAnswered("d1", 488, None), NOW) == [core.StopTimer(K.LEG_ACK, "d1")]
    assert call.legs["d1"].state is L.REJECTED
    effects = call.handle(core.UpdateAnswered("d2", 488, None), NOW)
    assert effects[0] == to_caller(7, Method.INVITE, 488)
    assert call.state is core.CallState.ENDED
    # 603 to the update declines everywhere, as 603 to the INVITE does.
    call, _ = new_call(sleeping=())
    call.handle(core.UpdateReceived(8, None, OFFER2), NOW)
    effects = call.handle(core.UpdateAnswered("d2", 603, None), NOW)
    assert effects[:2] == [to_caller(7, Method.INVITE, 603), cancel("d1", EndReason.DECLINED_ELSEWHERE)]


def test_ringing_devices_cannot_update_and_an_update_after_the_answer_waits_for_the_ack() -> None:
    call = call_in(core.CallState.RINGING)
    with pytest.raises(InvalidInState):
        call.handle(core.UpdateReceived(8, "d1", "device offer"), NOW)
    with pytest.raises(NoSuchCall):
        call.handle(core.UpdateReceived(8, "zz", "stranger offer"), NOW)
    call.handle(core.LegAnswered("d1", "answer"), NOW)
    with pytest.raises(InvalidInState):
        call.handle(core.UpdateReceived(9, None, OFFER2), NOW)
    assert call.offer == OFFER1


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


def test_all_pushes_failing_gives_a_prompt_480_that_says_the_pushes_failed() -> None:
    call, _ = new_call((), ("d3", "d4"))
    assert call.handle(core.PushFailed("d3", certain=True, outcome="token_rejected"), NOW) == []
    effects = call.handle(core.PushFailed("d4", certain=False, outcome="temporary"), NOW)
    detail = "no device could be reached; VoIP push failed: temporary, token_rejected"
    failed = Response(7, Method.INVITE, 480, "c1", error=core.PUSH_FAILED, detail=detail)
    assert core.SendToCaller(failed) in effects
    # The push to d4 may still arrive: d4 will be told the call failed when it connects.
    assert core.RecordEnded("d4", CallKitReason.FAILED) in effects
    assert call.state is core.CallState.ENDED


def test_a_device_that_connects_despite_its_failed_push_and_leaves_gives_a_plain_480() -> None:
    call, _ = new_call(("d1",), ("d3",))
    assert call.handle(core.PushFailed("d3", certain=False, outcome="temporary"), NOW) == []  # d1 still rings
    call.handle(core.DeviceConnected("d3"), NOW)  # the push arrived after all
    assert call.handle(core.LegLost("d1"), NOW) == []
    effects = call.handle(core.LegLost("d3"), NOW)
    assert core.SendToCaller(Response(7, Method.INVITE, 480, "c1")) in effects


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
