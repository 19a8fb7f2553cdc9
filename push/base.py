"""The push provider interface: what the server asks of APNs (or any provider), and every answer, classified.

A provider sends two kinds of push: a VoIP push for a new incoming call (PushKit; iOS must turn it into a CallKit
call at once) and an alert push for a missed call. Every attempt ends in one `PushResult` whose `outcome` is one
of four: delivered, token rejected (forget the token), temporary (may succeed later; the provider already retried
what was safe to retry within the deadline) or permanent (configuration or payload problem; do not retry).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from signaling.models import PushEnvironment


class Outcome(StrEnum):
    DELIVERED = "delivered"
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 (not a password)
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class PushResult:
    outcome: Outcome
    apns_id: str
    # HTTP status of the last answer, or None when none came (timeout, connection lost, overload).
    status: int | None = None
    # APNs `reason` (e.g. "BadDeviceToken"), or our own: "timeout", "connection", "overloaded", "deadline".
    reason: str | None = None
    # For 410 Unregistered: when APNs last knew the token valid (epoch seconds). A token registered later is kept.
    token_invalid_since: float | None = None
    attempts: int = 1
    # Seconds from the first attempt to the outcome.
    latency: float = 0.0


@dataclass(frozen=True, slots=True)
class IncomingCallPush:
    """A VoIP push announcing a new incoming call. Its lifetime on APNs ends at `deadline` (the ring deadline)."""

    token: str
    bundle_id: str
    environment: PushEnvironment
    call_id: str
    caller_id: str
    caller_name: str | None
    video: bool
    sent_at: float
    deadline: float
    # Whose device this wakes: for logs and the development recorder, never sent to APNs.
    user_id: str = ""
    device_id: str = ""


@dataclass(frozen=True, slots=True)
class MissedCallAlert:
    """A regular (alert) push telling the user they missed a call. Never a VoIP push."""

    token: str
    bundle_id: str
    environment: PushEnvironment
    call_id: str
    caller_id: str
    caller_name: str | None
    at: float
    user_id: str = ""
    device_id: str = ""


class PushProvider(Protocol):
    """Sends pushes. `send_*` never raise for a delivery problem: every failure is a `PushResult`."""

    name: str

    async def start(self) -> None:
        """Connect / check configuration. Raises `PushConfigError` on bad credentials or settings."""
        ...

    async def close(self) -> None: ...

    async def send_incoming_call(self, push: IncomingCallPush) -> PushResult: ...

    async def send_missed_call(self, alert: MissedCallAlert) -> PushResult: ...


class PushConfigError(Exception):
    """Push configuration is missing or wrong (bad key file, key id, team id, endpoint); names the setting.

    `setting` is the configuration field at fault (e.g. "key_file"), when there is one, so the server can map it
    to its own setting name.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting
