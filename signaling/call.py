"""The call state machine, sans I/O: events in, effects out.

A `Call` is one INVITE from a caller device to every device of the callee (its *legs*): devices online now are
offered the call at once; sleeping devices with a VoIP push token are pushed and join when they connect. It never
touches a socket, a store or a clock: the server feeds it events (facts, named in the past tense) and carries out
the effects it returns (commands). Time arrives inside events; timers leave as `StartTimer`/`StopTimer` effects.

Every legal step is a row of `TRANSITIONS`, keyed by (state, event type). Anything else raises `InvalidInState`
(or `NoSuchCall` when the sender is no party of the call) and leaves the call exactly as it was, so a late or
duplicate frame can never kill a call. docs/PROTOCOL.md's state table is generated from `TRANSITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from signaling.errors import InvalidInState, LimitExceeded, NoSuchCall, RequestPending
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
    Outbound,
    PeerNotice,
    PeerState,
    Response,
    Stage,
    UpdateRelay,
)


class CallState(StrEnum):
    RINGING = "ringing"  # offered to the callee's devices, no final answer yet
    ANSWERED = "answered"  # a device answered; 200 relayed to the caller, waiting for its ACK
    ESTABLISHED = "established"  # the caller acknowledged the answer
    ENDED = "ended"


class LegState(StrEnum):
    WAKING = "waking"  # a VoIP push was sent; the device has not connected yet
    OFFERED = "offered"
    RINGING = "ringing"
    ANSWERED = "answered"
    REJECTED = "rejected"
    GONE = "gone"
    CANCELLED = "cancelled"


LIVE_LEG_STATES: Final = frozenset({LegState.OFFERED, LegState.RINGING})
# A leg that can still answer: connected and ringing, or being woken by a push that may have arrived.
OPEN_LEG_STATES: Final = frozenset({LegState.WAKING, LegState.OFFERED, LegState.RINGING})


class Side(StrEnum):
    CALLER = "caller"
    CALLEE = "callee"


class TimerKind(StrEnum):
    RING = "ring"  # no answer by the ring timeout: 408
    UPDATE = "update"  # the other party never answered an UPDATE: 408 to its sender
    LEG_ACK = "leg_ack"  # an online device did not acknowledge the INVITE in time: treat it as asleep
    REATTACH = "reattach"  # a party of an answered call lost its socket and did not come back in time


# ---------------------------------------------------------------------------------------------- events (facts)


@dataclass(frozen=True, slots=True)
class LegProgressed:
    """A callee device answered the INVITE with 180 Ringing or 183 Session Progress."""

    device_id: str
    code: int
    sdp: str | None = None


@dataclass(frozen=True, slots=True)
class LegAnswered:
    device_id: str
    sdp: str


@dataclass(frozen=True, slots=True)
class LegRejected:
    """A callee device answered the INVITE with a final error: 486 busy, 603 decline, 488, ..."""

    device_id: str
    code: int


@dataclass(frozen=True, slots=True)
class LegLost:
    """A callee device's connection closed."""

    device_id: str


@dataclass(frozen=True, slots=True)
class CallerAcked:
    seq: int


@dataclass(frozen=True, slots=True)
class CallerCancelled:
    seq: int


@dataclass(frozen=True, slots=True)
class CallerLost:
    """The caller's connection closed."""


@dataclass(frozen=True, slots=True)
class HangupReceived:
    """BYE from the caller (`device_id` None) or from a callee device."""

    seq: int
    device_id: str | None


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    seq: int
    device_id: str | None
    sdp: str


@dataclass(frozen=True, slots=True)
class UpdateAnswered:
    device_id: str | None
    code: int
    sdp: str | None


@dataclass(frozen=True, slots=True)
class IceReceived:
    seq: int
    device_id: str | None
    ice: IceCandidate


@dataclass(frozen=True, slots=True)
class TimerFired:
    kind: TimerKind
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class PushAccepted:
    """APNs accepted the VoIP push to a sleeping device."""

    device_id: str


@dataclass(frozen=True, slots=True)
class PushFailed:
    """The VoIP push to a device failed. `certain`: it surely was not delivered (token rejected, permanent error);
    otherwise (timeout, connection lost) it may still arrive, and the device may yet connect."""

    device_id: str
    certain: bool
    # The provider's outcome class ("temporary", "token_rejected", "permanent"): the caller's 480 names it.
    outcome: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceConnected:
    """A callee device registered on a new connection while the call rings (woken by the push, or back after
    losing its socket)."""

    device_id: str


