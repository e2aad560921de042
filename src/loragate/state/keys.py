"""Every Redis key name and every TTL of the shared state, in one place.

Layout (``P`` is the key prefix, ``loragate:`` by default; ``R`` a replica id):

==========================  ======  ===========================================================
key                          type    content / lifetime
==========================  ======  ===========================================================
``P epoch``                  STRING  random token set once per Redis dataset; a change (or its
                                     absence) tells a gateway that Redis lost its data
``P version``                STRING  config/registry version: INCR on every adapter-registry or
                                     replica-registry change and on ``bump_version``
``P replicas``               SET     replica ids
``P rep:R``                  HASH    replica record: url, healthy, updated_s, ReplicaSettings
``P rep:R:reg``              SET     registered adapters (shadow residency)
``P rep:R:gpu``              LIST    GPU-slot LRU, least recent first (``max_loras`` long)
``P rep:R:cpu``              LIST    CPU-cache LRU, least recent first (``max_cpu_loras`` long)
``P rep:R:stamps``           HASH    adapter -> ``"<n> <instance>"``: change number n (field
                                     ``''``: the last one, counting up) and the instance of
                                     the adapter's last join to or leave from
                                     ``P rep:R:reg``; a reconcile leaves alone an adapter
                                     another instance changed since the reconciling
                                     instance's last read (the number its snapshot row
                                     gave), so a poll journaled during an outage and
                                     replayed later does not undo a newer write. Deleted
                                     with the replica
``P rep:R:inflight``         ZSET    in-flight leases ``<instance>|<request id>`` -> expiry
                                     (ms, Redis server time); key PEXPIREs ``lease_ttl_s``
                                     after its last write
``P adapters``               HASH    adapter registry: name -> JSON {path, rank, tenants};
                                     a name is added only if absent (HSETNX: two instances
                                     registering one name at once, one wins)
``P tombstones``             HASH    adapters deleted through the admin API lately: name ->
                                     ``<until ms>`` (Redis server time), written in the same
                                     script as the deletion, ``Ttls.tombstone_ttl_s`` long;
                                     cleared by a new registration of the name, dropped by
                                     the snapshot script once past; the key PEXPIREs with its
                                     last entry; a resync after Redis lost its data writes
                                     back the tombstones its instance knows, with the time
                                     they have left. An instance unloads a tombstoned adapter
                                     that a replica still lists (a stale instance may have
                                     loaded it back on demand)
``P restored``               SET     adapters a resync wrote back into a Redis that lost its
                                     data, from an instance's view (not registered through
                                     the admin API since): a tombstone written back later
                                     removes them (that view predated the deletion); PEXPIREs
                                     ``Ttls.tombstone_ttl_s`` after its last addition
``P replacing:N``            STRING  the new path a ``PUT /admin/adapters/N`` on some instance is
                                     reloading the replicas with (before the registry swaps
                                     to it): a replica another instance finds holding the name
                                     from it is not reloaded back to the old path. Deleted when
                                     the ``PUT`` ends; PX a bound of its length (a crashed
                                     instance's lapses)
``P definitions``            HASH    adapters defined in config files: name -> JSON {path,
                                     rank, instance, until ms, by} (Redis server time): the
                                     definition in force for every instance (the first
                                     claim; see ``state.definitions``). It lapses when its
                                     ``until`` and every lease its ``by`` names (instance ->
                                     claim generation: ``P deflease:I|G``) have: an instance
                                     whose file agrees writes itself into ``by`` when it
                                     claims, and renews its lease, one key, every
                                     ``Ttls.lease_renew_s``; the hash PEXPIREs with the last
                                     claim or renewal
``P deflease:I|G``           STRING  instance ``I``'s claims of generation ``G`` (one per full
                                     claim: the definitions its file agreed with then) hold
                                     while it exists: PX ``Ttls.lease_ttl_s``, renewed every
                                     ``lease_renew_s`` (the current generation's only: a
                                     definition the file no longer claims lapses
                                     ``lease_ttl_s`` after that claim's last renewal, as
                                     does every claim of a crashed instance)
``P drains``                 HASH    replicas drained through the admin API: replica id ->
                                     when (epoch seconds, the draining instance's clock); no
                                     instance routes new requests there. No TTL: a drain
                                     lasts until undrained, or until the replica leaves the
                                     registry (``remove_replica``, which the gateway never
                                     calls); a replica leaving an instance's config (reload)
                                     keeps it, as instances not reloaded yet route to it; a
                                     resync after Redis lost its data writes back the drains
                                     its instance knows
``P stopping``               HASH    replicas that answered a gateway instance that they are
                                     shutting down (vLLM's drain: ``/health`` still 200):
                                     replica id -> ``"<until ms> <what it answered>"``; no
                                     instance routes new requests there until ``until``
                                     (Redis server time; the caller's TTL, the pool's
                                     ``stopping_hold_s``, 30 s) or until an instance's poll
                                     finds it gone (HDEL). Dropped by the snapshot script
                                     once past; the key PEXPIREs with its last entry, so a
                                     crashed instance's hold ends on time; a resync after
                                     Redis lost its data writes back the holds its instance
                                     knows, with the time they have left
``P readers``                HASH    gateway instances' last reads of the shared state:
                                     instance id -> Redis ms of its last refresh (the
                                     snapshot script, called by a ``ResilientStore``); an
                                     instance whose last read is older than a drain has not
                                     seen it (cut off from Redis, or gone). Entries older
                                     than ``Ttls.reader_ttl_s`` are dropped by the script; an
                                     instance that closes removes its own; the key PEXPIREs
                                     ``reader_ttl_s`` after the last read
``P demand:B``               HASH    adapter -> requests routed in bucket ``B``
                                     (``B = floor(t / demand_bucket_s)``); EXPIRE
                                     ``demand_retention_s``
``P leader:N``               STRING  holder of leader lease ``N``; PX = the caller's TTL
``P refusals``               HASH    adapter loads a replica refused: field
                                     :func:`refusal_field` ``(R, adapter)`` -> ``"<until ms>
                                     <JSON {path, error}>"``; each entry expires at its own
                                     ``until`` (Redis server time; the caller's TTL,
                                     ``poller.adapter_refusal_ttl_s``), dropped by the snapshot
                                     script once past; the key PEXPIREs with its last entry.
                                     Written in the same script as the adapter's removal from
                                     ``P rep:R:reg`` / ``:gpu`` / ``:cpu``
==========================  ======  ===========================================================

The snapshot and resync scripts build per-replica key names from the prefix inside Lua, so the
layout targets a single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loragate.core.types import ReplicaId

LEASE_SEPARATOR = "|"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ttls:
    """Lifetimes and periods of the shared state (seconds)."""

    # An in-flight lease lives this long unless its gateway renews it; a crashed gateway's
    # requests stop counting after at most this long.
    lease_ttl_s: float = 30.0
    # A live gateway renews all of its leases this often (must be well below lease_ttl_s).
    lease_renew_s: float = 10.0
    # Width of one demand bucket, and how long buckets are kept (``state.demand_retention_s``).
    demand_bucket_s: float = 10.0
    demand_retention_s: float = 24 * 3600.0
    # How often a ResilientStore pulls the shared view (0 Redis calls per request in between).
    refresh_s: float = 0.25
    # Retry backoff while Redis is unreachable.
    retry_initial_s: float = 0.1
    retry_max_s: float = 5.0
    # How long a deleted adapter's tombstone lives. It must outlast what a stale instance can
    # still do with the name: route to it until its next refresh (``refresh_s``) and finish an
    # on-demand load begun before that (bounded by the admin timeout, seconds on real vLLM),
    # plus one replica poll to notice it listed: far more than a few refresh periods.
    # ``state.tombstone_ttl_s`` in the gateway config.
    tombstone_ttl_s: float = 30.0
    # How long an instance's last read of the shared state is remembered (``P readers``): a
    # crashed instance is listed that long as one that may not have seen a drain (a script
    # waiting for a drain to be seen everywhere waits that long), and one cut off from Redis
    # longer is no longer listed (its own /health says degraded all along).
    reader_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        for name in (
            "lease_ttl_s",
            "lease_renew_s",
            "demand_bucket_s",
            "demand_retention_s",
            "refresh_s",
            "retry_initial_s",
            "retry_max_s",
            "tombstone_ttl_s",
            "reader_ttl_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"Ttls.{name} must be > 0")
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError("Ttls.lease_renew_s must be below Ttls.lease_ttl_s")

    @property
    def lease_ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl_s * 1000))

    @property
    def tombstone_ttl_ms(self) -> int:
        return max(1, round(self.tombstone_ttl_s * 1000))

    @property
    def reader_ttl_ms(self) -> int:
        return max(1, round(self.reader_ttl_s * 1000))

    def demand_bucket(self, t_s: float) -> int:
        return int(t_s // self.demand_bucket_s)

    def demand_buckets(self, since_s: float, until_s: float) -> range:
        """Buckets overlapping ``[since_s, until_s)``, at most the retained number (newest)."""
        lo = self.demand_bucket(since_s)
        hi = self.demand_bucket(until_s)
        if hi * self.demand_bucket_s >= until_s:
            hi -= 1
        lo = max(lo, hi - self.demand_retention_buckets + 1)
        return range(lo, hi + 1)

    @property
    def demand_retention_buckets(self) -> int:
        return max(1, int(self.demand_retention_s // self.demand_bucket_s))


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySpace:
    """Key names under one prefix (tests use a unique prefix per test)."""

    prefix: str = "loragate:"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def version(self) -> str:
        return f"{self.prefix}version"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas"

    @property
    def adapters(self) -> str:
        return f"{self.prefix}adapters"

    @property
    def replica_base(self) -> str:
        """Prefix of the per-replica keys (the Lua scripts append ``R`` and a suffix)."""
        return f"{self.prefix}rep:"

    def replica(self, replica_id: ReplicaId) -> str:
        return f"{self.replica_base}{replica_id}"

    def registered(self, replica_id: ReplicaId) -> str:
        return f"{self.replica_base}{replica_id}:reg"

    def gpu(self, replica_id: ReplicaId) -> str:
        return f"{self.replica_base}{replica_id}:gpu"

    def cpu(self, replica_id: ReplicaId) -> str:
        return f"{self.replica_base}{replica_id}:cpu"

    def stamps(self, replica_id: ReplicaId) -> str:
        return f"{self.replica_base}{replica_id}:stamps"

    def in_flight(self, replica_id: ReplicaId) -> str:
        return f"{self.replica_base}{replica_id}:inflight"

    def demand(self, bucket: int) -> str:
        return f"{self.prefix}demand:{bucket}"

    def leader(self, name: str) -> str:
        return f"{self.prefix}leader:{name}"

    @property
    def refusals(self) -> str:
        return f"{self.prefix}refusals"

    @property
    def tombstones(self) -> str:
        return f"{self.prefix}tombstones"

    @property
    def restored(self) -> str:
        return f"{self.prefix}restored"

    def replacing(self, name: str) -> str:
        return f"{self.prefix}replacing:{name}"

    @property
    def definitions(self) -> str:
        return f"{self.prefix}definitions"

    @property
    def definition_lease_base(self) -> str:
        """Prefix of ``P deflease:I|G`` (the Lua scripts append ``I|G``)."""
        return f"{self.prefix}deflease:"

    def definition_lease(self, instance_id: str, generation: int) -> str:
        return f"{self.definition_lease_base}{instance_id}{LEASE_SEPARATOR}{generation}"

    @property
    def drains(self) -> str:
        return f"{self.prefix}drains"

    @property
    def stopping(self) -> str:
        return f"{self.prefix}stopping"

    @property
    def readers(self) -> str:
        return f"{self.prefix}readers"

    def residency_keys(self, replica_id: ReplicaId) -> list[str]:
        """Keys of one replica's shadow residency, in the order the Lua scripts expect."""
        return [
            self.registered(replica_id),
            self.gpu(replica_id),
            self.cpu(replica_id),
            self.replica(replica_id),
            self.stamps(replica_id),
        ]


def lease_member(instance_id: str, request_id: str) -> str:
    return f"{instance_id}{LEASE_SEPARATOR}{request_id}"


def refusal_field(replica_id: ReplicaId, adapter: str) -> str:
    """The ``refusals`` hash field of one (replica, adapter): a JSON array, so any characters
    in either name keep fields distinct, and the Lua scripts can decode the adapter."""
    return json.dumps([replica_id, adapter], separators=(",", ":"))
