"""Shared state of a loragate deployment: the ``StateStore`` protocol and its stores.

* ``MemoryStore``: embedded, one gateway process (default; also the simulator's store).
* ``ResilientStore(RedisStore.from_url(url))``: several gateway instances sharing Redis,
  serving from a local mirror while Redis is unreachable.
* ``residency``: the pure shadow-residency transitions (GPU-slot and CPU-cache LRUs).
"""

from loragate.state.keys import KeySpace, Ttls
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore, run_maintenance
from loragate.state.store import ReplicaRecord, StateStore, StateUnavailableError, StateView

__all__ = [
    "KeySpace",
    "MemoryStore",
    "RedisStore",
    "ReplicaRecord",
    "ResilientStore",
    "StateStore",
    "StateUnavailableError",
    "StateView",
    "Ttls",
    "run_maintenance",
]