@dataclass(frozen=True, slots=True)
class PartyReattached:
    """A party of an answered call (the caller for None) registered again on a new connection."""

    device_id: str | None


Event = (
    LegProgressed
    | LegAnswered
    | LegRejected
    | LegLost
    | CallerAcked
    | CallerCancelled
    | CallerLost
    | HangupReceived
    | UpdateReceived
    | UpdateAnswered
    | IceReceived
    | TimerFired
    | PushAccepted
    | PushFailed
    | DeviceConnected
    | PartyReattached
)
EVENT_TYPES: Final[tuple[type[Event], ...]] = (
    LegProgressed,
    LegAnswered,
    LegRejected,
    LegLost,
    CallerAcked,
    CallerCancelled,
    CallerLost,
    HangupReceived,
    UpdateReceived,
    UpdateAnswered,
    IceReceived,
    TimerFired,
    PushAccepted,
    PushFailed,
    DeviceConnected,
    PartyReattached,
)

# ---------------------------------------------------------------------------------------------- effects (commands)


@dataclass(frozen=True, slots=True)
class SendToCaller:
    frame: Outbound


@dataclass(frozen=True, slots=True)
class SendToDevice:
    device_id: str
    frame: Outbound


@dataclass(frozen=True, slots=True)
class StartTimer:
    kind: TimerKind
    at: float
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class StopTimer:
    kind: TimerKind
    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class SendVoipPush:
    """Wake `device_id` with a VoIP push for this call. Emitted at most once per device per call."""

    device_id: str


@dataclass(frozen=True, slots=True)
class RecordEnded:
    """Tell `device_id`, when it connects, that the call it was woken for ended (and why, for CallKit)."""

    device_id: str
    reason: CallKitReason


@dataclass(frozen=True, slots=True)
class RecordMissed:
    """Record a missed call for `device_id`, delivered at its next registration."""

    device_id: str


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """Record that `device_id` answered (the store's call record moves to the answered phase)."""

    device_id: str


@dataclass(frozen=True, slots=True)
class CallFinished:
    """The call is over: forget it. `code` is the caller's final INVITE status when it never connected."""

    reason: EndReason | None
    code: int | None


Effect = (
    SendToCaller
    | SendToDevice
    | StartTimer
    | StopTimer
    | CallAnswered
    | CallFinished
    | SendVoipPush
    | RecordEnded
    | RecordMissed
)

# What a device that was woken for a call is told when the call ended before it connected.
CALLKIT_REASONS: Final[dict[EndReason, CallKitReason]] = {
    EndReason.CALLER_CANCELLED: CallKitReason.REMOTE_ENDED,
    EndReason.CALLER_GONE: CallKitReason.REMOTE_ENDED,
    EndReason.ANSWERED_ELSEWHERE: CallKitReason.ANSWERED_ELSEWHERE,
    EndReason.DECLINED_ELSEWHERE: CallKitReason.DECLINED_ELSEWHERE,
    EndReason.NO_ANSWER: CallKitReason.UNANSWERED,
    EndReason.UNREACHABLE: CallKitReason.FAILED,
    EndReason.REMOTE_HANGUP: CallKitReason.REMOTE_ENDED,
    EndReason.PEER_GONE: CallKitReason.REMOTE_ENDED,
}

MAX_BUFFERED_CANDIDATES: Final = 64

# The error id of the caller's 480 when a VoIP push failed and no device could take the call: without it, a push
# that failed looks exactly like a callee with no device at all.
PUSH_FAILED: Final = "push_failed"


@dataclass(slots=True)
class Leg:
    device_id: str
    state: LegState = LegState.OFFERED
    code: int | None = None
    acked: bool = False  # the device answered the INVITE in some way (100, 180, ...)
    pushable: bool = False  # the device has a VoIP token
    pushed: bool = False  # a VoIP push was sent for this call (never twice)
    push_failed: bool = False  # the push may not have arrived
    push_outcome: str | None = None  # why the push failed (its outcome class), until the device connects
    # Candidates a ringing device trickles before it answers; relayed only if it wins, so the caller never sees
    # candidates of a device that did not answer.
    candidates: list[IceCandidate] = field(default_factory=list)
    # Offers the caller sent by UPDATE while this device rang, not yet answered by it. Its answer to the INVITE
    # counts only at 0: before that it may answer an offer the caller has already replaced.
    updates_unanswered: int = 0


@dataclass(slots=True)
class PendingUpdate:
    seq: int
    from_caller: bool


