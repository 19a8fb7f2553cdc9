"""Push providers (APNs VoIP wake-up): see issue 3.

`ApnsProvider` sends through APNs (aioapns); `DevelopmentProvider` records pushes in memory when no APNs
credentials are configured. Both implement `PushProvider`.
"""

from push.apns import ApnsConfig, ApnsProvider
from push.base import (
    IncomingCallPush,
    MissedCallAlert,
    Outcome,
    PushConfigError,
    PushProvider,
    PushResult,
)
from push.dev import DevelopmentProvider, RecordedPush

__all__ = [
    "ApnsConfig",
    "ApnsProvider",
    "DevelopmentProvider",
    "IncomingCallPush",
    "MissedCallAlert",
    "Outcome",
    "PushConfigError",
    "PushProvider",
    "PushResult",
    "RecordedPush",
]
