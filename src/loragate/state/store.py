"""The ``StateStore`` protocol and the values it returns.

Every gateway instance talks to the shared state through this protocol. Implementations:
``MemoryStore`` (embedded, one process), ``RedisStore`` (raw Redis; raises
``StateUnavailableError`` when Redis is unreachable) and ``ResilientStore`` (Redis behind a
local mirror; never raises because Redis is down). The gateway should use ``MemoryStore`` or
``ResilientStore``.

Times: ``now_s`` arguments are *event* times used to pick demand buckets. The gateway passes
epoch seconds (``time.time()``) so all instances agree on buckets; the simulator passes its
virtual time. Lease expiry is measured by the store itself (Redis server time for Redis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from loragate.core.errors import LoragateError
from loragate.core.types import (
    AdapterId,
    AdapterSpec,
    ReplicaId,
    ReplicaSettings,
    ReplicaSnapshot,
    Residency,
)
from loragate.state.definitions import DefinitionClaim, DefinitionMap
from loragate.state.keys import Ttls
from loragate.state.residency import EMPTY


class StateUnavailableError(LoragateError):
    """The shared state backend (Redis) could not be reached or answered with an error."""


class StateTimeoutError(StateUnavailableError):
    """No answer in time: Redis slow (``DEBUG SLEEP``, a long script, a fork), or its answer
    unread while our own event loop was held up, or Redis gone without a word (a partition).
    Unlike a refused or reset connection, one such error does not tell an outage."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaRecord:
    """One replica in the shared replica registry."""

    replica_id: ReplicaId
    url: str
    settings: ReplicaSettings = field(default_factory=ReplicaSettings)
    healthy: bool = True
    # Event time (caller's clock) of the last registry or health write.
    updated_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedRefusal:
    """A replica refused to load an adapter from ``path`` (vLLM's ``error``); in force for
    ``left_s`` more seconds at the time the view was taken. Expiry is measured by the store
    (Redis server time for Redis), so instances need no synchronised clocks."""

    path: str
    error: str
    left_s: float


# Adapter -> replica -> refusal: what every instance leaves out of that adapter's candidates.
RefusalMap = Mapping[AdapterId, Mapping[ReplicaId, SharedRefusal]]
NO_REFUSALS: RefusalMap = MappingProxyType({})
# Adapter -> seconds its tombstone has left (adapters deleted through the admin API lately).
TombstoneMap = Mapping[AdapterId, float]
NO_TOMBSTONES: TombstoneMap = MappingProxyType({})
# Replica -> when it was drained (epoch seconds of the instance that drained it): replicas that
# get no new requests from any instance (``POST /admin/replicas/{id}/drain``).
DrainMap = Mapping[ReplicaId, float]
NO_DRAINS: DrainMap = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class StoppingHold:
    """A replica answered a gateway instance that it is shutting down (vLLM's drain under
    ``--shutdown-timeout``: its ``/health`` still says 200), so no instance routes new requests
    there, for ``left_s`` more seconds at the time the view was taken (expiry measured by the
    store: Redis server time for Redis) or until an instance's poll finds it gone.
    ``error``: what it answered."""

    error: str
    left_s: float


# Replica -> its hold: the replicas every instance keeps out of rotation while they shut down.
StoppingMap = Mapping[ReplicaId, StoppingHold]
NO_STOPPING: StoppingMap = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class StateView:
    """A consistent read of the shared state (one Redis round trip for ``RedisStore``).

    ``in_flight`` counts live leases of every gateway instance. ``residency`` holds an entry for
    every registered replica. ``refusals`` holds the adapter loads replicas refused that are
    still in force (any instance's). ``tombstones`` holds the adapters deleted lately (name ->
    seconds left), which no replica should keep. ``drains`` holds the replicas being drained
    (replica -> when), which no instance routes new requests to. ``stopping`` holds the
    replicas that said they are shutting down (replica -> hold), which no instance routes new
    requests to either while the hold lasts. ``readers`` holds the
    gateway instances' last reads of the shared state (instance id -> when, epoch seconds of
    the Redis server's clock, as the drains Redis timed; Redis only). ``degraded`` is True
    when the view is local-only because the shared backend is unreachable.
    """

    version: int = 0
    replicas: Mapping[ReplicaId, ReplicaRecord] = field(default_factory=dict)
    residency: Mapping[ReplicaId, Residency] = field(default_factory=dict)
    in_flight: Mapping[ReplicaId, int] = field(default_factory=dict)
    adapters: Mapping[AdapterId, AdapterSpec] = field(default_factory=dict)
    refusals: RefusalMap = field(default_factory=dict)
    tombstones: TombstoneMap = field(default_factory=dict)
    drains: DrainMap = field(default_factory=dict)
    stopping: StoppingMap = field(default_factory=dict)
    readers: Mapping[str, float] = field(default_factory=dict)
    degraded: bool = False

    def residency_of(self, replica_id: ReplicaId) -> Residency:
        return self.residency.get(replica_id, EMPTY)

    def in_flight_of(self, replica_id: ReplicaId) -> int:
        return self.in_flight.get(replica_id, 0)

    def apply_to(self, snapshots: Iterable[ReplicaSnapshot]) -> list[ReplicaSnapshot]:
        """Fill the gateway-side fields (in-flight count, residency) of pool snapshots."""
        return [
            dataclasses.replace(
                s,
                in_flight=self.in_flight_of(s.replica_id),
                residency=self.residency_of(s.replica_id),
            )
            for s in snapshots
        ]


