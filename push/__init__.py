"""Push providers (APNs VoIP wake-up): see issue 3."""
