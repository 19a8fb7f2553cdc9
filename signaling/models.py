"""Domain values shared by the core, the store and the server.

Everything here is a frozen, slotted dataclass or an enum: values that cross a layer boundary never travel as
bare dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PushEnvironment(StrEnum):
    """Which APNs environment issued a device's tokens (debug builds get sandbox tokens)."""

    PRODUCTION = "production"
    SANDBOX = "sandbox"


class Platform(StrEnum):
    IOS = "ios"


@dataclass(frozen=True, slots=True)
class PushBinding:
    """How to wake a device that holds no socket (the spirit of RFC 8599's pn-provider/pn-prid/pn-param).

    `voip_token` is the PushKit token used for incoming calls; `alert_token` the regular APNs token used for
    missed-call notices. Tokens are secrets: never log them in full (see `signaling.log`).
    """

    platform: Platform
    bundle_id: str
    environment: PushEnvironment
    voip_token: str | None = None
    alert_token: str | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """A device a user has registered at some point, with its push binding if it has one.

    Device records outlive connections (see `Settings.device_ttl`), so a sleeping device can still be pushed.
    """

    user_id: str
    device_id: str
    push: PushBinding | None
    registered_at: float


@dataclass(frozen=True, slots=True)
class Binding:
    """A live registration: (user, device) is reachable over connection `conn_id` on process `node_id`.

    `expires_at` is wall-clock seconds; a binding past it is treated as absent even if the store has not yet
    garbage-collected it, so expiry follows the injected clock in every backend.
    """

    user_id: str
    device_id: str
    conn_id: str
    node_id: str
    expires_at: float


class CallPhase(StrEnum):
    """The coarse state of a call as the store records it (the core keeps the fine-grained one)."""

    RINGING = "ringing"
    ANSWERED = "answered"


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call as the store records it: who placed it, to whom, and which process owns its state machine."""

    call_id: str
    caller_user: str
    caller_device: str
    callee_user: str
    node_id: str
    phase: CallPhase
    created_at: float
    answered_by: str | None = None


@dataclass(frozen=True, slots=True)
class CallRef:
    """A call that wants a device when it next registers, on whichever node: it is being woken for the call
    (`party` False: offer it the call) or is a party of it (`party` True: re-attach it). `node_id` owns the
    call. The caller's id, name and video flag are kept for a pushed device so that, should the owner be gone,
    any node can still tell the device the call ended."""

    call_id: str
    node_id: str
    party: bool = False
    caller_id: str = ""
    caller_name: str | None = None
    video: bool = False


class NoticeKind(StrEnum):
    ENDED = "ended"  # a call this device was woken for ended before it connected: end the CallKit call
    MISSED = "missed"  # a call this device did not answer: for the app's call log


@dataclass(frozen=True, slots=True)
class Notice:
    """Something to tell a device the moment it next registers, kept until `expires_at`.

    `reason` is set for ENDED notices: one of `signaling.wire.CallKitReason`'s values.
    """

    kind: NoticeKind
    call_id: str
    caller_id: str
    caller_name: str | None
    video: bool
    at: float
    expires_at: float
    reason: str | None = None
