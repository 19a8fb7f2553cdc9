"""The local APNs stand-in the tests run against; it lives in `push.local_apns` (`signaling demo` uses it too).

Re-exported here so that tests import it from the test package: `from tests.apns_server import ApnsServer`.
"""

from __future__ import annotations

from push.local_apns import KEY_ID, OK, TEAM_ID, Answer, ApnsPki, ApnsServer, RecordedRequest, make_pki

__all__ = ["KEY_ID", "OK", "TEAM_ID", "Answer", "ApnsPki", "ApnsServer", "RecordedRequest", "make_pki"]
