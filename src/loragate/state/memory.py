"""``MemoryStore``: the embedded state store of a single gateway process (and the simulator).

Also the reference model for ``RedisStore`` (tests run both through the same sequences) and
the local mirror inside ``ResilientStore``.

In-flight leases here carry no TTL: they live in the same process as the requests, so they
cannot outlive a crashed gateway; the gateway must call ``end_request`` in a ``finally``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

from loragate.core.clock import Clock, WallClock
from loragate.core.types import AdapterId, AdapterSpec, ReplicaId, ReplicaSettings, Residency
from loragate.state import residency as rz
from loragate.state.definitions import DefinitionClaim, DefinitionMap, InForce, decide
from loragate.state.keys import Ttls
from loragate.state.store import (
    NO_DRAINS,
    NO_REFUSALS,
    NO_STOPPING,
    NO_TOMBSTONES,
    DrainMap,
    RefusalMap,
    ReplicaRecord,
    SharedRefusal,
    StateView,
    StoppingHold,
    StoppingMap,
    TombstoneMap,
)

_DEFAULT_SETTINGS = ReplicaSettings()


class MemoryStore:
    """Single-process ``StateStore``. ``clock`` measures leader-lease TTLs."""

    def __init__(self, *, ttls: Ttls | None = None, clock: Clock | None = None) -> None:
        self._ttls = ttls or Ttls()
        self._clock: Clock = clock or WallClock()
        self._replicas: dict[ReplicaId, ReplicaRecord] = {}
        self._residency: dict[ReplicaId, Residency] = {}
        self._leases: dict[ReplicaId, set[str]] = defaultdict(set)
        self._adapters: dict[AdapterId, AdapterSpec] = {}
        self._demand: dict[int, dict[AdapterId, int]] = {}
        self._leaders: dict[str, tuple[str, float]] = {}
        # Adapter -> replica -> (path, error, until on ``clock``).
        self._refusals: dict[AdapterId, dict[ReplicaId, tuple[str, str, float]]] = {}
        # Deleted adapter -> until (on ``clock``).
        self._tombstones: dict[AdapterId, float] = {}
        # Config-file adapter name -> (its definition in force, until on ``clock``).
        self._definitions: dict[AdapterId, tuple[InForce, float]] = {}
        # Drained replica -> since (epoch seconds); copy-on-write (views share it).
        self._drains: dict[ReplicaId, float] = {}
        # Replica shutting down -> (what it answered, until on ``clock``).
        self._stopping: dict[ReplicaId, tuple[str, float]] = {}
        # Adapter a PUT is replacing -> (the new path, until on ``clock``).
        self._replacing: dict[AdapterId, tuple[str, float]] = {}
        self._version = 0
        # Whose claims these are (``RedisStore.instance_id`` in the mirror of a ResilientStore).
        self.instance_id = "local"

    # --- hot path -------------------------------------------------------------------------
    async def begin_request(
        self, replica_id: ReplicaId, adapter: AdapterId | None, request_id: str, now_s: float
    ) -> None:
        self.begin_now(replica_id, adapter, request_id, now_s)

    async def end_request(self, replica_id: ReplicaId, request_id: str) -> None:
        self.end_now(replica_id, request_id)

    def begin_now(
        self, replica_id: ReplicaId, adapter: AdapterId | None, request_id: str, now_s: float
    ) -> None:
        """``begin_request`` without a coroutine (the gateway's hot path)."""
        self._leases[replica_id].add(request_id)
        if adapter is not None:
            self.apply_touch(replica_id, adapter)
            self.count_demand(adapter, now_s, 1)

    def end_now(self, replica_id: ReplicaId, request_id: str) -> None:
        """``end_request`` without a coroutine (the gateway's hot path)."""
        leases = self._leases.get(replica_id)
        if leases is not None:
            leases.discard(request_id)
            if not leases:
                del self._leases[replica_id]

    async def snapshot(self) -> StateView:
        return self.view()

    def view(self) -> StateView:
        """The snapshot, synchronously. Costs O(replicas): the replica and adapter maps are
        copy-on-write, so the view shares them instead of copying."""
        return StateView(
            version=self._version,
            replicas=self._replicas,
            residency={r: self._residency.get(r, rz.EMPTY) for r in self._replicas},
            in_flight={r: len(self._leases.get(r, ())) for r in self._replicas},
            adapters=self._adapters,
            refusals=self.refusals(),
            tombstones=self.tombstones(),
            drains=self.drains(),
            stopping=self.stopping(),
            degraded=False,
        )

    def in_flight_of(self, replica_id: ReplicaId) -> int:
        """Live leases on one replica, without building a view (the gateway's hot path)."""
        return len(self._leases.get(replica_id, ()))

    def residency_of(self, replica_id: ReplicaId) -> Residency:
        """One replica's shadow residency, without building a view (the gateway's hot path)."""
        return self._residency.get(replica_id, rz.EMPTY)

    # --- synchronous helpers (also used by ResilientStore) --------------------------------
    def settings_of(self, replica_id: ReplicaId) -> ReplicaSettings:
        rec = self._replicas.get(replica_id)
        return rec.settings if rec is not None else _DEFAULT_SETTINGS

    def apply_touch(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        res = self._residency.get(replica_id, rz.EMPTY)
        self._residency[replica_id] = rz.touch(res, adapter, self.settings_of(replica_id))

    def count_demand(self, adapter: AdapterId, now_s: float, n: int) -> None:
        bucket = self._ttls.demand_bucket(now_s)
        counts = self._demand.setdefault(bucket, {})
        counts[adapter] = counts.get(adapter, 0) + n
        oldest = bucket - self._ttls.demand_retention_buckets
        if len(self._demand) > self._ttls.demand_retention_buckets:
            for b in [b for b in self._demand if b <= oldest]:
                del self._demand[b]

    def own_in_flight(self) -> dict[ReplicaId, int]:
        return {r: len(ids) for r, ids in self._leases.items() if ids}

    def own_leases(self) -> dict[str, ReplicaId]:
        return {rid: r for r, ids in self._leases.items() for rid in ids}

    def replace_shared(
        self,
        view: StateView,
        *,
        keep_refusals: bool = False,
        keep_drains: bool = False,
        keep_stopping: bool = False,
    ) -> None:
        """Adopt a shared view (registry, residency, adapters, tombstones, refusals unless
        ``keep_refusals``, drains unless ``keep_drains``, holds of replicas shutting down
        unless ``keep_stopping``, version); keep own leases and demand counts."""
        if not keep_drains:
            self._drains = dict(view.drains)
        self._replicas = dict(view.replicas)
        self._residency = dict(view.residency)
        self._adapters = dict(view.adapters)  # copy-on-write from here on
        self._version = view.version
        now = self._clock.now()
        self._tombstones = {name: now + left for name, left in view.tombstones.items()}
        if not keep_stopping:
            self._stopping = {r: (x.error, now + x.left_s) for r, x in view.stopping.items()}
        if not keep_refusals:
            self._refusals = {
                name: {r: (x.path, x.error, now + x.left_s) for r, x in by_replica.items()}
                for name, by_replica in view.refusals.items()
                if by_replica
            }

    # --- replica registry -----------------------------------------------------------------
    async def upsert_replica(self, record: ReplicaRecord) -> None:
        self._replicas = {**self._replicas, record.replica_id: record}
        self._residency.setdefault(record.replica_id, rz.EMPTY)
        self._version += 1

    async def remove_replica(self, replica_id: ReplicaId) -> None:
        self._replicas = {r: v for r, v in self._replicas.items() if r != replica_id}
        self._residency.pop(replica_id, None)
        self._leases.pop(replica_id, None)
        if replica_id in self._drains:
            self._drains = {r: t for r, t in self._drains.items() if r != replica_id}
        self._version += 1

    async def set_replica_health(self, replica_id: ReplicaId, healthy: bool, now_s: float) -> None:
        rec = self._replicas.get(replica_id)
        if rec is not None:
            new = dataclasses.replace(rec, healthy=healthy, updated_s=now_s)
            self._replicas = {**self._replicas, replica_id: new}

    # --- residency --------------------------------------------------------------------------
    async def record_load(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        res = self._residency.get(replica_id, rz.EMPTY)
        self._residency[replica_id] = rz.load(res, adapter, self.settings_of(replica_id))

    async def record_unload(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        self._residency[replica_id] = rz.unload(self._residency.get(replica_id, rz.EMPTY), adapter)

    async def reconcile(self, replica_id: ReplicaId, seen: frozenset[AdapterId]) -> None:
        self._residency[replica_id] = rz.reconcile(self._residency.get(replica_id, rz.EMPTY), seen)

    # --- adapter registry -------------------------------------------------------------------
    async def put_adapter(self, spec: AdapterSpec) -> bool:
        if spec.name in self._adapters or self.definition(spec.name) is not None:
            return False
        self.set_adapter(spec)
        return True

    def set_adapter(self, spec: AdapterSpec) -> None:
        """Register ``spec`` whatever is there (the mirror of a write Redis accepted)."""
        self._adapters = {**self._adapters, spec.name: spec}
        self._tombstones.pop(spec.name, None)
        self._version += 1

    async def replace_adapter(
        self, spec: AdapterSpec, *, expected: AdapterSpec | None = None
    ) -> AdapterSpec | None:
        old = self._adapters.get(spec.name)
        if old is None or (expected is not None and old != expected):
            return None
        self.set_adapter(spec)
        return old

    async def delete_adapter(self, name: AdapterId) -> bool:
        if name not in self._adapters:
            return False
        self.remove_adapter(name)
        return True

    def remove_adapter(self, name: AdapterId) -> None:
        """Delete ``name`` and leave its tombstone (the mirror of a deletion Redis made)."""
        self._adapters = {n: v for n, v in self._adapters.items() if n != name}
        self._tombstones[name] = self._clock.now() + self._ttls.tombstone_ttl_s
        self._version += 1

    async def get_adapter(self, name: AdapterId) -> AdapterSpec | None:
        return self._adapters.get(name)

    async def begin_replacing(self, name: AdapterId, path: str, ttl_s: float) -> None:
        self._replacing[name] = (path, self._clock.now() + ttl_s)

    async def end_replacing(self, name: AdapterId) -> None:
        self._replacing.pop(name, None)

    async def paths_in_force(self, name: AdapterId) -> frozenset[str]:
        paths = set()
        spec = self._adapters.get(name)
        if spec is not None:
            paths.add(spec.path)
        replacing = self._replacing.get(name)
        if replacing is not None:
            if replacing[1] > self._clock.now():
                paths.add(replacing[0])
            else:
                del self._replacing[name]
        return frozenset(paths)

    def tombstones(self) -> TombstoneMap:
        """The tombstones in force now: name -> seconds left (expired ones are dropped)."""
        if not self._tombstones:
            return NO_TOMBSTONES
        now = self._clock.now()
        for name in [n for n, until in self._tombstones.items() if until <= now]:
            del self._tombstones[name]
        return {name: until - now for name, until in self._tombstones.items()}

    async def list_adapters(self) -> list[AdapterSpec]:
        return [self._adapters[n] for n in sorted(self._adapters)]

    # --- adapters defined in config files (``state.definitions``) -----------------------------
    async def claim_definitions(self, claims: Sequence[DefinitionClaim]) -> DefinitionMap:
        """Claim each definition (the rule: ``definitions.decide``, claims live
        ``Ttls.lease_ttl_s``; a name registered here is the registration's); returns the
        definitions in force for the claimed names."""
        now = self._clock.now()
        out: dict[AdapterId, InForce] = {}
        for claim in claims:
            current = self.definition(claim.name)
            registered = self._adapters.get(claim.name)
            in_force, changed = decide(
                current,
                claim,
                instance=self.instance_id,
                ttl_s=self._ttls.lease_ttl_s,
                registered=registered,
            )
            if registered is None:  # a registration is not a claim: nothing to keep
                self._definitions[claim.name] = (in_force, now + in_force.left_s)
            if changed:
                self._version += 1
            out[claim.name] = in_force
        return out

    async def renew_definitions(self, names: Sequence[AdapterId]) -> bool:
        """Always False: claiming in full costs nothing in process."""
        return False

    def definition(self, name: AdapterId) -> InForce | None:
        """The definition in force for ``name`` (None: none, or it lapsed)."""
        entry = self._definitions.get(name)
        if entry is None:
            return None
        left = entry[1] - self._clock.now()
        if left <= 0:
            del self._definitions[name]
            return None
        return InForce(entry[0].definition, left)

    def adopt_definitions(self, in_force: DefinitionMap) -> None:
        """Keep the definitions the shared store has in force (the mirror's copy)."""
        now = self._clock.now()
        for name, entry in in_force.items():
            self._definitions[name] = (entry, now + entry.left_s)

    # --- adapter-load refusals -----------------------------------------------------------------
    async def record_refusal(
        self, replica_id: ReplicaId, adapter: AdapterId, *, path: str, error: str, ttl_s: float
    ) -> None:
        await self.record_unload(replica_id, adapter)
        if ttl_s <= 0:
            await self.forget_refusals(adapter, replica_id)
            return
        until = self._clock.now() + ttl_s
        self._refusals.setdefault(adapter, {})[replica_id] = (path, error, until)

    async def forget_refusals(
        self, adapter: AdapterId, replica_id: ReplicaId | None = None
    ) -> None:
        if replica_id is None:
            self._refusals.pop(adapter, None)
            return
        by_replica = self._refusals.get(adapter)
        if by_replica is not None:
            by_replica.pop(replica_id, None)
            if not by_replica:
                del self._refusals[adapter]

    def refusals(self) -> RefusalMap:
        """The refusals in force now (expired ones are dropped here)."""
        if not self._refusals:
            return NO_REFUSALS
        now = self._clock.now()
        out: dict[AdapterId, dict[ReplicaId, SharedRefusal]] = {}
        for name, by_replica in list(self._refusals.items()):
            for rid, (path, error, until) in list(by_replica.items()):
                if until <= now:
                    del by_replica[rid]
                else:
                    out.setdefault(name, {})[rid] = SharedRefusal(
                        path=path, error=error, left_s=until - now
                    )
            if not by_replica:
                del self._refusals[name]
        return out

    # --- drained replicas ---------------------------------------------------------------------
    async def set_drain(self, replica_id: ReplicaId, since_s: float | None = None) -> bool:
        if replica_id in self._drains:
            return False
        since = time.time() if since_s is None else since_s
        self._drains = {**self._drains, replica_id: since}
        return True

    def retime_drain(self, replica_id: ReplicaId, since_s: float) -> None:
        """The drain's since as the shared store recorded it (if it is still drained here)."""
        if replica_id in self._drains:
            self._drains = {**self._drains, replica_id: since_s}

    async def clear_drain(self, replica_id: ReplicaId) -> bool:
        if replica_id not in self._drains:
            return False
        self._drains = {r: t for r, t in self._drains.items() if r != replica_id}
        return True

    def drains(self) -> DrainMap:
        """The drained replicas: replica -> since (epoch seconds)."""
        return self._drains if self._drains else NO_DRAINS

    # --- replicas shutting down ---------------------------------------------------------------
    async def hold_stopping(self, replica_id: ReplicaId, *, error: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            self._stopping.pop(replica_id, None)
            return
        self._stopping[replica_id] = (error, self._clock.now() + ttl_s)

    async def release_stopping(self, replica_id: ReplicaId) -> None:
        self._stopping.pop(replica_id, None)

    def stopping(self) -> StoppingMap:
        """The holds in force now (expired ones are dropped here): replica -> hold."""
        if not self._stopping:
            return NO_STOPPING
        now = self._clock.now()
        for rid in [r for r, (_, until) in self._stopping.items() if until <= now]:
            del self._stopping[rid]
        return {
            rid: StoppingHold(error=error, left_s=until - now)
            for rid, (error, until) in self._stopping.items()
        }

    def readers_before(self, t_s: float) -> Mapping[str, float]:
        """No other instance shares an embedded store."""
        return {}

    # --- demand -------------------------------------------------------------------------------
    async def demand(self, since_s: float, until_s: float) -> dict[float, dict[AdapterId, int]]:
        width = self._ttls.demand_bucket_s
        return {
            b * width: dict(self._demand[b])
            for b in self._ttls.demand_buckets(since_s, until_s)
            if self._demand.get(b)
        }

    # --- leader and version ---------------------------------------------------------------------
    async def acquire_leader(self, name: str, holder: str, ttl_s: float) -> bool:
        now = self._clock.now()
        current = self._leaders.get(name)
        if current is None or current[1] <= now or current[0] == holder:
            self._leaders[name] = (holder, now + ttl_s)
            return True
        return False

    async def release_leader(self, name: str, holder: str) -> bool:
        current = self._leaders.get(name)
        if current is not None and current[0] == holder:
            del self._leaders[name]
            return current[1] > self._clock.now()
        return False

    async def leader(self, name: str) -> str | None:
        current = self._leaders.get(name)
        if current is None or current[1] <= self._clock.now():
            return None
        return current[0]

    async def bump_version(self) -> int:
        self._version += 1
        return self._version

    # --- lifecycle -----------------------------------------------------------------------------
    async def maintain(self) -> None:
        return None

    @property
    def ttls(self) -> Ttls:
        return self._ttls

    @property
    def version(self) -> int:
        """``view().version`` without building the view."""
        return self._version

    @property
    def degraded(self) -> bool:
        return False

    @property
    def error_count(self) -> int:
        return 0

    async def close(self) -> None:
        return None
