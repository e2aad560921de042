"""Adapters defined in config files, arbitrated between the gateway instances of one store.

Instances on one Redis each read their own config file. If two files define one adapter name
with different paths or ranks, each instance made the replicas load its own definition, and a
replica that holds another path is reloaded in place by the poller (``backends.pool_loads``): the
replicas flipped between the two definitions at every poll, for good, and a request met
either. The rule that ends it, kept in the shared store (``P definitions``, ``state.keys``):

* **The first claim wins.** Every instance claims the definitions (path and rank) of its
  config file's adapters. A name nobody has claimed takes the claimant's definition; it stays
  the definition in force for every instance while any instance whose file agrees renews it
  (``Ttls.lease_ttl_s`` long, renewed every ``Ttls.lease_renew_s``).
* **A reload that changes a definition replaces it**: the claim carries the definition this
  instance's file gave before the reload, and replaces the one in force if that is it (the
  operator edited the file and reloaded). Instances whose file still says the old one then
  serve the new one (and say so) until they are reloaded too.
* **A definition nobody's file agrees with any more lapses** ``lease_ttl_s`` after its last
  renewal (its instances were stopped, or restarted with another file); the next claim wins.
* An instance whose file disagrees with the definition in force serves the definition in force
  (routing is the same on every instance), logs an ERROR naming both, and shows the conflict in
  ``GET /admin/adapters``. Tenants stay per instance (they are not what replicas load).
* After Redis lost its data, a claim writes back the definition its instance last saw in force,
  for the time it had left, so the winner does not depend on which instance resyncs first.
* **A name registered through the admin API is the registration's** (``P adapters``): a claim
  of it takes nothing and gets the registration (path and rank) as the definition in force,
  ``instance`` :data:`REGISTERED`, so that the instance whose file defines it serves it as every
  other instance does, and reports the conflict as above. The reverse of the admin API's 409
  for a name a config file defines: whoever holds a name first keeps it. Once the registration
  is deleted (``DELETE /admin/adapters/N``, on any instance), the next claim wins.

``decide`` is the rule; ``MemoryStore`` applies it in process and the Lua script
``CLAIM_DEFINITIONS`` (``state.lua``) on Redis, and ``tests/state`` runs both alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from loragate.core.types import AdapterId, AdapterSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterDefinition:
    """What every instance must agree on about an adapter: where replicas load it from and its
    rank. ``instance``: the instance whose claim put it in force (empty in a claim)."""

    path: str
    rank: int
    instance: str = ""

    @classmethod
    def of(cls, spec: AdapterSpec, instance: str = "") -> AdapterDefinition:
        return cls(path=spec.path, rank=spec.rank, instance=instance)

    def agrees(self, other: AdapterDefinition) -> bool:
        """Same path and rank (whoever claimed it)."""
        return self.path == other.path and self.rank == other.rank

    def describe(self) -> str:
        return f"path {self.path!r}, rank {self.rank}"


@dataclass(frozen=True, slots=True)
class InForce:
    """The definition in force for a name, with the seconds its claim has left."""

    definition: AdapterDefinition
    left_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DefinitionClaim:
    """One instance's claim of ``name``: its file's definition (``ours``), the one its file gave
    before a reload changed it (``previous``, None: unchanged), and the definition it last saw
    in force (``known``: written back if the store lost it)."""

    name: AdapterId
    ours: AdapterDefinition
    previous: AdapterDefinition | None = None
    known: InForce | None = None


DefinitionMap = Mapping[AdapterId, InForce]

# The ``instance`` of a definition in force that is an admin-API registration, not a config
# file's claim (instances are named host:pid:rand, with colons: none is named this).
REGISTERED = "admin API"


def decide(
    current: InForce | None,
    claim: DefinitionClaim,
    *,
    instance: str,
    ttl_s: float,
    registered: AdapterSpec | None = None,
) -> tuple[InForce, bool]:
    """The definition in force after ``claim`` (by ``instance``) met ``current`` (None: none,
    or expired) and the admin registration of the name (``registered``), and whether the
    definition changed (every instance must hear of it). A registration is in force as long as
    it stands; it is not kept as a claim (the caller stores nothing then)."""
    if registered is not None:
        return InForce(AdapterDefinition.of(registered, REGISTERED), ttl_s), False
    ours = AdapterDefinition(path=claim.ours.path, rank=claim.ours.rank, instance=instance)
    if current is None:
        known = claim.known
        if known is not None and known.left_s > 0 and not known.definition.agrees(ours):
            return known, True  # the store lost it: put back the one in force, not ours
        if known is not None and known.definition.agrees(ours):
            return InForce(known.definition, ttl_s), True
        return InForce(ours, ttl_s), True
    if current.definition.agrees(ours):
        return InForce(current.definition, ttl_s), False  # renewed; its claimant stays
    previous = claim.previous
    if previous is not None and current.definition.agrees(previous):
        return InForce(ours, ttl_s), True  # a reload changed our own definition
    return current, False
