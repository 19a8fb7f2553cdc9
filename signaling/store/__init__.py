"""Registrations, presence and call records behind one small interface, with two backends.

`MemoryStore` is the embedded default (one process only); `RedisStore` lets any number of processes act as one.
Both pass the same contract suite in `tests/test_store_contract.py`.
"""

from signaling.store.base import CallOpened, Presence, Registered, Store, StoreUnavailable
from signaling.store.memory import MemoryStore

__all__ = ["CallOpened", "MemoryStore", "Presence", "Registered", "Store", "StoreUnavailable"]
