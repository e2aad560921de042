"""``ResilientStore``: Redis-backed shared state that keeps serving when Redis is down.

The gateway's store in a multi-instance deployment. It keeps a local mirror (a
``MemoryStore``) of the shared view and applies every write to it first, so:

* ``snapshot()`` costs no Redis call: it reads the mirror, which ``maintain()`` refreshes
  from Redis every ``Ttls.refresh_s`` (one round trip) and this instance's own writes keep
  current in between. In-flight counts are this instance's live count plus the other
  instances' count at the last refresh. Routing thus costs 2 Redis round trips per request:
  ``begin_request`` and ``end_request``.
* When a Redis call fails the store turns *degraded* at once: it counts the error
  (``error_count``), and from then on serves from the mirror without touching Redis (no
  client request waits on a dead Redis more than once per outage). It logs the outage once,
  as a WARNING, when it is one: at once if Redis refused or dropped the connection or
  answered with an error, but after a timeout (no answer within ``op_timeout_s``) only once
  Redis has stayed unreachable for ``outage_warning_s``, or a reconnection failed otherwise
  than by a timeout. A timeout alone does not tell an outage: Redis may have been slow for a
  moment, or our event loop held up past the deadline on a saturated host. Redis answering
  again sooner is a *blip*: logged at INFO ("Redis slow for 0.6 s ... (no outage)") and
  counted in ``blips``, not in ``recoveries``. Writes go to a bounded
  journal; leases are remembered. ``maintain()`` retries with exponential backoff:
  ``Ttls.retry_initial_s`` doubling up to ``Ttls.retry_max_s`` (the gateway config's
  ``state.reconnect_max_backoff_s``), each wait lengthened by up to ``jitter``.
* On reconnect it resynchronises: if Redis lost its data (the epoch token is gone or new) it
  first writes the mirror where Redis has nothing (registry, adapters, residency, refusals,
  drained replicas, and the tombstones of adapters deleted lately, so that another
  instance's stale view does not bring a deleted adapter back); then it
  replays the journal (residency touches, demand counts, admin writes), replaces this
  instance's leases with the live ones, and refreshes the mirror. That is a fixed number of
  round trips whatever the traffic: the requests' touches are replayed in pipelined batches,
  and what traffic adds meanwhile is left to the next maintenance round (see
  ``_recover_locked``), so a resync on a saturated host is not a race against the requests.
  A replayed poll (``reconcile``) does not undo a newer write: it carries this instance's last
  read of the shared state, and Redis leaves alone the adapters another instance added to or
  removed from that replica since (``P rep:R:stamps``), e.g. a load made after Redis returned.

Adapter-load refusals ride the same refresh: a refusal recorded here is in the mirror at
once; a refresh whose snapshot may predate one of this instance's refusal writes (one was in
flight, or started, while it was read) keeps the mirror's refusals rather than the snapshot's,
and the next refresh brings them. A refusal recorded while Redis is down is replayed with the
time it has left.

Drained replicas (the admin API's drains) ride the same refresh, and are kept like refusals: a
drain or undrain made here is in the mirror at once, and a refresh whose snapshot may predate
one of this instance's drain writes keeps the mirror's drains. A drain made while Redis is
down (the gateway refuses that, 503, but one can fail halfway) is replayed with the journal.

Holds of replicas shutting down (``hold_stopping``: a replica answered an instance that it
drains) ride the same refresh and are kept like drains (a hold or release made here is in the
mirror at once; a refresh whose snapshot may predate one of this instance's writes keeps the
mirror's holds). While Redis is down the mirror keeps this instance's holds, lapsing on time,
and the journal replays them with the time they have left; a resync after Redis lost its data
writes back the holds the mirror has (``push_missing``).

Adapter registrations and deletions (the admin API's) are decided by Redis when it is
reachable: ``put_adapter`` registers a name only if Redis does not hold it yet, whatever the
mirror says (two instances registering one name at once: one wins), and ``delete_adapter``
answers whether Redis held it; the mirror then follows Redis's answer. Writes still queued
from an outage (a resync that raced traffic leaves some) are replayed first, and a resync in
progress is waited for, so Redis decides against every older write; if Redis lost its data
since the last sync without a failed call (a FLUSHALL, a restart between two calls), the write
is refused by the script (epoch check, no extra round trip), Redis is refilled from the mirror
and asked again. While degraded they go
to the mirror and the journal like any write, but the gateway refuses admin writes then (503),
because the outcome would be decided later, against other instances' writes.

The leader lease is never granted while degraded (a partitioned instance must not plan).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from itertools import islice
from typing import TypeVar

from loragate.core.clock import Clock, WallClock
from loragate.core.types import AdapterId, AdapterSpec, ReplicaId, Residency
from loragate.state.definitions import (
    REGISTERED,
    AdapterDefinition,
    DefinitionClaim,
    DefinitionMap,
    InForce,
)
from loragate.state.keys import Ttls
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import EpochChangedError, RedisStore
from loragate.state.store import (
    DrainMap,
    RefusalMap,
    ReplicaRecord,
    StateStore,
    StateTimeoutError,
    StateUnavailableError,
    StateView,
    StoppingMap,
    TombstoneMap,
)

log = logging.getLogger("loragate.state")

# Journaled request touches replayed per round trip.
REPLAY_BATCH = 256

# How long Redis must stay unanswering after a timeout before that is an outage (WARNING):
# four default op_timeout_s. The false ones a soak on a host at load 5-9 found lasted 0.14 to
# 1.1 s (a loop stall past op_timeout_s, then the first reconnection or the next); a timeout
# that is an outage shows as one within the first reconnections' backoff (0.1 + 0.2 + 0.4 +
# 0.8 s), and a refused connection is one at once.
OUTAGE_WARNING_S = 2.0

RemoteOp = Callable[[RedisStore], Awaitable[object]]
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Touch:
    """The journal entry of a request routed while Redis was down (residency touch and demand
    count): one per request, so replayed in batches (``RedisStore.replay_touches``)."""

    replica_id: ReplicaId
    adapter: AdapterId
    now_s: float

    def __call__(self, r: RedisStore) -> Awaitable[object]:
        return r.replay_touch(self.replica_id, self.adapter, self.now_s)


class _TrackedWrites:
    """One kind of write to Redis (refusals, drains, holds of replicas shutting down), counted so
    that a refresh can tell whether its snapshot may lack one of ours."""

    __slots__ = ("begun", "waiting")

    def __init__(self) -> None:
        self.begun = 0  # writes begun so far
        self.waiting = 0  # writes waiting for Redis now

    def mark(self) -> tuple[int, bool]:
        """Taken before a snapshot is read."""
        return self.begun, self.waiting > 0

    def raced(self, mark: tuple[int, bool]) -> bool:
        """Whether a write was waiting when ``mark`` was taken, or began since."""
        begun, busy = mark
        return busy or self.begun != begun


class ResilientStore:
    """``StateStore`` over a ``RedisStore`` that never fails a request because Redis is down.

    Call ``start()`` once (it connects, or starts degraded) and run ``run_maintenance(store)``
    as a background task.
    """

    def __init__(
        self,
        remote: RedisStore,
        *,
        local: MemoryStore | None = None,
        clock: Clock | None = None,
        journal_max: int = 10_000,
        jitter: float = 0.2,
        rng: random.Random | None = None,
        outage_warning_s: float = OUTAGE_WARNING_S,
    ) -> None:
        self._remote = remote
        self._ttls = remote.ttls
        self._clock: Clock = clock or WallClock()
        # The mirror measures refusal lifetimes on our clock (as the journal replays them).
        self._local = local or MemoryStore(ttls=remote.ttls, clock=self._clock)
        self._journal: deque[RemoteOp] = deque()
        self._journal_max = journal_max
        self.journal_dropped = 0
        # Leases begun or ended during the last resync, after its lease sync: the next
        # maintenance round syncs them.
        self._leases_behind = False
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._degraded = True  # until the first successful sync
        self._backoff_s = self._first_backoff_s
        self._next_retry_s = -math.inf
        self._outage_warning_s = outage_warning_s
        # The degraded spell: since when (our clock), its first error, and whether it was
        # logged as an outage (the WARNING) yet; shorter unlogged ones are blips.
        self._outage_since_s = self._clock.now()
        self._outage_error: StateUnavailableError | None = None
        self._outage_logged = False
        self.blips = 0
        self._last_refresh_s = -math.inf
        # Refreshes begun, and the number of the one the mirror's shared view was read by
        # (``read_mark`` / ``read_includes``).
        self._reads_begun = 0
        self._read_by = 0
        self._others: dict[ReplicaId, int] = {}
        # Other instances' last reads (instance -> epoch s, Redis's clock), as of our refresh.
        self._readers: dict[str, float] = {}
        self._known_epoch: str | None = None
        self.resyncs = 0
        self._refusal_writes = _TrackedWrites()
        self._drain_writes = _TrackedWrites()
        self._stopping_writes = _TrackedWrites()  # holds of replicas shutting down
        # Held by a resynchronisation, and by an adapter-registry write deciding against Redis
        # (which must not run against a Redis still being refilled).
        self._resync_lock = asyncio.Lock()
        # Held while journal entries are replayed (maintenance and registry writes both do).
        self._replay_lock = asyncio.Lock()
        # Config-file adapter name -> (the definition Redis had in force, until on our clock).
        self._definitions: dict[AdapterId, tuple[AdapterDefinition, float]] = {}

    @property
    def _first_backoff_s(self) -> float:
        """The first wait after a failure: ``retry_initial_s``, unless the cap is lower."""
        return min(self._ttls.retry_initial_s, self._ttls.retry_max_s)

    # --- status -------------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def error_count(self) -> int:
        return self._remote.error_count

    @property
    def journal_len(self) -> int:
        return len(self._journal)

    @property
    def recoveries(self) -> int:
        """Resynchronisations after an outage (``resyncs`` also counts the first sync and
        the blips')."""
        return max(0, self.resyncs - 1 - self.blips)

    @property
    def remote(self) -> RedisStore:
        return self._remote

    # --- failure handling -----------------------------------------------------------------------
    def _on_error(self, exc: StateUnavailableError) -> None:
        if not self._degraded:
            self._degraded = True
            now = self._clock.now()
            self._outage_since_s = now
            self._outage_error = exc
            self._outage_logged = False
            self._backoff_s = self._first_backoff_s
            self._next_retry_s = now + self._backoff_s
            self._check_outage(exc)

    def _check_outage(self, exc: StateUnavailableError | None = None) -> None:
        """While degraded: log the WARNING of an outage once it is one (``exc``: the latest
        error; an error other than a timeout is one at once, a timeout only once Redis has
        not answered for ``outage_warning_s``)."""
        if self._outage_logged or not self._degraded:
            return
        lasted = self._clock.now() - self._outage_since_s
        if exc is not None and not isinstance(exc, StateTimeoutError):
            self._outage_logged = True
            self._log_unreachable("", exc)
        elif lasted >= self._outage_warning_s and self._outage_error is not None:
            self._outage_logged = True
            self._log_unreachable(f" for {lasted:.1f} s", self._outage_error)

    def _journal_append(self, op: RemoteOp) -> None:
        if len(self._journal) >= self._journal_max:
            self._journal.popleft()
            if self.journal_dropped == 0:
                log.warning("state: Redis journal full, dropping the oldest entries")
            self.journal_dropped += 1
        self._journal.append(op)

    @property
    def _queueing(self) -> bool:
        """Writes go to the journal: Redis is down, or journal entries still wait (a resync
        that raced traffic left some), and no write may overtake an older one (a registration
        replayed after a newer deletion would bring the adapter back)."""
        return self._degraded or bool(self._journal)

    async def _write(self, op: RemoteOp) -> None:
        if self._queueing:
            self._journal_append(op)
            return
        try:
            await op(self._remote)
        except StateUnavailableError as exc:
            self._on_error(exc)
            self._journal_append(op)

    # --- synchronisation ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and synchronise now; if Redis is down, stay degraded (no exception)."""
        self._outage_logged = True  # a failure here is logged at once, whatever it is
        error = await self._try_recover()
        if error is not None:
            self._log_unreachable(" at start-up", error)

    def _log_unreachable(self, when: str, error: StateUnavailableError) -> None:
        """The WARNING of an outage (at start-up, or while serving): where Redis is (its URL,
        password as ``***``) and what failed."""
        log.warning(
            "state: Redis unreachable%s (%s: %s), serving from the local view until it is "
            "reachable",
            when, self._remote.url, error,
        )  # fmt: skip

    async def _try_recover(self) -> StateUnavailableError | None:
        """Resynchronise with Redis; what failed, if it did (then degraded still)."""
        try:
            await self._recover()
        except StateUnavailableError as exc:
            self._degraded = True
            self._next_retry_s = self._clock.now() + self._backoff_s * (
                1.0 + self._jitter * self._rng.random()
            )
            self._backoff_s = min(self._backoff_s * 2.0, self._ttls.retry_max_s)
            log.debug("state: Redis still unreachable (%s)", exc)
            self._check_outage(exc)
            return exc
        if self.resyncs > 0:
            if self._outage_logged:
                log.warning("state: Redis reachable again (%s), resynchronised", self._remote.url)
            else:
                self.blips += 1
                log.info(
                    "state: Redis slow for %.2f s (%s: %s), served from the local view "
                    "meanwhile, resynchronised (no outage: it answered again within "
                    "state.outage_warning_s, %g s)",
                    self._clock.now() - self._outage_since_s, self._remote.url,
                    self._outage_error, self._outage_warning_s,
                )  # fmt: skip
        self.resyncs += 1
        self._degraded = False
        self._outage_logged = False
        self._backoff_s = self._first_backoff_s
        return None

    async def _recover(self) -> None:
        async with self._resync_lock:
            await self._recover_locked()

    async def _recover_locked(self) -> None:
        """One pass whatever the traffic: Redis's data checked (refilled if lost), the journal
        entries present now replayed, our leases synced, the mirror refreshed. Requests keep
        coming meanwhile; their touches go to the journal and their leases are only remembered
        while we are degraded. Chasing them here (replay, sync, until nothing changed) made the
        resync as long as the traffic let it on a saturated host, where each round trip is slow
        and the requests journaled during one replay are as many as it replayed; every extra
        round trip was one more chance for a timeout that failed the whole resync. So the caller
        clears ``degraded`` when this returns (no await in between), and from then on requests
        go to Redis directly: the journal only shrinks. The entries left are replayed by the next
        ``maintain`` round, in order, before anything queued behind them (``_queueing``), and
        the leases are synced there too if they changed meanwhile (``_leases_behind``); until
        then the mirror keeps its refusals, drains and stopping holds (``_refresh``), and
        another instance may count a lease begun here during the resync one round late."""
        remote = self._remote
        if self.resyncs > 0:  # an outage: do not reuse connections to the old server
            await remote.drop_idle_connections()
        epoch, created = await remote.ensure_epoch()
        if created or epoch != self._known_epoch:
            # Redis lost its data (or we never saw it): fill in what it misses from our view.
            restored = await remote.push_missing(self._local.view())
            if restored:
                log.warning(
                    "state: Redis had lost its data; this instance wrote back the drains it "
                    "knew of: %s. Every instance routes by them again. A drain ended shortly "
                    "before the loss (or while this instance was cut off from Redis) may be "
                    "among them: check GET /admin/replicas and end it again",
                    ", ".join(sorted(restored)),
                )  # fmt: skip
        await self._replay_journal()
        mark = remote.lease_changes
        await remote.sync_leases()
        self._known_epoch = epoch
        await self._refresh(allow_resync=False)
        if remote.lease_changes != mark:
            self._leases_behind = True

    async def _replay_journal(self) -> None:
        """Replay, in order, the journal entries present now (an entry leaves the journal only
        once Redis has taken it; on an error it stays first in line). Runs of request touches
        go in batches of up to ``REPLAY_BATCH`` per round trip. One replay at a time."""
        if not self._journal:
            return
        async with self._replay_lock:
            journal = self._journal
            remote = self._remote
            left = len(journal)
            while left > 0 and journal:
                if isinstance(journal[0], _Touch):
                    batch: list[_Touch] = []
                    for entry in islice(journal, min(left, REPLAY_BATCH)):
                        if not isinstance(entry, _Touch):
                            break
                        batch.append(entry)
                    await remote.replay_touches([(t.replica_id, t.adapter, t.now_s) for t in batch])
                    done: Sequence[RemoteOp] = batch
                else:
                    done = [journal[0]]
                    await done[0](remote)
                for entry in done:  # unless a full journal dropped it meanwhile
                    if journal and journal[0] is entry:
                        journal.popleft()
                left -= len(done)

    async def _refresh(self, *, allow_resync: bool = True) -> None:
        own_before = self._remote.own_in_flight()
        refusal_mark = self._refusal_writes.mark()
        drain_mark = self._drain_writes.mark()
        stopping_mark = self._stopping_writes.mark()
        self._reads_begun += 1
        read = self._reads_begun
        view = await self._remote.snapshot(as_reader=True)
        if allow_resync and self._remote.epoch != self._known_epoch:
            # Redis was replaced without a failed call in between: resynchronise.
            await self._recover()
            return
        self._others = {r: max(0, n - own_before.get(r, 0)) for r, n in view.in_flight.items()}
        # The snapshot may lack a refusal write of ours (in flight or journaled meanwhile):
        # keep our refusals this time; the next refresh reads them back from Redis.
        journaled = bool(self._journal)
        keep = self._refusal_writes.raced(refusal_mark) or journaled
        keep_drains = self._drain_writes.raced(drain_mark) or journaled
        keep_stopping = self._stopping_writes.raced(stopping_mark) or journaled
        self._local.replace_shared(
            view, keep_refusals=keep, keep_drains=keep_drains, keep_stopping=keep_stopping
        )
        me = self._remote.instance_id
        self._readers = {i: t for i, t in view.readers.items() if i != me}
        self._read_by = read
        self._last_refresh_s = self._clock.now()

    def read_mark(self) -> int:
        """The refreshes begun so far: a write of ours done now is in the mirror's shared view
        once ``read_includes`` this mark (a refresh begun before the write landed may bring a
        view without it, replacing the mirror's)."""
        return self._reads_begun

    def read_includes(self, mark: int) -> bool:
        """Whether the mirror's shared view was read by a refresh begun after ``mark``."""
        return self._read_by > mark

    async def maintain(self) -> None:
        """One round of housekeeping: retry Redis if degraded and the backoff elapsed; else
        renew leases when due and refresh the mirror when due."""
        now = self._clock.now()
        if self._degraded:
            self._check_outage()
            if now >= self._next_retry_s:
                await self._try_recover()
            return
        try:
            if self._journal:  # left over from a resync that raced traffic
                await self._replay_journal()
            if self._leases_behind:  # changed during the resync, after its lease sync
                await self._remote.sync_leases()
                self._leases_behind = False
            await self._remote.maintain()
            if now - self._last_refresh_s >= self._ttls.refresh_s:
                await self._refresh()
        except StateUnavailableError as exc:
            self._on_error(exc)

    # --- hot path -------------------------------------------------------------------------------
    async def begin_request(
        self, replica_id: ReplicaId, adapter: AdapterId | None, request_id: str, now_s: float
    ) -> None:
        await self._local.begin_request(replica_id, adapter, request_id, now_s)
        if self._degraded:
            self._remote.note_begin(replica_id, request_id)
            if adapter is not None:
                self._journal_append(_Touch(replica_id, adapter, now_s))
            return
        try:
            await self._remote.begin_request(replica_id, adapter, request_id, now_s)
        except StateUnavailableError as exc:
            self._on_error(exc)  # the lease is remembered; sync_leases re-creates it
            if adapter is not None:
                self._journal_append(_Touch(replica_id, adapter, now_s))

    async def end_request(self, replica_id: ReplicaId, request_id: str) -> None:
        await self._local.end_request(replica_id, request_id)
        if self._degraded:
            self._remote.note_end(request_id)  # sync_leases drops it from Redis later
            return
        try:
            await self._remote.end_request(replica_id, request_id)
        except StateUnavailableError as exc:
            self._on_error(exc)

    async def snapshot(self) -> StateView:
        return self.view()

    def view(self) -> StateView:
        """The current view, without I/O (fine to call on every request)."""
        base = self._local.view()
        own = self._local.own_in_flight()
        return dataclasses.replace(
            base,
            in_flight={r: self._others.get(r, 0) + own.get(r, 0) for r in base.replicas},
            degraded=self._degraded,
        )

    def in_flight_of(self, replica_id: ReplicaId) -> int:
        """``view().in_flight_of(replica_id)`` without building the view."""
        return self._others.get(replica_id, 0) + self._local.in_flight_of(replica_id)

    def residency_of(self, replica_id: ReplicaId) -> Residency:
        """``view().residency_of(replica_id)`` without building the view."""
        return self._local.residency_of(replica_id)

    # --- replica registry and residency -----------------------------------------------------------
    async def upsert_replica(self, record: ReplicaRecord) -> None:
        await self._local.upsert_replica(record)
        await self._write(lambda r: r.upsert_replica(record))

    async def remove_replica(self, replica_id: ReplicaId) -> None:
        await self._local.remove_replica(replica_id)
        await self._write(lambda r: r.remove_replica(replica_id))

    async def set_replica_health(self, replica_id: ReplicaId, healthy: bool, now_s: float) -> None:
        await self._local.set_replica_health(replica_id, healthy, now_s)
        await self._write(lambda r: r.set_replica_health(replica_id, healthy, now_s))

    async def record_load(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        await self._local.record_load(replica_id, adapter)
        await self._write(lambda r: r.record_load(replica_id, adapter))

    async def record_unload(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        await self._local.record_unload(replica_id, adapter)
        await self._write(lambda r: r.record_unload(replica_id, adapter))

    async def reconcile(self, replica_id: ReplicaId, seen: frozenset[AdapterId]) -> None:
        """Nothing to write (no round trip) when the mirror holds that residency already: it
        is the shared view of the last refresh plus this instance's writes since, so an
        unchanged poll of an idle replica costs Redis nothing (before: one script rewriting the
        whole set, per poll of each replica by each instance). If another instance changed the
        set since our refresh, the next refresh brings that and the next poll corrects it."""
        res = self._local.residency_of(replica_id)
        if res.registered == seen and seen.issuperset(res.gpu) and seen.issuperset(res.cpu):
            return
        await self._local.reconcile(replica_id, seen)
        # What our view includes now: Redis leaves alone what another instance changed since
        # (this poll may predate it, above all if it waits in the journal for Redis to return).
        since = self._remote.read_change(replica_id)
        await self._write(lambda r: r.reconcile(replica_id, seen, since=since))

    # --- adapter registry -------------------------------------------------------------------------
    async def put_adapter(self, spec: AdapterSpec) -> bool:
        async with self._resync_lock:  # not against a Redis being refilled
            if not self._degraded:
                try:
                    added = await self._decide(lambda r, e: r.put_adapter(spec, epoch=e))
                except StateUnavailableError as exc:
                    self._on_error(exc)  # the outcome is unknown: the journal decides it later
                else:
                    if added:
                        self._local.set_adapter(spec)
                    return added
        added = await self._local.put_adapter(spec)
        if added:
            self._journal_append(lambda r: r.put_adapter(spec))
        return added

    async def replace_adapter(
        self, spec: AdapterSpec, *, expected: AdapterSpec | None = None
    ) -> AdapterSpec | None:
        async with self._resync_lock:
            if not self._degraded:
                try:
                    old = await self._decide(
                        lambda r, e: r.replace_adapter(spec, expected=expected, epoch=e)
                    )
                except StateUnavailableError as exc:
                    self._on_error(exc)
                else:
                    if old is not None:
                        self._local.set_adapter(spec)
                    return old
        old = await self._local.replace_adapter(spec, expected=expected)
        if old is not None:
            self._journal_append(lambda r: r.replace_adapter(spec, expected=old))
        return old

    async def delete_adapter(self, name: AdapterId) -> bool:
        async with self._resync_lock:
            if not self._degraded:
                try:
                    existed = await self._decide(lambda r, e: r.delete_adapter(name, epoch=e))
                except StateUnavailableError as exc:
                    self._on_error(exc)
                else:
                    if existed:
                        self._local.remove_adapter(name)
                    return existed
        existed = await self._local.delete_adapter(name)
        self._journal_append(lambda r: r.delete_adapter(name))
        return existed

    async def _decide(self, op: Callable[[RedisStore, str | None], Awaitable[_T]]) -> _T:
        """A registry write decided by Redis (call with the resync lock held). Older writes go
        first (queued during an outage and not replayed yet), so Redis, not the mirror, decides
        against all of them; and only in the dataset this instance synchronised with: if Redis
        lost its data since (noticed by no failed call, e.g. a FLUSHALL, or a restart between
        two calls), it is refilled from this instance's view first, then asked again."""
        await self._replay_journal()
        try:
            return await op(self._remote, self._known_epoch)
        except EpochChangedError:
            log.warning("state: Redis lost its data since the last sync; resynchronising "
                        "before the adapter-registry write")  # fmt: skip
            await self._recover_locked()
        return await op(self._remote, self._known_epoch)

    async def get_adapter(self, name: AdapterId) -> AdapterSpec | None:
        """Redis's entry (one round trip) when reachable, else the mirror's."""
        if not self._degraded:
            try:
                return await self._remote.get_adapter(name)
            except StateUnavailableError as exc:
                self._on_error(exc)
        return await self._local.get_adapter(name)

    async def list_adapters(self) -> list[AdapterSpec]:
        return await self._local.list_adapters()

    async def begin_replacing(self, name: AdapterId, path: str, ttl_s: float) -> None:
        """In the mirror and, if reachable, in Redis (a hint: not journaled; a PUT is refused
        while Redis is unreachable anyway)."""
        await self._local.begin_replacing(name, path, ttl_s)
        await self._hint(lambda r: r.begin_replacing(name, path, ttl_s))

    async def end_replacing(self, name: AdapterId) -> None:
        await self._local.end_replacing(name)
        await self._hint(lambda r: r.end_replacing(name))

    async def _hint(self, op: RemoteOp) -> None:
        if self._degraded:  # (its own key: no journaled write orders it)
            return
        try:
            await op(self._remote)
        except StateUnavailableError as exc:
            self._on_error(exc)

    async def paths_in_force(self, name: AdapterId) -> frozenset[str]:
        """Redis's answer (one round trip) when reachable, else the mirror's."""
        if not self._degraded:
            try:
                return await self._remote.paths_in_force(name)
            except StateUnavailableError as exc:
                self._on_error(exc)
        return await self._local.paths_in_force(name)

    def tombstones(self) -> TombstoneMap:
        """``view().tombstones`` without building the view."""
        return self._local.tombstones()

    def set_adapter(self, spec: AdapterSpec) -> None:
        """Put ``spec`` in the mirror only (read from Redis; the next refresh agrees)."""
        self._local.set_adapter(spec)

    # --- adapters defined in config files (``state.definitions``) -----------------------------
    async def claim_definitions(self, claims: Sequence[DefinitionClaim]) -> DefinitionMap:
        """Redis decides (one round trip); each claim carries the definition last seen in force
        (written back if Redis lost it). While Redis is unreachable the definitions last seen in
        force stay, lapsed or not (nobody can tell whether their instances are gone), and a
        name never seen is this instance's own."""
        now = self._clock.now()
        if not self._degraded:
            sent = [dataclasses.replace(c, known=self._known(c.name, now)) for c in claims]
            try:
                in_force = await self._remote.claim_definitions(sent)
            except StateUnavailableError as exc:
                self._on_error(exc)
            else:
                for name, entry in in_force.items():
                    self._definitions[name] = (entry.definition, now + entry.left_s)
                return in_force
        out: dict[AdapterId, InForce] = {}
        for c in claims:
            seen = self._definitions.get(c.name)
            if seen is not None:
                out[c.name] = InForce(seen[0], max(0.0, seen[1] - now))
            else:
                own = dataclasses.replace(c.ours, instance=self._remote.instance_id)
                out[c.name] = InForce(own, self._ttls.lease_ttl_s)
        return out

    async def renew_definitions(self, names: Sequence[AdapterId]) -> bool:
        """Redis renews the last claim's lease (one small script); the definitions last seen
        in force for ``names`` are then known to hold ``lease_ttl_s`` more (what a claim
        writes back if Redis loses its data). False while Redis is unreachable, and if it
        lost the lease: claim in full."""
        if self._degraded:
            return False
        now = self._clock.now()
        try:
            renewed = await self._remote.renew_definitions()
        except StateUnavailableError as exc:
            self._on_error(exc)
            return False
        if renewed:
            until = now + self._ttls.lease_ttl_s
            for name in names:
                seen = self._definitions.get(name)
                if seen is not None:
                    self._definitions[name] = (seen[0], max(seen[1], until))
        return renewed

    def _known(self, name: AdapterId, now: float) -> InForce | None:
        """The definition last seen in force, to write back if Redis lost it; not an admin
        registration's (the registry is written back by the resync, and a deleted one must
        not come back as a definition)."""
        seen = self._definitions.get(name)
        if seen is None or seen[1] <= now or seen[0].instance == REGISTERED:
            return None
        return InForce(seen[0], seen[1] - now)

    # --- adapter-load refusals ----------------------------------------------------------------
    async def record_refusal(
        self, replica_id: ReplicaId, adapter: AdapterId, *, path: str, error: str, ttl_s: float
    ) -> None:
        await self._local.record_refusal(replica_id, adapter, path=path, error=error, ttl_s=ttl_s)
        clock = self._clock
        until = clock.now() + ttl_s

        async def op(r: RedisStore) -> None:
            left = until - clock.now()  # replayed after an outage: only what is left
            if left > 0:
                await r.record_refusal(replica_id, adapter, path=path, error=error, ttl_s=left)
            else:  # (not remembered, or lapsed: only the residency change is left to make)
                await r.record_unload(replica_id, adapter)

        await self._tracked_write(self._refusal_writes, op)

    async def forget_refusals(
        self, adapter: AdapterId, replica_id: ReplicaId | None = None
    ) -> None:
        await self._local.forget_refusals(adapter, replica_id)
        await self._tracked_write(
            self._refusal_writes, lambda r: r.forget_refusals(adapter, replica_id)
        )

    async def _tracked_write(self, writes: _TrackedWrites, op: RemoteOp) -> None:
        writes.begun += 1
        writes.waiting += 1
        try:
            await self._write(op)
        finally:
            writes.waiting -= 1

    def refusals(self) -> RefusalMap:
        """``view().refusals`` without building the view."""
        return self._local.refusals()

    # --- drained replicas ----------------------------------------------------------------------
    async def set_drain(self, replica_id: ReplicaId, since_s: float | None = None) -> bool:
        """In the mirror at once (this instance stops routing there), then in Redis (every
        instance at its next refresh). True if the mirror did not hold it yet. ``since_s``
        None: Redis times it (its clock, which times the instances' reads); the mirror holds
        our clock's time until Redis answers (or, if Redis is down, until the resync)."""
        local = self._local
        added = await local.set_drain(replica_id, since_s)

        async def op(r: RedisStore) -> None:
            local.retime_drain(replica_id, (await r.drain(replica_id, since_s))[1])

        await self._tracked_write(self._drain_writes, op)
        return added

    async def clear_drain(self, replica_id: ReplicaId) -> bool:
        removed = await self._local.clear_drain(replica_id)
        await self._tracked_write(self._drain_writes, lambda r: r.clear_drain(replica_id))
        return removed

    def drains(self) -> DrainMap:
        """``view().drains`` without building the view."""
        return self._local.drains()

    # --- replicas shutting down ------------------------------------------------------------------
    async def hold_stopping(self, replica_id: ReplicaId, *, error: str, ttl_s: float) -> None:
        """In the mirror at once, then in Redis (every instance at its next refresh); replayed
        after an outage with the time it has left."""
        await self._local.hold_stopping(replica_id, error=error, ttl_s=ttl_s)
        clock = self._clock
        until = clock.now() + ttl_s

        async def op(r: RedisStore) -> None:
            left = until - clock.now()
            if left > 0:
                await r.hold_stopping(replica_id, error=error, ttl_s=left)

        await self._tracked_write(self._stopping_writes, op)

    async def release_stopping(self, replica_id: ReplicaId) -> None:
        await self._local.release_stopping(replica_id)
        await self._tracked_write(self._stopping_writes, lambda r: r.release_stopping(replica_id))

    def stopping(self) -> StoppingMap:
        """``view().stopping`` without building the view."""
        return self._local.stopping()

    def readers_before(self, t_s: float) -> dict[str, float]:
        """The other instances on this Redis whose last read (as of our last refresh) was
        before ``t_s``: instance -> when (epoch seconds, Redis's clock). Both are timed to the
        millisecond: a read in the same millisecond as ``t_s`` counts as before it."""
        return {i: t for i, t in self._readers.items() if t <= t_s}

    # --- demand, leader, version -------------------------------------------------------------
    async def demand(self, since_s: float, until_s: float) -> dict[float, dict[AdapterId, int]]:
        """Shared counts; this instance's own counts only while degraded."""
        if not self._degraded:
            try:
                return await self._remote.demand(since_s, until_s)
            except StateUnavailableError as exc:
                self._on_error(exc)
        return await self._local.demand(since_s, until_s)

    async def acquire_leader(self, name: str, holder: str, ttl_s: float) -> bool:
        if self._degraded:
            return False
        try:
            return await self._remote.acquire_leader(name, holder, ttl_s)
        except StateUnavailableError as exc:
            self._on_error(exc)
            return False

    async def release_leader(self, name: str, holder: str) -> bool:
        if self._degraded:
            return False
        try:
            return await self._remote.release_leader(name, holder)
        except StateUnavailableError as exc:
            self._on_error(exc)
            return False

    async def leader(self, name: str) -> str | None:
        if self._degraded:
            return None
        try:
            return await self._remote.leader(name)
        except StateUnavailableError as exc:
            self._on_error(exc)
            return None

    async def bump_version(self) -> int:
        local = await self._local.bump_version()
        if not self._queueing:  # else behind the writes it announces
            try:
                return await self._remote.bump_version()
            except StateUnavailableError as exc:
                self._on_error(exc)
        self._journal_append(lambda r: r.bump_version())
        return local

    @property
    def ttls(self) -> Ttls:
        return self._ttls

    @property
    def version(self) -> int:
        """``view().version`` without building the view."""
        return self._local.version

    async def close(self) -> None:
        if not self._degraded:  # no longer an instance that may miss a drain
            try:
                await self._remote.forget_reader()
            except StateUnavailableError as exc:
                log.debug("state: removing this instance from the readers: %s", exc)
        await self._remote.close()


async def run_maintenance(store: StateStore, *, interval_s: float = 0.05) -> None:
    """Background loop for the gateway: ``store.maintain()`` forever; cancel to stop."""
    while True:
        try:
            await store.maintain()
        except asyncio.CancelledError:
            raise
        except Exception:  # never let housekeeping die; the next round retries
            log.exception("state: maintenance round failed")
        await asyncio.sleep(interval_s)
