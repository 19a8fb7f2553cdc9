"""The store interface. Each method is one round trip to the backend, so a call setup costs at most three."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from signaling.errors import StoreUnavailable
from signaling.models import Binding, CallRecord, CallRef, Device, Notice

__all__ = ["CallOpened", "Presence", "Registered", "Store", "StoreUnavailable"]


MAX_NOTICES: Final = 50
"""Notices kept per device; a device offline for long keeps the 50 most recent."""


@dataclass(frozen=True, slots=True)
class Presence:
    """What the store knows of a user: every known device (live or asleep) and the live bindings.

    `devices` is empty for a user who never registered (the server answers 404); a user with devices but no
    bindings is offline (480, or a push wake-up).
    """

    devices: tuple[Device, ...]
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class CallOpened:
    """Result of `Store.open_call`: whether the call id was free, and the callee's presence at that moment."""

    created: bool
    callee: Presence


@dataclass(frozen=True, slots=True)
class Registered:
    """Result of `Store.register`.

    `replaced`: the binding this registration replaced, when it belonged to another connection and had not
    expired. `notices`: the device's pending notices (not expired), oldest first; they are removed from the store
    by this same call, so each is handed out once. `waking`: see the field.
    """

    replaced: Binding | None
    notices: tuple[Notice, ...] = ()
    # Calls the device was pushed for or is a party of, ordered by expiry then call id: the registering node
    # asks each owner to offer or re-attach the call (see `claim_push` and `update_call`).
    waking: tuple[CallRef, ...] = ()


class Store(Protocol):
    """Registrations, presence and call records.

    Every method raises `StoreUnavailable` when the backend cannot be reached. Expiry follows the clock the store
    was built with: a binding whose `expires_at` has passed is never returned, whatever the backend still holds.
    """

    async def start(self) -> None:
        """Connect and check the backend answers; raise `StoreUnavailable` otherwise."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the backend answers now (for `/readyz`)."""
        ...

    async def register(self, binding: Binding, device: Device, max_devices: int) -> Registered:
        """Atomically record `device` (with its push binding), make `binding` its live registration, and take
        the device's pending notices.

        `Registered.replaced` is the binding this replaced when it belonged to another connection and had not
        expired, so the caller can close that connection: a device is never bound twice. When the user would have
        more than `max_devices` device records, the least recently registered other devices are forgotten.
        """
        ...

    async def add_notices(self, user_id: str, notices: Sequence[tuple[str, Notice]]) -> None:
        """Queue notices for devices of one user, as (device_id, notice) pairs; each expires at its own
        `expires_at`. At most `MAX_NOTICES` are kept per device (the oldest are dropped)."""
        ...

    async def heartbeat(self, node_id: str, ttl: float, watch: Collection[str]) -> frozenset[str]:
        """Mark `node_id` alive for `ttl` seconds, and return which of `watch` are not alive (never were, or
        missed their heartbeats): one round trip. Nodes heartbeat every third of their `ttl`. When `node_id`'s
        own previous beat has lapsed (the store lost its data in a Redis restart, or was out of reach, or this
        process stalled), others may have lapsed for the same reason: for `ttl` from then none counts as gone."""
        ...

    async def take_notices(self, user_id: str, device_id: str) -> tuple[Notice, ...]:
        """Take the device's pending notices (not expired), oldest first, removing them: each notice is handed
        out once, by this or by `register`, whichever runs first. For a device that registered while its
        notices were being written."""
        ...

    async def claim_push(
        self, call_id: str, device_id: str, ttl: float, *, waking: tuple[str, CallRef] | None = None
    ) -> bool:
        """True the first time (call, device) is claimed within `ttl`, False ever after: the guard that makes a
        VoIP push for a call reach a device at most once, whichever process sends it.

        With `waking` = (user_id, the call), the same round trip also records that the device is being woken
        for the call, for `ttl`, so whichever node the device registers on learns it (`Registered.waking`).
        """
        ...

    async def reject_token(self, user_id: str, device_id: str, token: str, invalid_since: float | None) -> bool:
        """Remove `token` from the device's push binding (VoIP or alert, whichever it is), unless the device
        registered after `invalid_since` (APNs's 410 timestamp: a token registered later is kept). True if
        removed."""
        ...

    async def unregister(self, user_id: str, device_id: str, conn_id: str) -> bool:
        """Remove the live binding of (user, device) if it still belongs to `conn_id`; True if removed."""
        ...

    async def refresh(self, bindings: Sequence[Binding]) -> list[Binding]:
        """Move each binding's expiry to its new `expires_at`, for bindings still owned by their connection.

        Returns the bindings the store had lost: no live binding at all for their device (it expired, or the
        store restarted empty), so the caller can register them again. A binding another connection owns now is
        neither refreshed nor returned: the device moved."""
        ...

    async def presence(self, user_id: str) -> Presence: ...

    async def forget_device(self, user_id: str, device_id: str) -> None:
        """Drop a device record and any binding it has (for example when APNs rejects its token)."""
        ...

    async def open_call(self, record: CallRecord, ttl: float) -> CallOpened:
        """Create the call record if its id is free, and read the callee's presence, in one round trip."""
        ...

    async def update_call(
        self, record: CallRecord, ttl: float, *, parties: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Create or replace the call record; it expires `ttl` seconds from now. Each (user_id, device_id) in
        `parties` is recorded, for as long, as a party of the call that `record.node_id` owns, so that when it
        registers again on any node it is re-attached (`Registered.waking`), all in one round trip."""
        ...

    async def get_call(self, call_id: str) -> CallRecord | None: ...

    async def close_call(self, call_id: str, *, parties: Sequence[tuple[str, str]] = ()) -> None:
        """Drop the call record, and the call from each of `parties`' records (see `update_call` and
        `claim_push`), in one round trip. Closing an unknown call is not an error."""
        ...