@dataclass(frozen=True, slots=True)
class Timeouts:
    ring: float = 60.0
    update: float = 30.0
    # An online device that does not acknowledge the INVITE within this is treated as asleep and pushed.
    ack_grace: float = 2.0
    # A party of an answered call whose socket drops has this long to come back before the call ends (0: none).
    reattach: float = 15.0


class Call:
    """One call, from INVITE to its end. Construct it, send out `start()`'s effects, then feed it events."""

    def __init__(
        self,
        *,
        call_id: str,
        caller_user: str,
        caller_device: str,
        caller_name: str | None,
        callee_user: str,
        invite_seq: int,
        sdp: str,
        video: bool,
        devices: Sequence[str],
        now: float,
        timeouts: Timeouts = Timeouts(),
        sleeping: Sequence[str] = (),
        pushable: Collection[str] = (),
        absent: Sequence[str] = (),
    ) -> None:
        """`devices` are online now; `sleeping` are offline devices to wake with a push; `pushable` are the
        devices (online or not) that have a VoIP token; `absent` are known devices that can be neither reached
        nor pushed (they only hear of the call as a missed call)."""
        if not devices and not sleeping:
            raise ValueError("a call needs at least one callee device")
        self.call_id = call_id
        self.caller_user = caller_user
        self.caller_device = caller_device
        self.caller_name = caller_name
        self.callee_user = callee_user
        self.invite_seq = invite_seq
        self.offer = sdp
        self.video = video
        self.created_at = now
        self.timeouts = timeouts
        self.state = CallState.RINGING
        self.legs: dict[str, Leg] = {d: Leg(d, pushable=d in pushable) for d in devices}
        for device in sleeping:
            self.legs[device] = Leg(device, LegState.WAKING, pushable=True, pushed=True)
        self.absent = tuple(absent)
        self.answered_by: str | None = None
        self.pending_update: PendingUpdate | None = None
        self.caller_candidates: list[IceCandidate] = []
        self.progress_sent = False
        self.push_reported = False
        self.connect_reported = False
        # Parties of the answered call whose socket dropped, waiting to re-attach (None is the caller).
        self.detached: set[str | None] = set()

    # ------------------------------------------------------------------------------------------ public

    def start(self) -> list[Effect]:
        offer = self._offer()
        effects: list[Effect] = []
        for leg in self.legs.values():
            if leg.state is LegState.WAKING:
                effects.append(SendVoipPush(leg.device_id))
            else:
                effects.append(SendToDevice(leg.device_id, offer))
                if leg.pushable:
                    grace = self.created_at + self.timeouts.ack_grace
                    effects.append(StartTimer(TimerKind.LEG_ACK, grace, leg.device_id))
        effects.append(StartTimer(TimerKind.RING, self.deadline))
        return effects

    @property
    def deadline(self) -> float:
        """When the call stops ringing: also the expiry of every VoIP push sent for it."""
        return self.created_at + self.timeouts.ring

    def _offer(self) -> InviteOffer:
        return InviteOffer(self.call_id, self.caller_user, self.caller_name, self.offer, self.video)

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply one event. Raises a `PeerError` (and changes nothing) when the event is not allowed now."""
        step = TRANSITIONS.get((self.state, type(event)))
        if step is None:
            self._check_party(event)
            raise InvalidInState(f"{_event_name(event)} is not allowed while the call is {self.state}")
        return step(self, event, now)

    def is_party(self, device_id: str | None) -> bool:
        """Whether a callee device (or the caller, for None) may act on this call in its current state."""
        if device_id is None:
            return True
        if self.answered_by is not None:
            return device_id == self.answered_by
        return device_id in self.legs

    @property
    def live_legs(self) -> list[str]:
        return [leg.device_id for leg in self.legs.values() if leg.state in LIVE_LEG_STATES]

    # ------------------------------------------------------------------------------------------ helpers

    def _check_party(self, event: Event) -> None:
        device_id = getattr(event, "device_id", None)
        if not self.is_party(device_id):
            raise NoSuchCall("this device is no party of the call")

    def _leg(self, device_id: str, *allowed: LegState) -> Leg:
        leg = self.legs.get(device_id)
        if leg is None or (self.answered_by is not None and device_id != self.answered_by):
            raise NoSuchCall("this device is no party of the call")
        if leg.state not in allowed:
            raise InvalidInState(f"this device's leg is {leg.state}")
        return leg

    def _caller_response(
        self,
        code: int,
        sdp: str | None = None,
        *,
        stage: Stage | None = None,
        at: float | None = None,
        error: str | None = None,
        detail: str | None = None,
    ) -> SendToCaller:
        return SendToCaller(
            Response(
                self.invite_seq,
                Method.INVITE,
                code,
                self.call_id,
                sdp=sdp,
                error=error,
                detail=detail,
                stage=stage,
                at=at,
            )
        )

    def _cancel_legs(self, reason: EndReason, *, missed: bool = False) -> list[Effect]:
        """End every open leg: a CANCEL to connected devices, an "ended" notice for devices still waking, and,
        when the call went unanswered, a missed-call record for every device that never saw a CANCEL."""
        effects: list[Effect] = []
        callkit = CALLKIT_REASONS[reason]
        for leg in self.legs.values():
            was = leg.state
            if was in LIVE_LEG_STATES:
                effects.append(SendToDevice(leg.device_id, CancelNotice(self.call_id, reason)))
            elif was is LegState.WAKING:
                effects.append(RecordEnded(leg.device_id, callkit))
            if was in OPEN_LEG_STATES:
                leg.state = LegState.CANCELLED
            if missed and was in (LegState.WAKING, LegState.GONE):
                effects.append(RecordMissed(leg.device_id))
        if missed:
            effects += [RecordMissed(d) for d in self.absent]
        return effects

    def _finish(self, reason: EndReason | None, code: int | None) -> list[Effect]:
        effects: list[Effect] = [StopTimer(TimerKind.RING), StopTimer(TimerKind.UPDATE)]
        pending = self.pending_update
        if pending is not None:
            # The UPDATE's sender still gets its one final response: the call it belonged to is gone.
            response = Response(pending.seq, Method.UPDATE, 487, self.call_id)
            effects.append(SendToCaller(response) if pending.from_caller else self._to_other_side(None, response))
        self.state = CallState.ENDED
        self.pending_update = None
        effects += [StopTimer(TimerKind.LEG_ACK, d) for d, leg in self.legs.items() if leg.pushable]
        effects += [StopTimer(TimerKind.REATTACH, party) for party in self.detached]
        return [*effects, CallFinished(reason, code)]

    def _acknowledged(self, leg: Leg) -> list[Effect]:
        if leg.acked:
            return []
        leg.acked = True
        return [StopTimer(TimerKind.LEG_ACK, leg.device_id)] if leg.pushable else []

    def _to_other_side(self, device_id: str | None, frame: Outbound) -> Effect:
        """Address `frame` to the party opposite the sender in an answered call."""
        if device_id is None:
            if self.answered_by is None:  # pragma: no cover - guarded by the table
                raise InvalidInState("the call has not been answered")
            return SendToDevice(self.answered_by, frame)
        return SendToCaller(frame)

    def _to_sender(self, device_id: str | None, frame: Outbound) -> Effect:
        return SendToCaller(frame) if device_id is None else SendToDevice(device_id, frame)

    def _ok(self, device_id: str | None, seq: int, method: Method) -> Effect:
        return self._to_sender(device_id, Response(seq, method, 200, self.call_id))

    # ------------------------------------------------------------------------------------------ ringing

    def _on_progress(self, e: LegProgressed, now: float) -> list[Effect]:
        leg = self._leg(e.device_id, *LIVE_LEG_STATES)
        if e.code not in (100, 180, 183):
            raise InvalidInState(f"provisional response {e.code} is not relayed; send 100, 180 or 183")
        if e.sdp is not None:
            self._check_offer_taken(leg)
        effects = self._acknowledged(leg)
        if e.code == 100:
            return effects  # "trying": the device has the INVITE; nothing for the caller yet
        leg.state = LegState.RINGING
        # The first 180 tells the caller "ringing"; later ones from other devices add nothing.
        # A 183 carries early-media SDP and is always relayed.
        if e.code == 183:
            return [*effects, self._caller_response(183, e.sdp, at=now)]
        if not self.progress_sent:
            self.progress_sent = True
            effects.append(self._caller_response(180, stage=Stage.RINGING, at=now))
        return effects

    def _on_answer(self, e: LegAnswered, now: float) -> list[Effect]:
        leg = self._leg(e.device_id, *LIVE_LEG_STATES)
        self._check_offer_taken(leg)
        effects: list[Effect] = self._acknowledged(leg)
        leg.state = LegState.ANSWERED
        self.answered_by = e.device_id
        self.state = CallState.ANSWERED
        effects += [StopTimer(TimerKind.RING), self._caller_response(200, e.sdp, stage=Stage.ANSWERED, at=now)]
        effects += [SendToCaller(IceRelay(self.call_id, c)) for c in leg.candidates]
        leg.candidates.clear()
        effects += self._cancel_legs(EndReason.ANSWERED_ELSEWHERE)
        effects.append(CallAnswered(e.device_id))
        for other in self.legs.values():
            other.candidates.clear()
        return effects

    def _on_late_answer(self, e: LegAnswered, now: float) -> list[Effect]:
        """Two devices answered at once; the loser already has its CANCEL (answered elsewhere)."""
        self._leg_any(e.device_id, LegState.CANCELLED)
        return []

    def _on_late_reject(self, e: LegRejected, now: float) -> list[Effect]:
        """A device confirms our CANCEL with 487 (or rejects after all): nothing more to do."""
        self._leg_any(e.device_id, LegState.CANCELLED)
        return []

    def _on_answered_timer(self, e: TimerFired, now: float) -> list[Effect]:
        if e.kind is TimerKind.UPDATE:
            return self._on_update_timer(e, now)
        if e.kind is TimerKind.REATTACH:
            return self._on_reattach_timer(e, now)
        return []  # a ring or grace timer that fired as the call moved on (its StopTimer raced it)

    def _leg_any(self, device_id: str, *allowed: LegState) -> Leg:
        leg = self.legs.get(device_id)
        if leg is None:
            raise NoSuchCall("this device is no party of the call")
        if leg.state not in allowed:
            raise InvalidInState(f"this device's leg is {leg.state}")
        return leg

    def _on_reject(self, e: LegRejected, now: float) -> list[Effect]:
        leg = self._leg(e.device_id, *LIVE_LEG_STATES)
        if not 300 <= e.code <= 699:
            raise InvalidInState(f"{e.code} is not a final rejection")
        effects = self._acknowledged(leg)
        leg.state = LegState.REJECTED
        leg.code = e.code
        if e.code == 603:
            effects += [self._caller_response(603), *self._cancel_legs(EndReason.DECLINED_ELSEWHERE)]
            return effects + self._finish(EndReason.DECLINED_ELSEWHERE, 603)
        return effects + self._maybe_all_failed()

    def _on_leg_lost(self, e: LegLost, now: float) -> list[Effect]:
        leg = self._leg_any(e.device_id, *LegState)
        if leg.state not in LIVE_LEG_STATES:
            return []
        leg.state = LegState.GONE
        return self._maybe_all_failed()

    def _maybe_all_failed(self) -> list[Effect]:
        """End the call when no leg can answer any more: 486 if a device was busy, else 488 or 480."""
        if any(
            leg.state in LIVE_LEG_STATES or (leg.state is LegState.WAKING and not leg.push_failed)
            for leg in self.legs.values()
        ):
            return []
        codes = {leg.code for leg in self.legs.values()}
        code = 486 if 486 in codes else 488 if 488 in codes else 480
        reason = EndReason.UNREACHABLE if code == 480 else None
        failed = sorted({leg.push_outcome for leg in self.legs.values() if leg.push_outcome is not None})
        if code == 480 and failed:
            detail = f"no device could be reached; VoIP push failed: {', '.join(failed)}"
            effects: list[Effect] = [self._caller_response(480, error=PUSH_FAILED, detail=detail)]
        else:
            effects = [self._caller_response(code)]
        effects += self._cancel_legs(EndReason.UNREACHABLE, missed=code == 480)
        return effects + self._finish(reason, code)

    def _on_cancel(self, e: CallerCancelled | HangupReceived, now: float) -> list[Effect]:
        if isinstance(e, HangupReceived) and e.device_id is not None:
            self._check_party(e)
            raise InvalidInState("a ringing device ends the call by answering the INVITE with 486 or 603")
        method = Method.CANCEL if isinstance(e, CallerCancelled) else Method.BYE
        effects: list[Effect] = [self._ok(None, e.seq, method), self._caller_response(487)]
        effects += self._cancel_legs(EndReason.CALLER_CANCELLED, missed=True)
        return effects + self._finish(EndReason.CALLER_CANCELLED, 487)

    def _on_caller_lost_ringing(self, e: CallerLost, now: float) -> list[Effect]:
        return self._cancel_legs(EndReason.CALLER_GONE, missed=True) + self._finish(EndReason.CALLER_GONE, None)

    def _on_ring_timer(self, e: TimerFired, now: float) -> list[Effect]:
        if e.kind is TimerKind.LEG_ACK:
            return self._on_ack_grace(e, now)
        if e.kind is not TimerKind.RING:
            return []
        effects: list[Effect] = [self._caller_response(408)]
        effects += self._cancel_legs(EndReason.NO_ANSWER, missed=True)
        return effects + self._finish(EndReason.NO_ANSWER, 408)

    def _on_ack_grace(self, e: TimerFired, now: float) -> list[Effect]:
        """An online device kept silent after the INVITE: its socket is probably stale, so wake it, once."""
        leg = self.legs.get(e.device_id or "")
        if leg is None or leg.acked or leg.pushed or not leg.pushable or leg.state is not LegState.OFFERED:
            return []
        leg.state = LegState.WAKING
        leg.pushed = True
        return [SendVoipPush(leg.device_id)]

    # ------------------------------------------------------------------------------------------ waking

    def _on_push_accepted(self, e: PushAccepted, now: float) -> list[Effect]:
        leg = self._leg_any(e.device_id, *LegState)
        leg.push_failed = False
        if leg.state is not LegState.WAKING or self.push_reported:
            return []
        self.push_reported = True
        return [self._caller_response(183, stage=Stage.PUSH_SENT, at=now)]

    def _on_push_failed(self, e: PushFailed, now: float) -> list[Effect]:
        leg = self._leg_any(e.device_id, *LegState)
        if leg.state is not LegState.WAKING:
            return []
        leg.push_outcome = e.outcome or "unknown"
        if e.certain:
            leg.state = LegState.GONE
        else:
            leg.push_failed = True
        return self._maybe_all_failed()

    def _on_device_connected(self, e: DeviceConnected, now: float) -> list[Effect]:
        leg = self.legs.get(e.device_id)
        if leg is None or leg.state in (LegState.REJECTED, LegState.CANCELLED, LegState.ANSWERED):
            return []
        woken = leg.state is LegState.WAKING
        leg.state = LegState.OFFERED
        leg.push_failed = False
        leg.updates_unanswered = 0  # the INVITE it gets now carries the latest offer
        leg.push_outcome = None
        effects: list[Effect] = [SendToDevice(e.device_id, self._offer())]
        effects += [SendToDevice(e.device_id, IceRelay(self.call_id, c)) for c in self.caller_candidates]
        if woken and not self.connect_reported:
            self.connect_reported = True
            effects.append(self._caller_response(183, stage=Stage.CALLEE_CONNECTED, at=now))
        return effects

    def _on_ignored(self, e: Event, now: float) -> list[Effect]:
        """A push result or a reconnection that arrives after the call was answered changes nothing."""
        return []

    def _on_ice_ringing(self, e: IceReceived, now: float) -> list[Effect]:
        if e.device_id is None:
            if len(self.caller_candidates) >= MAX_BUFFERED_CANDIDATES:
                raise LimitExceeded(f"more than {MAX_BUFFERED_CANDIDATES} candidates before answer")
            self.caller_candidates.append(e.ice)
            relay = IceRelay(self.call_id, e.ice)
            return [self._ok(None, e.seq, Method.ICE)] + [SendToDevice(d, relay) for d in self.live_legs]
        leg = self._leg(e.device_id, *LIVE_LEG_STATES)
        if len(leg.candidates) >= MAX_BUFFERED_CANDIDATES:
            raise LimitExceeded(f"more than {MAX_BUFFERED_CANDIDATES} candidates before answer")
        leg.candidates.append(e.ice)
        return [self._ok(e.device_id, e.seq, Method.ICE)]

    def _check_offer_taken(self, leg: Leg) -> None:
        if leg.updates_unanswered:
            raise RequestPending(
                "the caller sent a newer offer (update) that this device has not answered; answer the update, "
                "then answer the invite again with an answer to that offer"
            )

    def _on_update_ringing(self, e: UpdateReceived, now: float) -> list[Effect]:
        self._check_party(e)
        if e.device_id is not None:
            raise InvalidInState("a ringing device sends its offer changes after it has answered the INVITE")
        self.offer = e.sdp
        relay = UpdateRelay(self.call_id, e.sdp)
        effects: list[Effect] = [self._ok(None, e.seq, Method.UPDATE)]
        for leg in self.legs.values():
            if leg.state in LIVE_LEG_STATES:
                leg.updates_unanswered += 1
                effects.append(SendToDevice(leg.device_id, relay))
        return effects

    def _on_update_answer_ringing(self, e: UpdateAnswered, now: float) -> list[Effect]:
        if e.device_id is None:
            raise InvalidInState("there is no UPDATE awaiting this side's answer")
        leg = self._leg(e.device_id, *LIVE_LEG_STATES)
        if not leg.updates_unanswered:
            raise InvalidInState("there is no UPDATE awaiting this side's answer")
        if e.code >= 300:
            return self._on_reject(LegRejected(e.device_id, e.code), now)
        leg.updates_unanswered -= 1
        return []

    # ------------------------------------------------------------------------------------------ answered

    def _on_ack(self, e: CallerAcked, now: float) -> list[Effect]:
        self.state = CallState.ESTABLISHED
        return [self._to_other_side(None, AckRelay(self.call_id))]

    def _on_hangup(self, e: HangupReceived, now: float) -> list[Effect]:
        self._check_party(e)
        bye = ByeNotice(self.call_id, EndReason.REMOTE_HANGUP)
        effects = [self._ok(e.device_id, e.seq, Method.BYE), self._to_other_side(e.device_id, bye)]
        return effects + self._finish(EndReason.REMOTE_HANGUP, None)

    def _on_party_lost(self, e: CallerLost | LegLost, now: float) -> list[Effect]:
        device_id = e.device_id if isinstance(e, LegLost) else None
        if device_id is not None and device_id != self.answered_by:
            return self._on_leg_lost(e, now) if isinstance(e, LegLost) else []
        if self.timeouts.reattach <= 0:
            bye = ByeNotice(self.call_id, EndReason.PEER_GONE)
            return [self._to_other_side(device_id, bye), *self._finish(EndReason.PEER_GONE, None)]
        if device_id in self.detached:
            return []
        self.detached.add(device_id)
        effects: list[Effect] = [StartTimer(TimerKind.REATTACH, now + self.timeouts.reattach, device_id)]
        if self._other(device_id) not in self.detached:
            effects.append(self._to_other_side(device_id, PeerNotice(self.call_id, PeerState.RECONNECTING)))
        return effects

    def _other(self, party: str | None) -> str | None:
        """The other party of the answered call: the answering device for the caller (None), and back."""
        return self.answered_by if party is None else None

    def _on_reattached(self, e: PartyReattached, now: float) -> list[Effect]:
        party = e.device_id
        if party is not None and party != self.answered_by:
            raise NoSuchCall("this device is no party of the call")
        if party not in self.detached:
            return []  # it moved to a new socket before the old one was seen to drop: nothing was missed
        self.detached.discard(party)
        effects: list[Effect] = [StopTimer(TimerKind.REATTACH, party)]
        if self._other(party) in self.detached:
            return [*effects, self._to_sender(party, PeerNotice(self.call_id, PeerState.RECONNECTING))]
        connected = PeerNotice(self.call_id, PeerState.CONNECTED)
        return [*effects, self._to_other_side(party, connected), self._to_sender(party, connected)]

    def _on_reattach_timer(self, e: TimerFired, now: float) -> list[Effect]:
        party = e.device_id
        if party not in self.detached:
            return []
        effects: list[Effect] = []
        if self._other(party) not in self.detached:
            effects.append(self._to_other_side(party, ByeNotice(self.call_id, EndReason.PEER_GONE)))
        return effects + self._finish(EndReason.PEER_GONE, None)

    def _on_update(self, e: UpdateReceived, now: float) -> list[Effect]:
        self._check_party(e)
        if self.pending_update is not None:
            raise RequestPending("an UPDATE is already in progress on this call; retry after it completes")
        self.pending_update = PendingUpdate(e.seq, e.device_id is None)
        return [
            self._to_other_side(e.device_id, UpdateRelay(self.call_id, e.sdp)),
            StartTimer(TimerKind.UPDATE, now + self.timeouts.update),
        ]

    def _on_update_answer(self, e: UpdateAnswered, now: float) -> list[Effect]:
        leg = self.legs.get(e.device_id) if e.device_id is not None else None
        if leg is not None and leg.state is LegState.CANCELLED and leg.updates_unanswered:
            # A device that lost the answer race answering an offer sent while it rang, crossing its CANCEL.
            leg.updates_unanswered -= 1
            return []
        self._check_party(e)
        pending = self.pending_update
        # The answer must come from the side the UPDATE was relayed to.
        if pending is None or pending.from_caller == (e.device_id is None):
            raise InvalidInState("there is no UPDATE awaiting this side's answer")
        if e.code < 200:
            return []
        self.pending_update = None
        response = Response(pending.seq, Method.UPDATE, e.code, self.call_id, sdp=e.sdp)
        return [StopTimer(TimerKind.UPDATE), self._to_other_side(e.device_id, response)]

    def _on_update_timer(self, e: TimerFired, now: float) -> list[Effect]:
        pending = self.pending_update
        if e.kind is not TimerKind.UPDATE or pending is None:  # a ring or grace timer that raced the answer
            return []
        self.pending_update = None
        response = Response(pending.seq, Method.UPDATE, 408, self.call_id)
        return [SendToCaller(response) if pending.from_caller else self._to_other_side(None, response)]

    def _on_ice_connected(self, e: IceReceived, now: float) -> list[Effect]:
        self._check_party(e)
        relay = IceRelay(self.call_id, e.ice)
        return [self._ok(e.device_id, e.seq, Method.ICE), self._to_other_side(e.device_id, relay)]


def _event_name(event: Event) -> str:
    return type(event).__name__


Step = Callable[[Call, Event, float], list[Effect]]
_R, _A, _E = CallState.RINGING, CallState.ANSWERED, CallState.ESTABLISHED

# The whole state machine. A pair that is absent is a protocol error that changes nothing.
TRANSITIONS: Final[dict[tuple[CallState, type[Event]], Step]] = {
    (_R, LegProgressed): Call._on_progress,  # type: ignore[dict-item]
    (_R, LegAnswered): Call._on_answer,  # type: ignore[dict-item]
    (_R, LegRejected): Call._on_reject,  # type: ignore[dict-item]
    (_R, LegLost): Call._on_leg_lost,  # type: ignore[dict-item]
    (_R, CallerCancelled): Call._on_cancel,  # type: ignore[dict-item]
    (_R, HangupReceived): Call._on_cancel,  # type: ignore[dict-item]
    (_R, CallerLost): Call._on_caller_lost_ringing,  # type: ignore[dict-item]
    (_R, TimerFired): Call._on_ring_timer,  # type: ignore[dict-item]
    (_R, IceReceived): Call._on_ice_ringing,  # type: ignore[dict-item]
    (_R, PushAccepted): Call._on_push_accepted,  # type: ignore[dict-item]
    (_R, PushFailed): Call._on_push_failed,  # type: ignore[dict-item]
    (_R, DeviceConnected): Call._on_device_connected,  # type: ignore[dict-item]
    (_R, UpdateReceived): Call._on_update_ringing,  # type: ignore[dict-item]
    (_R, UpdateAnswered): Call._on_update_answer_ringing,  # type: ignore[dict-item]
    (_A, PushAccepted): Call._on_ignored,
    (_A, PushFailed): Call._on_ignored,
    (_A, DeviceConnected): Call._on_ignored,
    (_E, PushAccepted): Call._on_ignored,
    (_E, PushFailed): Call._on_ignored,
    (_E, DeviceConnected): Call._on_ignored,
    (_A, LegAnswered): Call._on_late_answer,  # type: ignore[dict-item]
    (_A, LegRejected): Call._on_late_reject,  # type: ignore[dict-item]
    (_A, TimerFired): Call._on_answered_timer,  # type: ignore[dict-item]
    (_A, PartyReattached): Call._on_reattached,  # type: ignore[dict-item]
    (_E, PartyReattached): Call._on_reattached,  # type: ignore[dict-item]
    (_A, CallerAcked): Call._on_ack,  # type: ignore[dict-item]
    (_A, HangupReceived): Call._on_hangup,  # type: ignore[dict-item]
    (_A, CallerLost): Call._on_party_lost,  # type: ignore[dict-item]
    (_A, LegLost): Call._on_party_lost,  # type: ignore[dict-item]
    (_A, IceReceived): Call._on_ice_connected,  # type: ignore[dict-item]
    (_A, UpdateAnswered): Call._on_update_answer,  # type: ignore[dict-item]
    (_E, LegAnswered): Call._on_late_answer,  # type: ignore[dict-item]
    (_E, LegRejected): Call._on_late_reject,  # type: ignore[dict-item]
    (_E, HangupReceived): Call._on_hangup,  # type: ignore[dict-item]
    (_E, CallerLost): Call._on_party_lost,  # type: ignore[dict-item]
    (_E, LegLost): Call._on_party_lost,  # type: ignore[dict-item]
    (_E, UpdateReceived): Call._on_update,  # type: ignore[dict-item]
    (_E, UpdateAnswered): Call._on_update_answer,  # type: ignore[dict-item]
    (_E, TimerFired): Call._on_answered_timer,  # type: ignore[dict-item]
    (_E, IceReceived): Call._on_ice_connected,  # type: ignore[dict-item]
}
