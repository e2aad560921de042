"""The gateway's side of the shared state: one object between the proxy, the replica pool and
the ``GatewayStore`` (``MemoryStore`` for one instance, ``ResilientStore`` over Redis for many).

Hot path (per routed request)::

    in_flight_of(r), residency_of(r)    # routing's view: local reads, no I/O
    lease = await begin(r, adapter)     # 1 Redis round trip: lease + residency touch + demand
    try: ... proxy ...
    finally: end(r, adapter, lease)     # 1 Redis round trip, sent in the background

``end`` does not make the client wait for Redis: the response (a non-streaming body is sent
after the ``finally``) goes out while the lease release travels in a task of its own (the
embedded store releases at once, without a task). Releases are ordered after their ``begin``
because ``begin`` is awaited before the request is proxied.

Off the hot path: the pool reports every poll (``replica_polled``: settings, health and the
``/v1/models`` set, reconciled into the shadow residency) and every admin load/unload; the
background loop (:meth:`run`) keeps the store maintained (lease renewal, refresh from Redis,
reconnects) and calls ``on_adapters`` when the shared adapter registry changed (another
instance's admin API call).

Adapter-load refusals (``backends.refusals``): this object is the pool's refusal sink. Each
refusal recorded or forgotten by this instance is written to the store in the background, in
order (a refused load costs no Redis round trip on the request's path; routed requests still
cost 2), and each round of the background loop hands the store's refusals (refreshed with the
rest of the shared view, 0 extra round trips) back to the pool, unless writes of ours are still
queued (the store would not show them yet). With Redis down the store serves its local view,
which holds our refusals and the shared ones it last saw. The embedded store (one process)
shares nothing: the pool's own record is the only one. Either way a refusal also takes the
adapter out of that replica's shadow residency, which the refused request had touched, in the
same atomic write as the refusal (``StateStore.record_refusal``): no instance's refresh sees the
refusal with the adapter still resident there, or the reverse.

Drained replicas (``POST /admin/replicas/{id}/drain``): :meth:`drain` and :meth:`undrain` write
the store (the mirror at once, Redis before they return) and hand the drains to the pool
(``on_drains``: ``ReplicaPool.set_draining``), as does each round of :meth:`run` (another
instance's drain, at its next refresh; an instance that started while Redis was down, once
it is back) and :meth:`sync_drains` at start-up (drains kept in Redis across restarts). A
drain lasts until it is undrained: a reload that removes the replica from this instance's
config leaves it in force, as other instances may still route there (their configs not
reloaded yet), and a replica added back under that id comes back drained.

Replicas shutting down (vLLM's drain under ``--shutdown-timeout``: ``/health`` 200, new requests
refused with a 500; ``ReplicaPool.report_stopping``): the pool's hold is shared like a refusal.
The instance whose request was refused writes the hold to the store in the background
(``replica_stopping``; a TTL of the pool's ``stopping_hold_s``, so a crashed instance leaves
nothing behind), and each round of :meth:`run` hands the store's holds to the pool
(``on_stopping``: ``ReplicaPool.adopt_stopping``; 0 extra round trips, they ride the refresh),
so the other instances stop routing there at their next refresh instead of each paying a
retry to learn it. A poll that finds the replica gone ends the hold here and in the store
(``replica_stopping_ended``), and so on every instance; the hold lapses everywhere at its TTL.
With Redis down the store's local view keeps this instance's holds. The embedded store
shares nothing: the pool's hold is the only one.

Unloads by other instances: the pool's view of what each replica has registered comes from
its own polls and loads; another instance's unload (its ``DELETE``, its planner) reaches the
shared residency at once (written before its call returns) and this instance's mirror at its
next refresh, and each round of :meth:`run` hands the pool what the shared residency dropped
since the round before (``on_unloads``: ``ReplicaPool.forget_unloaded``), so the pool stops
counting on it there before its next poll (0 extra round trips).

Adapters of the config file (``state.definitions``): instances whose files define one name
with another path or rank would each make the replicas load their own. This object claims the
file's definitions in the store (at :meth:`start`, after a reload changed them, when the
store's version moves; renewed every ``lease_renew_s``, by one lease key on Redis when they
are all in force as the file says) and serves the definitions in force
(:meth:`config_adapters`, what the catalog is built from); a conflict is logged once as an
ERROR (the ones a claim round finds together: one summary line naming the count and the first
five, each at DEBUG) and shown by :meth:`definition_conflicts` and :meth:`status` (and counted in
``loragate_adapter_definition_conflicts``). A name registered through the admin API before a
config file defined it stays the registration's for every instance, this one too (the
reverse of the admin API's 409 for a name a file defines: whoever holds a name first keeps
it); deleting the registration puts the file's definition in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from loragate.backends.refusals import Refusals
from loragate.core.clock import Clock, WallClock
from loragate.core.config import ReplicaConfig, StateConfig
from loragate.core.types import AdapterId, AdapterSpec, ReplicaId, ReplicaSnapshot, Residency
from loragate.gateway.inflight import InFlightTracker
from loragate.state import (
    GatewayStore,
    KeySpace,
    MemoryStore,
    RedisStore,
    ReplicaRecord,
    ResilientStore,
    Ttls,
)
from loragate.state.definitions import REGISTERED, AdapterDefinition, DefinitionClaim, InForce
from loragate.state.residency import capacities

log = logging.getLogger(__name__)

AdaptersCallback = Callable[[Mapping[AdapterId, AdapterSpec]], None]
DrainsCallback = Callable[[Collection[ReplicaId]], None]
StoppingCallback = Callable[[Mapping[ReplicaId, tuple[str, float]]], None]
# Returns what it kept (still counted as registered: a load of its own may postdate the read).
UnloadsCallback = Callable[
    [Mapping[ReplicaId, frozenset[AdapterId]]], Mapping[ReplicaId, frozenset[AdapterId]]
]

# A hold of a replica shutting down is written again at most this often (seconds) by one
# instance: the requests already sent there come back refused one after the other.
_STOPPING_REWRITE_S = 1.0
# ``_loaded_since``'s mark of a load whose store write has not ended yet.
_WRITING = -2


def build_store(config: StateConfig, *, clock: Clock | None = None) -> GatewayStore:
    """The store the ``state:`` section asks for (Redis is not contacted here); ``clock``
    times it (the Redis store's refreshes and reconnect backoff; default: the wall clock)."""
    ttls = Ttls(
        lease_ttl_s=config.lease_ttl_s,
        lease_renew_s=config.lease_renew_s,
        refresh_s=config.refresh_s,
        tombstone_ttl_s=config.tombstone_ttl_s,
        retry_max_s=config.reconnect_max_backoff_s,
        demand_retention_s=config.demand_retention_s,
    )
    if config.backend == "memory":
        return MemoryStore(ttls=ttls, clock=clock)
    assert config.redis_url is not None  # validated by the config loader
    remote = RedisStore.from_url(
        config.redis_url,
        op_timeout_s=config.op_timeout_s,
        keys=KeySpace(prefix=config.key_prefix),
        ttls=ttls,
        instance_id=instance_name(),
    )
    return ResilientStore(remote, clock=clock, outage_warning_s=config.outage_warning_s)


def instance_name() -> str:
    """This gateway instance's id in the shared store (its leases, its adapter-definition
    claims): host, process id and a random suffix, so an operator can tell who is who."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:4]}"


class SharedState:
    """Hot-path reads and writes of the shared state, plus the pool's and the admin API's
    bookkeeping. ``backend`` is ``memory`` or ``redis`` (for /health)."""

    __slots__ = (
        "_claim_due",
        "_claimed_at_s",
        "_claimed_version",
        "_clock",
        "_config_specs",
        "_conflicts",
        "_definitions_changed",
        "_drains_seen",
        "_ends",
        "_in_force",
        "_inflight",
        "_lease_ids",
        "_loaded_since",
        "_maintenance_interval_s",
        "_missing",
        "_pool_writer",
        "_pool_writes",
        "_previous",
        "_reads",
        "_records",
        "_refusals",
        "_registered_seen",
        "_seen_adapters",
        "_stopping_seen",
        "_stopping_unwritten",
        "_stopping_written",
        "_sync",
        "_unloads_kept",
        "backend",
        "in_flight_of",
        "on_adapters",
        "on_drains",
        "on_stopping",
        "on_unloads",
        "residency_of",
        "store",
    )

    def __init__(
        self,
        store: GatewayStore,
        inflight: InFlightTracker,
        *,
        backend: str = "memory",
        maintenance_interval_s: float = 0.05,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self._clock: Clock = clock or WallClock()
        self.backend = backend
        self._inflight = inflight
        self._maintenance_interval_s = maintenance_interval_s
        # Bound methods, looked up once: routing reads them per replica per request.
        self.in_flight_of: Callable[[ReplicaId], int] = store.in_flight_of
        self.residency_of: Callable[[ReplicaId], Residency] = store.residency_of
        self._lease_ids = itertools.count(1)
        self._ends: set[asyncio.Task[None]] = set()
        # The embedded store never suspends: the proxy begins and ends through plain calls.
        self._sync: MemoryStore | None = store if type(store) is MemoryStore else None
        self._records: dict[ReplicaId, ReplicaRecord] = {}
        self._missing: dict[ReplicaId, frozenset[AdapterId]] = {}
        self._seen_adapters: Mapping[AdapterId, AdapterSpec] | None = None
        self.on_adapters: AdaptersCallback | None = None
        # Told the drained replicas whenever they change (the pool's ``set_draining``).
        self.on_drains: DrainsCallback | None = None
        self._drains_seen: Mapping[ReplicaId, float] | None = None
        # The pool's refusals (shared only through a store other than the embedded one), and
        # the store writes about what the pool learnt (refusals, holds of replicas shutting
        # down) not done yet, oldest first.
        self._refusals: Refusals | None = None
        self._pool_writes: deque[Callable[[], Awaitable[None]]] = deque()
        self._pool_writer: asyncio.Task[None] | None = None
        # Told the holds of replicas shutting down that every instance keeps (the pool's
        # ``adopt_stopping``; not with the embedded store): replica -> (error, seconds left).
        self.on_stopping: StoppingCallback | None = None
        self._stopping_seen = False  # the last holds handed to on_stopping were not none
        # Told the adapters the shared residency dropped from a replica since the last round
        # (the pool's ``forget_unloaded``; not with the embedded store), and what it held then.
        self.on_unloads: UnloadsCallback | None = None
        self._registered_seen: dict[ReplicaId, frozenset[AdapterId]] = {}
        # What ``on_unloads`` kept, handed again while the shared residency still lacks it.
        self._unloads_kept: Mapping[ReplicaId, frozenset[AdapterId]] = {}
        # This instance's loads not handed to ``on_unloads`` yet (a load and another
        # instance's unload may both fall between two rounds: the shared view never showed it
        # there), each with the store's ``read_mark`` once its write was done: until a refresh
        # begun after it, the shared view may lack the load for being read before the write.
        self._loaded_since: dict[tuple[ReplicaId, AdapterId], int] = {}
        self._reads: ResilientStore | None = store if isinstance(store, ResilientStore) else None
        # Replica -> when (``clock``) this instance last wrote its hold (one write a second
        # at most while the requests already sent there come back refused), and the hold
        # reported since that write and not written yet: (error, hold_s, when reported).
        self._stopping_written: dict[ReplicaId, float] = {}
        self._stopping_unwritten: dict[ReplicaId, tuple[str, float, float]] = {}
        # Adapters of this instance's config file and the definitions in force for them
        # (``state.definitions``): see :meth:`set_config_adapters`.
        self._config_specs: dict[AdapterId, AdapterSpec] = {}
        self._previous: dict[AdapterId, AdapterDefinition] = {}
        self._in_force: dict[AdapterId, InForce] = {}
        # name -> (this file's definition, the one in force) of each conflict reported
        self._conflicts: dict[AdapterId, tuple[AdapterDefinition, AdapterDefinition]] = {}
        self._claim_due = False
        self._claimed_version: int | None = None
        self._claimed_at_s = -math.inf
        self._definitions_changed = False

    # -- hot path ---------------------------------------------------------------------------

    @property
    def sync(self) -> bool:
        """True if :meth:`begin_now` may be used instead of :meth:`begin` (embedded store)."""
        return self._sync is not None

    def begin_now(self, replica_id: ReplicaId, adapter: AdapterId | None) -> str:
        """:meth:`begin` for the embedded store, without a coroutine (only if :attr:`sync`)."""
        store = self._sync
        assert store is not None
        lease = str(next(self._lease_ids))
        self._inflight.acquire(replica_id, adapter)
        try:
            store.begin_now(replica_id, adapter, lease, time.time())
        except BaseException:
            self.end(replica_id, adapter, lease)
            raise
        return lease

    async def begin(self, replica_id: ReplicaId, adapter: AdapterId | None) -> str:
        """A request was routed to ``replica_id``: count it in flight (this instance's counts
        at once, the shared ones in the same round trip as the residency touch and demand
        count). Returns the lease id to pass to :meth:`end`."""
        lease = str(next(self._lease_ids))
        self._inflight.acquire(replica_id, adapter)
        try:
            await self.store.begin_request(replica_id, adapter, lease, time.time())
        except BaseException:
            self.end(replica_id, adapter, lease)
            raise
        return lease

    def end(self, replica_id: ReplicaId, adapter: AdapterId | None, lease: str) -> None:
        """The request finished (any outcome): release its lease in the background."""
        self._inflight.release(replica_id, adapter)
        if self._sync is not None:  # the embedded store: at once, without a task
            self._sync.end_now(replica_id, lease)
            return
        coro = self.store.end_request(replica_id, lease)
        # Redis: a task of its own (timeouts inside the store bind to the current task, so
        # the release must not start in the request's task and continue elsewhere).
        task = asyncio.ensure_future(coro)
        self._ends.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._ends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("state: releasing a lease failed: %r", task.exception())

    # -- pool listener (backends.pool_types.PoolListener) -------------------------------------

    async def register_replicas(self, replicas: tuple[ReplicaConfig, ...]) -> None:
        """Put the configured replicas in the shared registry (before the first poll)."""
        for cfg in replicas:
            if cfg.replica_id in self._records:
                continue
            record = ReplicaRecord(
                replica_id=cfg.replica_id,
                url=cfg.url,
                healthy=False,
                updated_s=time.time(),
                **({"settings": cfg.settings} if cfg.settings is not None else {}),
            )
            await self.store.upsert_replica(record)
            self._records[cfg.replica_id] = record

    async def replica_polled(
        self,
        snapshot: ReplicaSnapshot,
        *,
        models_seen: bool,
        loading: frozenset[AdapterId] = frozenset(),
    ) -> None:
        """A poll finished: keep the registry's settings and health current, and reconcile
        the shadow residency with the ``/v1/models`` set (``snapshot.residency.registered``).

        An adapter the shared residency holds is dropped only when two polls in a row did not
        list it: another instance may have loaded it after this poll read ``/v1/models``
        (a real unload is thus noticed one poll later; our own unloads are recorded at once).
        Adapters this gateway is still loading there (``loading``) are never dropped: a slow
        load can span two polls, and the request that caused it has already been routed.
        """
        rid = snapshot.replica_id
        old = self._records.get(rid)
        now = time.time()
        if old is None or old.settings != snapshot.settings or old.url != snapshot.url:
            record = ReplicaRecord(
                replica_id=rid,
                url=snapshot.url,
                settings=snapshot.settings,
                healthy=snapshot.healthy,
                updated_s=now,
            )
            await self.store.upsert_replica(record)
            self._records[rid] = record
            if old is not None and old.settings != snapshot.settings:
                await self._fit_residency(rid)
        elif old.healthy != snapshot.healthy:
            await self.store.set_replica_health(rid, snapshot.healthy, now)
            self._records[rid] = ReplicaRecord(
                replica_id=rid,
                url=old.url,
                settings=old.settings,
                healthy=snapshot.healthy,
                updated_s=now,
            )
        if models_seen:
            listed = snapshot.residency.registered | loading
            missing = self.store.residency_of(rid).registered - listed
            keep = missing - self._missing.get(rid, frozenset())
            self._missing[rid] = missing
            await self.store.reconcile(rid, listed | keep)

    async def _fit_residency(self, replica_id: ReplicaId) -> None:
        """The replica's settings changed (vLLM reported another max_lora than the config's):
        a shadow residency holding more adapters than its new slots is cut to them now, not
        at the next request routed there. Touching its most recent GPU adapter again does
        that on every store (the touch evicts from the least recent end, with the settings
        just written; the order of the rest stays)."""
        res = self.store.residency_of(replica_id)
        gpu_cap, cpu_cap = capacities(self._records[replica_id].settings)
        if res.gpu and (len(res.gpu) > gpu_cap or len(res.cpu) > cpu_cap):
            await self.store.record_load(replica_id, res.gpu[-1])

    async def adapter_loaded(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        """The pool's load (on demand for a routed request, an admin registration, an in-place
        reload) succeeded: vLLM put the adapter in a GPU slot too, recorded after the load.
        Routing may already have touched it, but a poll of another instance that could not list
        it yet may have dropped it meanwhile; this puts it back where the replica has it."""
        track = self._sync is None and self.on_unloads is not None  # (what sync_unloads reads)
        if track:
            self._loaded_since[replica_id, adapter] = _WRITING
        await self.store.record_load(replica_id, adapter)
        if track:
            self._loaded_since[replica_id, adapter] = (
                -1 if self._reads is None else self._reads.read_mark()
            )

    async def adapter_unloaded(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        await self.store.record_unload(replica_id, adapter)

    def paths_in_force(self, adapter: AdapterId) -> Awaitable[frozenset[str]] | None:
        """The store's answer (one round trip; before an in-place reload by the poller, not
        on the routed requests' path); None with the embedded store (nothing shared)."""
        if self._sync is not None:
            return None
        return self.store.paths_in_force(adapter)

    def retired_adapters(self) -> Collection[AdapterId]:
        """Adapters deleted through the admin API lately (the store's tombstones, refreshed
        with the rest of the shared view: no extra round trip)."""
        return self.store.tombstones().keys()

    async def still_retired(self, adapter: AdapterId) -> bool:
        """Whether ``adapter`` is still deleted in the store (one read, before a tombstone
        unload: not on the routed requests' path). Registered again meanwhile (by another
        instance, since this one's last refresh): this instance's view adopts it at once
        (:meth:`find_adapter`) and it is not unloaded."""
        return await self.find_adapter(adapter) is None

    def forget_replica(self, replica_id: ReplicaId) -> None:
        """The replica left this instance's config (reload). Its shared entry stays: other
        instances may still route to it."""
        self._records.pop(replica_id, None)
        self._missing.pop(replica_id, None)

    # -- drained replicas (admin API) ---------------------------------------------------------

    def drains(self) -> Mapping[ReplicaId, float]:
        """The drained replicas (every instance's, as of the last refresh): id -> since (epoch
        seconds). Replicas no longer in this instance's config included."""
        return self.store.drains()

    def drain_not_seen_by(self, replica_id: ReplicaId) -> list[dict[str, Any]]:
        """The other gateway instances that have not read the shared state since the
        replica's drain began (as of this instance's last refresh): cut off from Redis (each
        one's /health says degraded), they still route there by what they last read, and
        their requests there are not counted in ``in_flight``; or gone (crashed: listed for
        ``Ttls.reader_ttl_s``, 5 min; one stopped gracefully is not). Empty if the replica
        is not drained, or with one instance."""
        since = self.store.drains().get(replica_id)
        if since is None:
            return []
        now = time.time()
        return [
            {"instance": instance, "last_read_s_ago": round(max(0.0, now - last), 1)}
            for instance, last in sorted(self.store.readers_before(since).items())
        ]

    def registered_replica(self, replica_id: ReplicaId) -> ReplicaRecord | None:
        """The replica's entry in the shared registry: any instance's config put it there
        (this one's too, before a reload removed it), or None."""
        return self.store.view().replicas.get(replica_id)

    async def drain(self, replica_id: ReplicaId) -> bool:
        """Drain the replica for every instance; True if it was not drained yet. This
        instance stops routing there before this returns."""
        added = await self.store.set_drain(replica_id)
        self.sync_drains()
        return added

    async def undrain(self, replica_id: ReplicaId) -> bool:
        """End the replica's drain for every instance; True if it was drained."""
        removed = await self.store.clear_drain(replica_id)
        self.sync_drains()
        return removed

    def sync_drains(self) -> None:
        """Hand the store's drains to ``on_drains`` if they changed since the last call."""
        drains = self.store.drains()
        if drains is self._drains_seen or drains == self._drains_seen:
            return
        self._drains_seen = drains
        if self.on_drains is not None:
            self.on_drains(tuple(drains))

    # -- adapter-load refusals (backends.refusals.RefusalSink) -------------------------------

    def attach_refusals(self, refusals: Refusals) -> None:
        if self._sync is None:
            self._refusals = refusals

    def refusal_recorded(
        self, replica_id: ReplicaId, spec: AdapterSpec, error: str, ttl_s: float
    ) -> None:
        """Shared (if not embedded); and the shadow residency, which the routed request
        touched, drops the adapter there: the replica did not register it. Both in one atomic
        write of the store, so no instance sees one without the other."""
        store, name = self.store, spec.name
        if self._refusals is not None and ttl_s > 0:
            self._queue_write(
                lambda: store.record_refusal(
                    replica_id, name, path=spec.path, error=error, ttl_s=ttl_s
                )
            )
        else:
            self._queue_write(lambda: store.record_unload(replica_id, name))

    def refusals_forgotten(self, adapter: AdapterId, replica_id: ReplicaId | None) -> None:
        if self._refusals is not None:
            store = self.store
            self._queue_write(lambda: store.forget_refusals(adapter, replica_id))

    def _queue_write(self, op: Callable[[], Awaitable[None]]) -> None:
        self._pool_writes.append(op)
        if self._pool_writer is None:
            self._pool_writer = asyncio.ensure_future(self._write_queued())

    async def _write_queued(self) -> None:
        ops = self._pool_writes
        try:
            while ops:
                try:
                    await ops[0]()
                except Exception:  # the store keeps its local view; nothing to retry here
                    log.exception("state: writing what the replica pool learnt failed")
                ops.popleft()
        finally:
            self._pool_writer = None

    def sync_refusals(self) -> None:
        """Hand the store's refusals to the pool (each round of :meth:`run`), unless writes
        of ours are still queued: the store would not show them yet."""
        refusals = self._refusals
        if refusals is None or self._pool_writes:
            return
        shared = self.store.refusals()
        if shared or refusals.by_adapter or refusals.holds_findings:
            refusals.adopt(
                {
                    name: {rid: (x.path, x.error, x.left_s) for rid, x in by_replica.items()}
                    for name, by_replica in shared.items()
                }
            )

    # -- replicas shutting down (backends.pool_types.PoolListener) -----------------------------

    def replica_stopping(self, replica_id: ReplicaId, error: str, hold_s: float) -> None:
        """The replica answered this instance that it is shutting down: every instance holds
        it out of rotation (written in the background; not with the embedded store)."""
        if self._sync is not None:
            return
        now = self._clock.now()
        if now - self._stopping_written.get(replica_id, -math.inf) < _STOPPING_REWRITE_S:
            # Written within the second: this one is written when it is over (a round of
            # :meth:`sync_stopping`), and kept here meanwhile: a release by another instance
            # the store shows now is older than it and must not end this hold.
            self._stopping_unwritten[replica_id] = (error, hold_s, now)
            return
        self._write_stopping(replica_id, error, hold_s, now)

    def _write_stopping(self, replica_id: ReplicaId, error: str, ttl_s: float, now: float) -> None:
        self._stopping_written[replica_id] = now
        self._stopping_unwritten.pop(replica_id, None)
        store = self.store
        self._queue_write(lambda: store.hold_stopping(replica_id, error=error, ttl_s=ttl_s))

    def replica_stopping_ended(self, replica_id: ReplicaId) -> None:
        """A poll of this instance found the held replica gone: the hold ends everywhere."""
        if self._sync is not None:
            return
        self._stopping_written.pop(replica_id, None)
        self._stopping_unwritten.pop(replica_id, None)
        store = self.store
        self._queue_write(lambda: store.release_stopping(replica_id))

    def sync_stopping(self) -> None:
        """Hand the holds every instance keeps to ``on_stopping`` (each round of :meth:`run`;
        refreshed with the rest of the shared view: no extra round trip), unless writes of
        ours are still queued (the store would not show them yet). A hold reported here and
        not written yet (:meth:`replica_stopping`) is written once its second is over, and
        handed on meanwhile as if the store showed it."""
        if self._sync is not None or self.on_stopping is None:
            return
        unwritten = self._stopping_unwritten
        if unwritten:
            now = self._clock.now()
            for rid, (error, hold_s, at) in list(unwritten.items()):
                if now - self._stopping_written.get(rid, -math.inf) >= _STOPPING_REWRITE_S:
                    if (left_s := hold_s - (now - at)) > 0:
                        self._write_stopping(rid, error, left_s, now)
                    else:
                        del unwritten[rid]
        if self._pool_writes:
            return
        shown = {rid: (h.error, h.left_s) for rid, h in self.store.stopping().items()}
        if unwritten:
            now = self._clock.now()
            for rid, (error, hold_s, at) in unwritten.items():
                if rid not in shown and (left_s := hold_s - (now - at)) > 0:
                    shown[rid] = (error, left_s)
        if not shown and not self._stopping_seen:
            return
        self._stopping_seen = bool(shown)
        self.on_stopping(shown)

    def sync_unloads(self) -> None:
        """Hand ``on_unloads`` the adapters the shared residency no longer has registered on
        a replica it had them on at the last round (each round of :meth:`run`, even if none;
        no I/O): above
        all another instance's unloads (its ``DELETE``'s, its planner's), which the pool's
        own view (its polls) would learn only at its next poll, routing requests there
        meanwhile into vLLM's 404 and a retry. Not with the embedded store (one instance:
        the pool made every change itself).

        What the pool kept (a load of its own there ended since its last round: the shared
        view may have been read before that load was written) is handed again each round
        while the shared residency lacks it (before: never, so an unload by another instance
        right after our load stayed unseen until our next poll). So are this instance's own
        loads since the last round that the shared residency lacks (an unload right after one
        may fall between the same two rounds); the pool drops them once the load is
        older than its last round (if the view was only late, that costs one load
        that vLLM answers "already loaded"). A load of ours is handed only once the view was
        read by a refresh begun after its write (``ResilientStore.read_includes``): a refresh
        begun before may bring a view without it, and rounds with no refresh between would
        hand it twice, the pool dropping it the second time (before: the flake of
        ``test_shared_delete_then_post``)."""
        if self._sync is not None or self.on_unloads is None:
            return
        gone: dict[ReplicaId, frozenset[AdapterId]] = {}
        seen, kept = self._registered_seen, self._unloads_kept
        # Our loads the shared view may lack only for being read before their write (a
        # refresh begun before it landed replaced the mirror's) are not handed yet: handed
        # once and kept, they would be dropped the next round, with no newer read between.
        ours: dict[ReplicaId, set[AdapterId]] = {}
        unread: dict[ReplicaId, set[AdapterId]] = {}
        reads = self._reads
        for (rid, name), mark in list(self._loaded_since.items()):
            if mark == _WRITING or (reads is not None and not reads.read_includes(mark)):
                unread.setdefault(rid, set()).add(name)
            else:
                del self._loaded_since[rid, name]
                ours.setdefault(rid, set()).add(name)
        for rid in self._records:
            now = self.store.residency_of(rid).registered
            before = seen.get(rid)
            seen[rid] = now
            lost = kept.get(rid, frozenset()).union(ours.get(rid, ())) - now
            if before is not None and before is not now:
                lost |= before - now
            lost -= unread.get(rid, set())
            if lost:
                gone[rid] = lost
        for rid in [r for r in seen if r not in self._records]:
            del seen[rid]
        # (also when empty: the pool times its rounds by these calls)
        self._unloads_kept = {rid: names for rid, names in self.on_unloads(gone).items() if names}

    # -- adapter registry -------------------------------------------------------------------

    def shared_adapters(self) -> Mapping[AdapterId, AdapterSpec]:
        """Adapters registered through the admin API (of any instance)."""
        return self.store.view().adapters

    async def find_adapter(self, name: AdapterId) -> AdapterSpec | None:
        """A request named an adapter the catalog does not hold: it may have been registered
        on another instance since this one's last refresh. One read of the store (one HGET on
        Redis, off the routed requests' path: only on a catalog miss); if found, this
        instance's view adopts it and the catalog is rebuilt at once (``on_adapters``)."""
        spec = await self.store.get_adapter(name)
        if spec is not None and self.shared_adapters().get(name) != spec:
            self.store.set_adapter(spec)
            self.check_adapters()
        return spec

    @property
    def embedded(self) -> bool:
        """Whether the store is the embedded one: the admin API's registrations live in this
        process only, and a restart forgets them."""
        return self._sync is not None

    def check_adapters(self) -> None:
        """Call ``on_adapters`` if the shared adapter registry, or a definition in force for
        an adapter of the config file, changed since the last call."""
        adapters = self.shared_adapters()
        if (
            self._seen_adapters is not None
            and (adapters is self._seen_adapters or adapters == self._seen_adapters)
            and not self._definitions_changed
        ):
            return
        self._seen_adapters = adapters
        self._definitions_changed = False
        if self.on_adapters is not None:
            self.on_adapters(adapters)

    # -- adapters defined in config files (``state.definitions``) -----------------------------

    def set_config_adapters(self, specs: Iterable[AdapterSpec]) -> None:
        """This instance's config-file adapters, at start-up and after every reload (no-op if
        unchanged). A definition (path, rank) the file changed since the last call is claimed
        as a change: it replaces the one in force if that was this file's old one (the operator
        edited the file and reloaded); until the claim is answered it is served as the file
        says. Claimed by :meth:`start` and the next round of :meth:`run`."""
        new = {s.name: s for s in specs}
        if new == self._config_specs:
            return
        for name, spec in new.items():
            old = self._config_specs.get(name)
            if old is not None and not _definition(old).agrees(_definition(spec)):
                self._previous[name] = _definition(old)
                self._in_force.pop(name, None)
        for gone in [n for n in self._in_force if n not in new]:
            del self._in_force[gone]
        for gone in [n for n in self._previous if n not in new]:
            del self._previous[gone]
        for gone in [n for n in self._conflicts if n not in new]:
            del self._conflicts[gone]
        self._config_specs = new
        self._claim_due = True

    def config_adapters(self) -> tuple[AdapterSpec, ...]:
        """The config file's adapters as every instance serves them: with the path and rank
        in force (another instance's file may define the name differently, and first); the
        tenants as this file says."""
        out = []
        for name, spec in self._config_specs.items():
            entry = self._in_force.get(name)
            if entry is None or entry.definition.agrees(_definition(spec)):
                out.append(spec)
            else:
                d = entry.definition
                out.append(dataclasses.replace(spec, path=d.path, rank=d.rank))
        return tuple(out)

    def definition_conflicts(self) -> dict[AdapterId, tuple[AdapterDefinition, AdapterDefinition]]:
        """Config-file adapters whose definition here is not the one in force: name -> (this
        file's, the one in force)."""
        return dict(self._conflicts)

    def _claims_due(self) -> bool:
        """A full claim is due: at start, after a reload, when the store's version moved."""
        return bool(self._config_specs) and (
            self._claim_due or self.store.version != self._claimed_version
        )

    def _renewal_due(self) -> bool:
        return (
            bool(self._config_specs)
            and time.monotonic() - self._claimed_at_s >= self.store.ttls.lease_renew_s
        )

    async def renew_definitions(self) -> None:
        """Every ``lease_renew_s``: renew the claims without sending them again (the store's
        ``renew_definitions``: Redis, one lease key) when the last claim found every name
        of the file in force as the file defines it, else (a conflict, a change not in force
        yet, a lease Redis lost) claim in full, which also notices a losing definition that
        lapsed. Before, every renewal sent every claim (1,200 adapters: a 168 KB script
        argument and a rewrite of every entry, every 10 s, per instance)."""
        specs = self._config_specs
        if (
            not self._conflicts
            and not self._previous
            and all(name in self._in_force for name in specs)
        ):
            self._claimed_at_s = time.monotonic()
            if await self.store.renew_definitions(list(specs)):
                return
        await self.claim_definitions()

    async def claim_definitions(self) -> None:
        """Claim the config file's definitions (one store round trip) and adopt the ones in
        force: an ERROR names each adapter whose definition here loses (once per conflict),
        and ``on_adapters`` runs at the next :meth:`check_adapters` if any changed."""
        specs = self._config_specs
        self._claim_due = False
        self._claimed_version = self.store.version  # before: a bump meanwhile claims again
        self._claimed_at_s = time.monotonic()
        claims = [
            DefinitionClaim(name=n, ours=_definition(s), previous=self._previous.get(n))
            for n, s in specs.items()
        ]
        in_force = await self.store.claim_definitions(claims)
        if self._config_specs is not specs:  # reloaded meanwhile: the next round claims
            return
        before = self.config_adapters()
        for name, entry in in_force.items():
            if name in self._previous and entry.definition.agrees(_definition(specs[name])):
                del self._previous[name]  # our change is in force
        self._in_force = {n: in_force[n] for n in specs if n in in_force}
        if self.config_adapters() != before:
            self._definitions_changed = True
        self._report_conflicts()

    def _report_conflicts(self) -> None:
        """Log the conflicts this claim round found that were not said already, and the ones
        that ended: one line each if there is one, else one summary line (the count and the
        first few names; each conflict at DEBUG). 200 adapters defined otherwise by another
        instance's file made 200 ERROR lines at once before."""
        found: list[tuple[int, AdapterId, AdapterDefinition, AdapterDefinition]] = []
        agreed: list[AdapterId] = []
        for index, (name, spec) in enumerate(self._config_specs.items()):
            ours = _definition(spec)
            entry = self._in_force.get(name)
            if entry is None or entry.definition.agrees(ours):
                if self._conflicts.pop(name, None) is not None:
                    agreed.append(name)
                continue
            theirs = entry.definition
            if self._conflicts.get(name) == (ours, theirs):
                continue  # said already
            self._conflicts[name] = (ours, theirs)
            found.append((index, name, ours, theirs))
        if len(agreed) == 1:
            name = agreed[0]
            log.warning(
                "adapter %s: the definition in force agrees with this config file again (%s)",
                name, _definition(self._config_specs[name]).describe(),
            )  # fmt: skip
        elif agreed:
            log.warning(
                "%d adapters: the definitions in force agree with this config file again (%s)",
                len(agreed), _some(agreed),
            )  # fmt: skip
        if len(found) == 1:
            line, args = _conflict_line(*found[0])
            log.error(line, *args)
            return
        if not found:
            return
        index, name, ours, theirs = found[0]
        log.error(
            "%d adapters of this instance's config file are defined differently from the "
            "definitions in force for every gateway instance on this state store (%s): serving "
            "the ones in force, so that every instance routes them alike. The first, %s "
            "(config key adapters[%d]): this file says %s, in force is %s (%s). Make the config "
            "files agree; to change a definition in force, edit the file of an instance that "
            "has it and reload that instance (SIGHUP or POST /admin/reload); a name registered "
            "through the admin API first stays the registration until it is deleted (DELETE "
            "/admin/adapters/NAME). GET /admin/adapters (definition_conflict) shows each, and "
            "each is logged at DEBUG",
            len(found), _some([n for _, n, _, _ in found]), name, index, ours.describe(),
            theirs.describe(), _claimed_by(theirs),
        )  # fmt: skip
        if log.isEnabledFor(logging.DEBUG):
            for conflict in found:
                line, args = _conflict_line(*conflict)
                log.debug(line, *args)

    # -- status and lifecycle -----------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self.store.degraded

    @property
    def error_count(self) -> int:
        return self.store.error_count

    def resync_counts(self) -> dict[str, int]:
        """Resyncs after Redis outages, blips (Redis answering again within
        ``state.outage_warning_s`` of a timeout) and journal entries dropped (0 for the
        embedded store)."""
        return {
            "resyncs": int(getattr(self.store, "recoveries", 0)),
            "blips": int(getattr(self.store, "blips", 0)),
            "journal_dropped": int(getattr(self.store, "journal_dropped", 0)),
        }

    @property
    def synced(self) -> bool:
        """False until this instance has read the shared state once: started while Redis was
        unreachable, it knows neither the drains kept there nor the adapters registered on
        other instances (it takes them up when Redis is back). Always True embedded."""
        return int(getattr(self.store, "resyncs", 1)) > 0

    def status(self) -> dict[str, Any]:
        """For ``/health`` and ``/admin/replicas``: the backend, ``degraded`` (Redis
        unreachable: routing by the view last read), ``synced`` (see :attr:`synced`), and
        ``definition_conflicts`` (the config-file adapters whose definition here is not the
        one in force) only if there are any."""
        out: dict[str, Any] = {
            "backend": self.backend,
            "degraded": self.store.degraded,
            "synced": self.synced,
        }
        if self._conflicts:
            out["definition_conflicts"] = sorted(self._conflicts)
        return out

    async def start(self) -> None:
        """Connect (``ResilientStore``: never raises; starts degraded if Redis is down), then
        claim the config file's adapter definitions, so that the first catalog serves the
        definitions in force."""
        start = getattr(self.store, "start", None)
        if start is not None:
            await start()
        if self._config_specs:
            await self.claim_definitions()

    async def run(self) -> None:
        """Background loop: store housekeeping and adapter-registry changes; cancel to stop."""
        while True:
            try:
                await self.store.maintain()
                if self._claims_due():
                    await self.claim_definitions()
                elif self._renewal_due():
                    await self.renew_definitions()
                self.check_adapters()
                self.sync_refusals()
                self.sync_drains()
                self.sync_stopping()
                self.sync_unloads()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let housekeeping die; the next round retries
                log.exception("state: maintenance round failed")
            await asyncio.sleep(self._maintenance_interval_s)

    async def close(self, *, drain_timeout_s: float = 2.0) -> None:
        """Wait (bounded) for background lease releases and refusal writes, then close the
        store."""
        pending = [*self._ends]
        if self._pool_writer is not None:
            pending.append(self._pool_writer)
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout_s):
                    await asyncio.gather(*pending, return_exceptions=True)
        await self.store.close()


