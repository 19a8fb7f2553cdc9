"""The embedded store: plain dicts in one process.

Good for a single-node deployment and for tests. Expiry follows the injected clock exactly as in `RedisStore`:
a binding, call record, device record, notice or push claim past its deadline is treated as absent on every
read, and the leftovers are swept out at most once per `SWEEP_INTERVAL` of clock time, on the next write.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from signaling.clock import Clock
from signaling.models import Binding, CallRecord, CallRef, Device, Notice
from signaling.store.base import MAX_NOTICES, CallOpened, Presence, Registered

__all__ = ["DEFAULT_DEVICE_TTL", "SWEEP_INTERVAL", "MemoryStore", "check_register_args"]

DEFAULT_DEVICE_TTL = 30 * 86400.0
"""A device record not re-registered for this long (seconds) is forgotten."""

SWEEP_INTERVAL = 60.0
"""Clock seconds between sweeps of expired entries (a sweep walks every entry once)."""


@dataclass(frozen=True, slots=True)
class _StoredCall:
    record: CallRecord
    expires_at: float


class MemoryStore:
    """A `Store` kept in this process's memory; it never raises `StoreUnavailable`.

    Device records expire `device_ttl` seconds after their `registered_at`, bindings and notices at their
    `expires_at`, call records and push claims `ttl` seconds after they were last written, all measured by
    `clock`. A device's notices go with it when it is forgotten or evicted, but not when its record merely
    expires: they have deadlines of their own (as in `RedisStore`, where this keeps both backends in step).
    """

    def __init__(self, clock: Clock, *, device_ttl: float = DEFAULT_DEVICE_TTL) -> None:
        if device_ttl <= 0:
            raise ValueError("device_ttl must be positive")
        self._clock = clock
        self._device_ttl = device_ttl
        self._devices: dict[str, dict[str, Device]] = {}
        self._bindings: dict[tuple[str, str], Binding] = {}
        self._calls: dict[str, _StoredCall] = {}
        # Per (user, device): oldest first by (`at`, insertion), at most MAX_NOTICES, none known to be expired.
        self._notices: dict[tuple[str, str], list[Notice]] = {}
        self._claims: dict[tuple[str, str], float] = {}  # (call_id, device_id) -> claim expiry
        # (user, device) -> call_id -> (the call, expiry).
        self._waking: dict[tuple[str, str], dict[str, tuple[CallRef, float]]] = {}
        self._alive: dict[str, float] = {}  # node id -> heartbeat expiry
        # Node id -> when its own beat was last found lapsed (see `heartbeat`).
        self._lapsed_at: dict[str, float] = {}
        self._next_sweep = clock.now() + SWEEP_INTERVAL

    async def start(self) -> None:
        """Nothing to connect to: always succeeds."""

    async def close(self) -> None:
        """Nothing to release; the data stays readable."""

    async def ping(self) -> bool:
        """Always True: the store is this process."""
        return True

    async def register(self, binding: Binding, device: Device, max_devices: int) -> Registered:
        """See `Store.register`. Raises `ValueError` if binding and device disagree or `max_devices < 1`."""
        check_register_args(binding, device, max_devices)
        now = self._clock.now()
        self._maybe_sweep(now)
        key = (binding.user_id, binding.device_id)
        previous = self._bindings.get(key)
        replaced = None
        if previous is not None and previous.conn_id != binding.conn_id and previous.expires_at > now:
            replaced = previous
        devices = self._devices.setdefault(device.user_id, {})
        devices[device.device_id] = device
        self._bindings[key] = binding
        notices = tuple(n for n in self._notices.pop(key, ()) if n.expires_at > now)
        live = sorted((until, c, ref) for c, (ref, until) in self._waking.get(key, {}).items() if until > now)
        waking = tuple(ref for _, _, ref in live)

        others: list[Device] = []
        for other in list(devices.values()):
            if other.device_id == device.device_id:
                continue
            if self._device_expired(other, now):
                self._forget(other.user_id, other.device_id, notices=False)
            else:
                others.append(other)
        excess = len(others) + 1 - max_devices
        if excess > 0:
            others.sort(key=lambda d: (d.registered_at, d.device_id))
            for evicted in others[:excess]:
                self._forget(evicted.user_id, evicted.device_id)
        return Registered(replaced=replaced, notices=notices, waking=waking)

    async def add_notices(self, user_id: str, notices: Sequence[tuple[str, Notice]]) -> None:
        """See `Store.add_notices`. Notices already expired are not kept."""
        now = self._clock.now()
        self._maybe_sweep(now)
        by_device: dict[str, list[Notice]] = {}
        for device_id, notice in notices:
            by_device.setdefault(device_id, []).append(notice)
        for device_id, new in by_device.items():
            key = (user_id, device_id)
            kept = _merge_notices(self._notices.get(key, ()), new, now)
            if kept:
                self._notices[key] = kept
            else:
                self._notices.pop(key, None)

    async def heartbeat(self, node_id: str, ttl: float, watch: Collection[str]) -> frozenset[str]:
        """See `Store.heartbeat`."""
        now = self._clock.now()
        previous = self._alive.get(node_id)
        self._alive[node_id] = now + ttl
        if previous is not None and previous <= now:
            self._lapsed_at[node_id] = now  # its own beat lapsed (a stalled process): others may have too
        if now - self._lapsed_at.get(node_id, -math.inf) < ttl:
            return frozenset()
        return frozenset(n for n in watch if self._alive.get(n, 0.0) <= now)

    async def take_notices(self, user_id: str, device_id: str) -> tuple[Notice, ...]:
        """See `Store.take_notices`."""
        now = self._clock.now()
        return tuple(n for n in self._notices.pop((user_id, device_id), ()) if n.expires_at > now)

    async def claim_push(
        self, call_id: str, device_id: str, ttl: float, *, waking: tuple[str, CallRef] | None = None
    ) -> bool:
        """See `Store.claim_push`. An expired claim counts as absent."""
        now = self._clock.now()
        self._maybe_sweep(now)
        if waking is not None:
            user_id, ref = waking
            self._waking.setdefault((user_id, device_id), {})[call_id] = (ref, now + ttl)
        key = (call_id, device_id)
        held = self._claims.get(key)
        if held is not None and held > now:
            return False
        self._claims[key] = now + ttl
        return True

    async def reject_token(self, user_id: str, device_id: str, token: str, invalid_since: float | None) -> bool:
        """See `Store.reject_token`. A push binding left with no token becomes None; the record keeps its
        `registered_at` (and so its expiry). An unknown or expired device has nothing to remove."""
        now = self._clock.now()
        self._maybe_sweep(now)
        devices = self._devices.get(user_id, {})
        device = devices.get(device_id)
        if device is None or self._device_expired(device, now) or device.push is None:
            return False
        if invalid_since is not None and device.registered_at > invalid_since:
            return False
        push = device.push
        voip = None if push.voip_token == token else push.voip_token
        alert = None if push.alert_token == token else push.alert_token
        if (voip, alert) == (push.voip_token, push.alert_token):
            return False
        new_push = (
            None
            if voip is None and alert is None
            else dataclasses.replace(push, voip_token=voip, alert_token=alert)
        )
        devices[device_id] = dataclasses.replace(device, push=new_push)
        return True

    async def unregister(self, user_id: str, device_id: str, conn_id: str) -> bool:
        """See `Store.unregister`. An expired binding is dropped but does not count as removed."""
        now = self._clock.now()
        self._maybe_sweep(now)
        key = (user_id, device_id)
        current = self._bindings.get(key)
        if current is None or current.conn_id != conn_id:
            return False
        del self._bindings[key]
        return current.expires_at > now

    async def refresh(self, bindings: Sequence[Binding]) -> list[Binding]:
        """See `Store.refresh`. A binding that has already expired is not revived here: it is returned."""
        now = self._clock.now()
        self._maybe_sweep(now)
        lost: list[Binding] = []
        for binding in bindings:
            key = (binding.user_id, binding.device_id)
            current = self._bindings.get(key)
            if current is None or current.expires_at <= now:
                lost.append(binding)
            elif current.conn_id == binding.conn_id:
                self._bindings[key] = binding
        return lost

    async def presence(self, user_id: str) -> Presence:
        """See `Store.presence`. Devices are ordered by device id; bindings follow their devices."""
        return self._presence(user_id, self._clock.now())

    async def forget_device(self, user_id: str, device_id: str) -> None:
        """See `Store.forget_device`. Forgetting an unknown device is not an error."""
        self._maybe_sweep(self._clock.now())
        self._forget(user_id, device_id)

    async def open_call(self, record: CallRecord, ttl: float) -> CallOpened:
        """See `Store.open_call`. An expired record with the same id counts as free."""
        now = self._clock.now()
        self._maybe_sweep(now)
        existing = self._calls.get(record.call_id)
        created = existing is None or existing.expires_at <= now
        if created:
            self._calls[record.call_id] = _StoredCall(record, now + ttl)
        return CallOpened(created=created, callee=self._presence(record.callee_user, now))

    async def update_call(
        self, record: CallRecord, ttl: float, *, parties: Sequence[tuple[str, str]] = ()
    ) -> None:
        """See `Store.update_call`."""
        now = self._clock.now()
        self._maybe_sweep(now)
        self._calls[record.call_id] = _StoredCall(record, now + ttl)
        ref = CallRef(record.call_id, record.node_id, party=True)
        for key in parties:
            self._waking.setdefault(key, {})[record.call_id] = (ref, now + ttl)

    async def get_call(self, call_id: str) -> CallRecord | None:
        """The call record, or None if it was never opened, was closed, or has expired."""
        stored = self._calls.get(call_id)
        if stored is None or stored.expires_at <= self._clock.now():
            return None
        return stored.record

    async def close_call(self, call_id: str, *, parties: Sequence[tuple[str, str]] = ()) -> None:
        """See `Store.close_call`."""
        self._calls.pop(call_id, None)
        for key in parties:
            calls = self._waking.get(key)
            if calls is not None:
                calls.pop(call_id, None)
                if not calls:
                    del self._waking[key]

    def _presence(self, user_id: str, now: float) -> Presence:
        devices = tuple(
            device
            for _, device in sorted(self._devices.get(user_id, {}).items())
            if not self._device_expired(device, now)
        )
        bindings = tuple(
            binding
            for device in devices
            if (binding := self._bindings.get((user_id, device.device_id))) is not None
            and binding.expires_at > now
        )
        return Presence(devices=devices, bindings=bindings)

    def _device_expired(self, device: Device, now: float) -> bool:
        return device.registered_at + self._device_ttl <= now

    def _forget(self, user_id: str, device_id: str, *, notices: bool = True) -> None:
        devices = self._devices.get(user_id)
        if devices is not None:
            devices.pop(device_id, None)
            if not devices:
                del self._devices[user_id]
        self._bindings.pop((user_id, device_id), None)
        self._waking.pop((user_id, device_id), None)
        if notices:
            self._notices.pop((user_id, device_id), None)

    def _maybe_sweep(self, now: float) -> None:
        # Reads filter by the clock, so sweeping is only about memory: amortised over writes, bounded by
        # what expired during one interval, and deterministic under a ManualClock (no background task).
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL
        for key in [k for k, b in self._bindings.items() if b.expires_at <= now]:
            del self._bindings[key]
        for call_id in [c for c, s in self._calls.items() if s.expires_at <= now]:
            del self._calls[call_id]
        for claim in [k for k, expires_at in self._claims.items() if expires_at <= now]:
            del self._claims[claim]
        for key, calls in list(self._waking.items()):
            for call_id in [c for c, (_, until) in calls.items() if until <= now]:
                del calls[call_id]
            if not calls:
                del self._waking[key]
        for key, pending in list(self._notices.items()):
            live = [n for n in pending if n.expires_at > now]
            if live:
                self._notices[key] = live
            else:
                del self._notices[key]
        stale = [
            (d.user_id, d.device_id)
            for devices in self._devices.values()
            for d in devices.values()
            if self._device_expired(d, now)
        ]
        for user_id, device_id in stale:
            self._forget(user_id, device_id, notices=False)


def check_register_args(binding: Binding, device: Device, max_devices: int) -> None:
    """Raise `ValueError` for `register` arguments that would corrupt a store (shared by both backends)."""
    if (binding.user_id, binding.device_id) != (device.user_id, device.device_id):
        raise ValueError("binding and device name different (user_id, device_id) pairs")
    if max_devices < 1:
        raise ValueError("max_devices must be at least 1")


def _merge_notices(pending: Iterable[Notice], new: Iterable[Notice], now: float) -> list[Notice]:
    """A device's notices after adding `new` to `pending` at `now`: expired ones dropped, oldest first by
    (`at`, insertion order), and only the newest `MAX_NOTICES` kept."""
    # sorted() is stable, so notices with equal `at` stay in insertion order (pending before new).
    live = sorted((n for n in (*pending, *new) if n.expires_at > now), key=lambda n: n.at)
    return live[-MAX_NOTICES:]
