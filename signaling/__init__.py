"""SIP-lite: SIP-flavoured VoIP signaling over WebSocket with push wake-up."""

__version__ = "0.1.0"
