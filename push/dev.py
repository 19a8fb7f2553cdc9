"""A push provider for development: records every push, answers DELIVERED, lets a demo or test react to pushes.

Used when no APNs credentials are configured. Nothing leaves the process: a simulated device can subscribe (or
`wait_for` a push) and "wake up" when one is recorded; another process sees the records through the server's
`GET /dev/pushes` (see `signaling.client.dev_pushes`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from push.base import IncomingCallPush, MissedCallAlert, Outcome, PushResult
from push.payload import incoming_call_payload, missed_call_payload
from signaling.log import get_logger

log = get_logger("push.dev")


@dataclass(frozen=True, slots=True)
class RecordedPush:
    request: IncomingCallPush | MissedCallAlert
    result: PushResult
    # 1, 2, 3, ... in recording order, so a reader can ask for what came after the last one it saw.
    index: int = 0

    def describe(self) -> dict[str, Any]:
        """The push as APNs would have received it (headers that matter and the payload), without the token."""
        request = self.request
        if isinstance(request, IncomingCallPush):
            kind, topic, push_type = "incoming_call", f"{request.bundle_id}.voip", "voip"
            payload, expiration = incoming_call_payload(request), int(request.deadline)
        else:
            kind, topic, push_type = "missed_call", request.bundle_id, "alert"
            payload, expiration = missed_call_payload(request), None
        return {
            "index": self.index,
            "kind": kind,
            "call_id": request.call_id,
            "user_id": request.user_id,
            "device_id": request.device_id,
            "environment": request.environment.value,
            "apns_topic": topic,
            "apns_push_type": push_type,
            "apns_expiration": expiration,
            "apns_id": self.result.apns_id,
            "payload": json.loads(payload) if payload else None,
        }


class DevelopmentProvider:
    """Records pushes (the last `max_records`) instead of sending them; every push is DELIVERED."""

    name = "development"

    def __init__(self, *, max_records: int = 1000) -> None:
        self._records: deque[RecordedPush] = deque(maxlen=max_records)
        self._subscribers: set[asyncio.Queue[RecordedPush]] = set()
        self._counter = itertools.count(1)

    @property
    def records(self) -> list[RecordedPush]:
        """The recorded pushes, oldest first."""
        return list(self._records)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()

    async def send_incoming_call(self, push: IncomingCallPush) -> PushResult:
        return self._record(push)

    async def send_missed_call(self, alert: MissedCallAlert) -> PushResult:
        return self._record(alert)

    def subscribe(self, maxsize: int = 100) -> asyncio.Queue[RecordedPush]:
        """A queue that receives every push recorded from now on (a full queue drops new pushes)."""
        queue: asyncio.Queue[RecordedPush] = asyncio.Queue(maxsize)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[RecordedPush]) -> None:
        self._subscribers.discard(queue)

    async def wait_for(self, predicate: Callable[[RecordedPush], bool], timeout: float) -> RecordedPush:
        """The first push, already recorded or still to come, matching `predicate`. Raises `TimeoutError`."""
        queue = self.subscribe(maxsize=0)
        try:
            for record in self._records:
                if predicate(record):
                    return record
            async with asyncio.timeout(timeout):
                while True:
                    record = await queue.get()
                    if predicate(record):
                        return record
        finally:
            self.unsubscribe(queue)

    def _record(self, request: IncomingCallPush | MissedCallAlert) -> PushResult:
        result = PushResult(outcome=Outcome.DELIVERED, apns_id=str(uuid.uuid4()), status=200)
        record = RecordedPush(request, result, next(self._counter))
        self._records.append(record)
        log.info(
            "push.recorded",
            kind="incoming_call" if isinstance(request, IncomingCallPush) else "missed_call",
            call_id=request.call_id,
            user_id=request.user_id,
            device_id=request.device_id,
            apns_id=result.apns_id,
            environment=str(request.environment),
            token=request.token,
        )
        for queue in list(self._subscribers):
            if not queue.full():
                queue.put_nowait(record)
        return result