class StateStore(Protocol):
    """Shared state of a loragate deployment (see module docstring for time conventions)."""

    # --- hot path: one call each per routed request -------------------------------------
    async def begin_request(
        self, replica_id: ReplicaId, adapter: AdapterId | None, request_id: str, now_s: float
    ) -> None:
        """A request was routed: take an in-flight lease on the replica, touch the adapter in
        its shadow residency, count one request of demand for the adapter (``None`` = base
        model: lease only). One Redis round trip."""
        ...

    async def end_request(self, replica_id: ReplicaId, request_id: str) -> None:
        """The request finished (success or not): release its lease. One Redis round trip.
        Call it in a ``finally``."""
        ...

    async def snapshot(self) -> StateView:
        """Everything routing needs, for every replica."""
        ...

    # --- replica registry and health ------------------------------------------------------
    async def upsert_replica(self, record: ReplicaRecord) -> None: ...

    async def remove_replica(self, replica_id: ReplicaId) -> None: ...

    async def set_replica_health(
        self, replica_id: ReplicaId, healthy: bool, now_s: float
    ) -> None: ...

    # --- shadow residency from admin calls and polls --------------------------------------
    async def record_load(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        """Our ``/v1/load_lora_adapter`` call succeeded: the adapter is registered and, as vLLM
        activates what it loads, most recent in the CPU cache and a GPU slot
        (``residency.load``), whether or not a request for it follows."""
        ...

    async def record_unload(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        """Our ``/v1/unload_lora_adapter`` call succeeded."""
        ...

    async def reconcile(self, replica_id: ReplicaId, seen: frozenset[AdapterId]) -> None:
        """A ``/v1/models`` poll listed ``seen`` as the replica's adapters."""
        ...

    # --- adapter registry (admin API) -----------------------------------------------------
    async def put_adapter(self, spec: AdapterSpec) -> bool:
        """Register ``spec`` if no adapter of that name is registered and no instance's config
        file defines it (a definition in force, ``claim_definitions``), atomically with the
        version bump and clearing the name's tombstone: True; else change nothing: False."""
        ...

    async def replace_adapter(
        self, spec: AdapterSpec, *, expected: AdapterSpec | None = None
    ) -> AdapterSpec | None:
        """Replace the registered adapter ``spec.name`` with ``spec`` (``PUT
        /admin/adapters/N``), atomically with the version bump, if it is registered (and,
        with ``expected``, registered as ``expected``): returns the definition it replaced;
        None if nothing changed (not registered, or not as ``expected``). The name is
        registered throughout: no instance ever sees it unknown."""
        ...

    async def delete_adapter(self, name: AdapterId) -> bool:
        """Remove the adapter and leave a tombstone for it (``Ttls.tombstone_ttl_s``) in one
        atomic step: True; False (nothing changed) if it was not registered."""
        ...

    async def get_adapter(self, name: AdapterId) -> AdapterSpec | None:
        """One registered adapter, read from the shared backend (one Redis round trip)."""
        ...

    async def begin_replacing(self, name: AdapterId, path: str, ttl_s: float) -> None:
        """A ``PUT`` of this instance starts reloading the replicas that hold ``name`` from
        ``path`` (before the registry swaps to it): :meth:`paths_in_force` names ``path`` for
        every instance until :meth:`end_replacing`, or ``ttl_s`` (a crashed instance's). A hint
        of no consequence to the registry: not replayed after an outage."""
        ...

    async def end_replacing(self, name: AdapterId) -> None: ...

    async def paths_in_force(self, name: AdapterId) -> frozenset[str]:
        """The paths ``name`` may be held from for every instance, read from the shared
        backend (one Redis round trip; the local view while it is unreachable): the
        registered definition's, and the path a ``PUT`` under way on any instance is
        reloading it from. Empty if neither."""
        ...

    async def list_adapters(self) -> list[AdapterSpec]: ...

    # --- adapter-load refusals (shared by every instance) -----------------------------------
    async def record_refusal(
        self, replica_id: ReplicaId, adapter: AdapterId, *, path: str, error: str, ttl_s: float
    ) -> None:
        """The replica refused to load ``adapter`` from ``path``: every instance leaves it out
        of that adapter's candidates for ``ttl_s`` (a new refusal replaces the old one; 0: not
        remembered, an older one is forgotten), and the adapter leaves the replica's shadow
        residency (it did not register there; the routed request had touched it). One atomic
        write: no instance sees the refusal without the residency change, or the reverse."""
        ...

    async def forget_refusals(
        self, adapter: AdapterId, replica_id: ReplicaId | None = None
    ) -> None:
        """Forget the refusals of ``adapter`` by ``replica_id`` (None: by every replica)."""
        ...

    # --- replicas shutting down (vLLM's drain) ---------------------------------------------
    async def hold_stopping(self, replica_id: ReplicaId, *, error: str, ttl_s: float) -> None:
        """The replica answered that it is shutting down (``error``): every instance keeps it
        out of rotation for ``ttl_s`` (a new hold replaces the old one), or until
        :meth:`release_stopping`. Lives no longer than ``ttl_s`` whoever wrote it (an instance
        that crashed leaves nothing behind)."""
        ...

    async def release_stopping(self, replica_id: ReplicaId) -> None:
        """The replica's hold ends for every instance (a poll found it gone)."""
        ...

    # --- drained replicas (admin API) -----------------------------------------------------
    async def set_drain(self, replica_id: ReplicaId, since_s: float | None = None) -> bool:
        """Drain the replica for every instance (no new requests; it stays in the registry and
        is still polled) until :meth:`clear_drain` or its removal from the registry. Kept
        across gateway restarts (Redis). True if it was not drained yet (else nothing changes:
        the first ``since_s`` stays). ``since_s`` None: now, by the store's clock (Redis: the
        server's, the clock of the instances' reads, so that whether an instance has read the
        shared state since the drain began is decided without clock skew)."""
        ...

    async def clear_drain(self, replica_id: ReplicaId) -> bool:
        """Undrain the replica; True if it was drained."""
        ...

    # --- demand ---------------------------------------------------------------------------
    async def demand(self, since_s: float, until_s: float) -> dict[float, dict[AdapterId, int]]:
        """Requests per adapter per bucket, keyed by bucket start (seconds), buckets that
        overlap ``[since_s, until_s)``; empty buckets are left out."""
        ...

    # --- leader lease and config version --------------------------------------------------
    async def acquire_leader(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease if free, or renew it if ``holder`` holds it. False otherwise (and
        always False while the shared backend is unreachable)."""
        ...

    async def release_leader(self, name: str, holder: str) -> bool: ...

    async def leader(self, name: str) -> str | None: ...

    async def bump_version(self) -> int:
        """Tell every instance that configuration changed (they see a new ``version``)."""
        ...

    # --- lifecycle ------------------------------------------------------------------------
    async def maintain(self) -> None:
        """Periodic housekeeping (renew leases, refresh the view, retry Redis). The gateway
        calls it from a background loop, see ``run_maintenance``."""
        ...

    @property
    def degraded(self) -> bool: ...

    @property
    def error_count(self) -> int:
        """Errors talking to the shared backend so far (for /metrics)."""
        ...

    async def close(self) -> None: ...


class GatewayStore(StateStore, Protocol):
    """A store with a local view: what the gateway uses (``MemoryStore``, ``ResilientStore``).

    ``view()`` is synchronous and does no I/O, so the gateway may call it on every request;
    ``in_flight_of`` and ``residency_of`` read one replica's entry of that view without
    building it (what the gateway's routing reads per request and replica).
    """

    def view(self) -> StateView: ...

    def in_flight_of(self, replica_id: ReplicaId) -> int: ...

    def residency_of(self, replica_id: ReplicaId) -> Residency: ...

    def refusals(self) -> RefusalMap:
        """``view().refusals`` without building the view."""
        ...

    def tombstones(self) -> TombstoneMap:
        """``view().tombstones`` without building the view."""
        ...

    def drains(self) -> DrainMap:
        """``view().drains`` without building the view."""
        ...

    def stopping(self) -> StoppingMap:
        """``view().stopping`` without building the view."""
        ...

    def readers_before(self, t_s: float) -> Mapping[str, float]:
        """The other gateway instances sharing this store whose last read of the shared state
        (as of this instance's last refresh) was before ``t_s`` (a drain's since): instance id
        -> when (epoch seconds). They have not seen that drain. Empty for the embedded store."""
        ...

    def set_adapter(self, spec: AdapterSpec) -> None:
        """Put ``spec`` in the local view (no shared write): an adapter just read from the
        shared backend (``get_adapter``) that the view has not refreshed in yet."""
        ...

    async def claim_definitions(self, claims: Sequence[DefinitionClaim]) -> DefinitionMap:
        """Claim the definitions of this instance's config-file adapters (``state.definitions``):
        the definitions in force for those names. Never raises because Redis is down."""
        ...

    async def renew_definitions(self, names: Sequence[AdapterId]) -> bool:
        """Renew what the last :meth:`claim_definitions` (of ``names``) holds, without sending
        the claims again (Redis: one lease key). False: nothing renewed, claim in full (the
        embedded store, whose claims cost nothing; Redis unreachable, or it lost the lease).
        Never raises because Redis is down."""
        ...

    @property
    def ttls(self) -> Ttls: ...

    @property
    def version(self) -> int:
        """``view().version`` without building the view."""
        ...
