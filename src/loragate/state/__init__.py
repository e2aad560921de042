"""Shared state of a loragate deployment: the ``StateStore`` protocol and its stores.

* ``MemoryStore``: embedded, one gateway process (default; also the simulator's store).
* ``ResilientStore(RedisStore.from_url(url))``: several gateway instances sharing Redis,
  serving from a local mirror while Redis is unreachable.
* ``residency``: the pure shadow-residency transitions (GPU-slot and CPU-cache LRUs).

Wiring in the gateway (composition root)::

    store = ResilientStore(RedisStore.from_url(url)) if url else MemoryStore()
    await store.start()                      # ResilientStore only; never raises
    task = asyncio.create_task(run_maintenance(store))   # cancel in cleanup, then close()
    # per request (2 Redis round trips in total, 0 for the view):
    view = store.view()                      # sync; MemoryStore.view() likewise
    snapshots = view.apply_to(pool_snapshots)           # fills in_flight + residency
    await store.begin_request(replica, adapter, request_id, time.time())
    try: ... proxy ...
    finally: await store.end_request(replica, request_id)
    # /health: store.degraded; /metrics: store.error_count
"""

from loragate.state.keys import KeySpace, Ttls
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore, run_maintenance
from loragate.state.store import (
    GatewayStore,
    RefusalMap,
    ReplicaRecord,
    SharedRefusal,
    StateStore,
    StateUnavailableError,
    StateView,
    StoppingHold,
    StoppingMap,
    TombstoneMap,
)

__all__ = [
    "GatewayStore",
    "KeySpace",
    "MemoryStore",
    "RedisStore",
    "RefusalMap",
    "ReplicaRecord",
    "ResilientStore",
    "SharedRefusal",
    "StateStore",
    "StateUnavailableError",
    "StateView",
    "StoppingHold",
    "StoppingMap",
    "TombstoneMap",
    "Ttls",
    "run_maintenance",
]