def _definition(spec: AdapterSpec) -> AdapterDefinition:
    return AdapterDefinition.of(spec)


SOME = 5  # names a summary log line names


def _some(names: list[AdapterId]) -> str:
    """The first :data:`SOME` names, and how many more."""
    shown = ", ".join(names[:SOME])
    return shown if len(names) <= SOME else f"{shown} and {len(names) - SOME} more"


def _claimed_by(theirs: AdapterDefinition) -> str:
    if theirs.instance == REGISTERED:
        return "registered through the admin API first"
    return f"claimed by instance {theirs.instance or '?'}, whose config file said so first"


def _conflict_line(
    index: int, name: AdapterId, ours: AdapterDefinition, theirs: AdapterDefinition
) -> tuple[str, tuple[object, ...]]:
    """The log line (format, arguments) naming one conflict, with what to do about it."""
    if theirs.instance == REGISTERED:
        return (
            "adapter %s (config key adapters[%d]): this instance's config file defines it as "
            "%s, but it was registered through the admin API first, as %s: serving the "
            "registration, so that every gateway instance on this state store routes it alike. "
            "Rename the adapter in the file, or delete the registration (DELETE "
            "/admin/adapters/%s) to put the file's definition in force",
            (name, index, ours.describe(), theirs.describe(), name),
        )  # fmt: skip
    return (
        "adapter %s (config key adapters[%d]): this instance's config file defines it as %s, "
        "but the definition in force for every gateway instance on this state store is %s "
        "(claimed by instance %s, whose config file said so first): serving that one, so that "
        "every instance routes it alike. Make the config files agree; to change the definition "
        "in force, edit the file of an instance that has it and reload that instance (SIGHUP "
        "or POST /admin/reload)",
        (name, index, ours.describe(), theirs.describe(), theirs.instance or "?"),
    )  # fmt: skip
