"""Adapter loads a replica refused, remembered for a while so that routing stops choosing it.

A replica refuses to load an adapter (vLLM's 400/404/500 on ``POST /v1/load_lora_adapter``)
when the adapter's rank is above its ``--max-lora-rank``, or when it cannot read the adapter's
folder (one that refuses every adapter, without ``--enable-lora`` or runtime loading, is marked
as a whole instead: ``backends.lora_off``). None of these pass by
themselves, so the request is retried on another replica and the refusal is remembered per
(adapter, replica) for ``ttl_s``: the proxy leaves such replicas out of that adapter's candidates
(while every candidate refused it, its requests are answered from the refusals, with no
load, until one lapses). A refusal is forgotten when it expires, when the replica's
``/v1/models`` lists the adapter (someone loaded it there), when a load there succeeds, when the
adapter's path changes (a config reload, or another gateway's admin API) and when the admin API
registers or deletes the adapter.

Shared by every gateway instance through a :class:`RefusalSink` (the gateway's state store,
see ``gateway.shared``): each refusal recorded and each one forgotten here is told to the sink
(recorded at once here, written to the store in the background), and the sink hands the
store's refusals back with :meth:`Refusals.adopt` as its view of the shared state refreshes,
so a refusal seen by one instance keeps every instance off that replica for that adapter. The
expiry of a shared refusal is the store's. ``counts`` (the metric) stays per instance: the
refused loads this instance made.

The same channel carries findings about a replica as a whole (``backends.lora_off``: it
serves no adapters): a refusal of the pseudo-adapter :attr:`Refusals.findings_name` (the LoRA
check load's name). :meth:`Refusals.share_finding` and :meth:`Refusals.clear_finding` tell
the sink; :meth:`Refusals.adopt` hands the shared findings to :attr:`Refusals.on_findings`
(the pool) and keeps them out of ``by_adapter``: no request names that adapter, and the admin
API and ``/metrics`` show them as the replica's ``lora_off``, not as refusals.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from loragate.core.clock import Clock
from loragate.core.types import AdapterSpec, ReplicaId


@dataclass(frozen=True, slots=True)
class Refusal:
    """One replica's refusal to load one adapter from ``path``, in force until ``until_s``."""

    path: str
    until_s: float
    error: str


class RefusalSink(Protocol):
    """Where refusals are shared with the other gateway instances. Told synchronously (it
    queues the writes); it may call :meth:`Refusals.adopt` with the shared set later."""

    def attach_refusals(self, refusals: Refusals) -> None:
        """``refusals`` tells this sink its changes from now on and takes its shared set."""
        ...

    def refusal_recorded(
        self, replica_id: ReplicaId, spec: AdapterSpec, error: str, ttl_s: float
    ) -> None:
        """The replica refused to load ``spec`` (remembered for ``ttl_s``; 0: not at all)."""
        ...

    def refusals_forgotten(self, adapter: str, replica_id: ReplicaId | None) -> None:
        """``adapter``'s refusal by ``replica_id`` (None: by every replica) is forgotten."""
        ...


# Adapter -> replica -> (path, the replica's error, seconds left): a sink's shared set.
SharedRefusals = Mapping[str, Mapping[ReplicaId, tuple[str, str, float]]]
# Replica -> (path, the replica's answer, seconds left): the shared findings about replicas.
SharedFindings = Mapping[ReplicaId, tuple[str, str, float]]


class Refusals:
    """Refused adapter loads per adapter and replica (``ttl_s`` 0: none are remembered, only
    counted)."""

    __slots__ = (
        "_findings_held",
        "_now",
        "by_adapter",
        "counts",
        "findings_name",
        "on_findings",
        "sink",
        "ttl_s",
    )

    def __init__(self, ttl_s: float, clock: Clock, *, findings_name: str | None = None) -> None:
        self.ttl_s = ttl_s
        self._now = clock.now
        self.sink: RefusalSink | None = None
        # The pseudo-adapter whose refusals are findings about replicas (see the module), and
        # who is handed the shared ones (``adopt``); whether it was last handed any.
        self.findings_name = findings_name
        self.on_findings: Callable[[SharedFindings], None] | None = None
        self._findings_held = False
        # Adapter -> replica -> refusal; read-only outside this class (the proxy checks
        # ``name in by_adapter`` before calling :meth:`refusing`: no call while none refused).
        self.by_adapter: dict[str, dict[ReplicaId, Refusal]] = {}
        # Every refused load since start, by (adapter, replica): what /metrics counts.
        self.counts: dict[tuple[str, ReplicaId], int] = {}

    def record(self, spec: AdapterSpec, replica_id: ReplicaId, error: str) -> bool:
        """Count and remember the replica's refusal of ``spec``. Returns whether it is news:
        False if a refusal of the same path was already in force there (the pool logs a
        refusal once per (adapter, replica) while it is remembered)."""
        key = (spec.name, replica_id)
        self.counts[key] = self.counts.get(key, 0) + 1
        now = self._now()
        news = True
        if self.ttl_s > 0:
            by_replica = self.by_adapter.setdefault(spec.name, {})
            known = by_replica.get(replica_id)
            news = known is None or known.until_s <= now or known.path != spec.path
            by_replica[replica_id] = Refusal(spec.path, now + self.ttl_s, error)
        if self.sink is not None:
            self.sink.refusal_recorded(replica_id, spec, error, self.ttl_s)
        return news

    def in_force(self, spec: AdapterSpec) -> Mapping[ReplicaId, Refusal]:
        """The refusals of ``spec`` in force now, by replica (empty while none is)."""
        if not self.refusing(spec):
            return {}
        return dict(self.by_adapter[spec.name])

    def refusing(self, spec: AdapterSpec) -> Collection[ReplicaId]:
        """The replicas whose refusal of ``spec`` is in force now (the hot path: one dict
        lookup while this adapter has none)."""
        by_replica = self.by_adapter.get(spec.name)
        if not by_replica:
            return ()
        now = self._now()
        stale = [rid for rid, r in by_replica.items() if r.until_s <= now or r.path != spec.path]
        for rid in stale:
            del by_replica[rid]
        if not by_replica:
            del self.by_adapter[spec.name]
            return ()
        return frozenset(by_replica)

    def forget(self, adapter: str, replica_id: ReplicaId | None = None) -> None:
        """Forget the refusals of ``adapter`` (by every replica, or by ``replica_id``), here
        and in the shared store (by every replica: always; by one: if it was known here)."""
        if replica_id is None:
            self.by_adapter.pop(adapter, None)
            if self.sink is not None:
                self.sink.refusals_forgotten(adapter, None)
            return
        by_replica = self.by_adapter.get(adapter)
        if by_replica is not None and replica_id in by_replica:
            del by_replica[replica_id]
            if not by_replica:
                del self.by_adapter[adapter]
            if self.sink is not None:
                self.sink.refusals_forgotten(adapter, replica_id)

    def listed(self, replica_id: ReplicaId, adapters: Iterable[str]) -> None:
        """A poll found ``adapters`` registered on the replica: it serves them now."""
        if self.by_adapter:
            for name in adapters:
                self.forget(name, replica_id)

    def forget_replica(self, replica_id: ReplicaId) -> None:
        """The replica left this instance's config: forget its refusals here only (other
        instances may still route to it)."""
        for name in [n for n, by in self.by_adapter.items() if replica_id in by]:
            by_replica = self.by_adapter[name]
            del by_replica[replica_id]
            if not by_replica:
                del self.by_adapter[name]

    @property
    def holds_findings(self) -> bool:
        """Whether :attr:`on_findings` was last handed some (``adopt`` must tell it their
        end even while no refusal is shared)."""
        return self._findings_held

    def share_finding(self, replica_id: ReplicaId, path: str, answer: str, ttl_s: float) -> None:
        """Tell the other instances a finding about the replica as a whole (the refusal of
        :attr:`findings_name` from ``path``, the replica's ``answer``), in force for
        ``ttl_s``. Nothing is shared while refusals are not remembered (``ttl_s`` 0)."""
        name = self.findings_name
        if self.sink is not None and name is not None and self.ttl_s > 0 and ttl_s > 0:
            spec = AdapterSpec(name=name, path=path)
            self.sink.refusal_recorded(replica_id, spec, answer, ttl_s)

    def clear_finding(self, replica_id: ReplicaId) -> None:
        """The finding about the replica no longer holds: it ends for every instance."""
        name = self.findings_name
        if self.sink is not None and name is not None and self.ttl_s > 0:
            self.sink.refusals_forgotten(name, replica_id)

    def adopt(self, shared: SharedRefusals) -> None:
        """Take the shared set as this instance's refusals (in place: ``by_adapter`` stays
        the same dict), and hand the shared findings to :attr:`on_findings` (none: an empty
        mapping, once, after some). With ``ttl_s`` 0 none are remembered, shared ones neither."""
        by_adapter = self.by_adapter
        if not shared and not by_adapter and not self._findings_held:
            return  # (nothing here, nothing shared)
        now = self._now()
        by_adapter.clear()
        if self.ttl_s <= 0:
            return
        findings: SharedFindings = {}
        for name, by_replica in shared.items():
            if name == self.findings_name:
                findings = {rid: f for rid, f in by_replica.items() if f[2] > 0}
                continue
            kept = {
                rid: Refusal(path, now + left_s, error)
                for rid, (path, error, left_s) in by_replica.items()
                if left_s > 0
            }
            if kept:
                by_adapter[name] = kept
        if self.on_findings is not None and (findings or self._findings_held):
            self.on_findings(findings)
        self._findings_held = bool(findings)

    def of_replica(self, replica_id: ReplicaId) -> Mapping[str, tuple[str, float]]:
        """The refusals of the replica in force now: adapter -> (the replica's error, seconds
        until it is forgotten). For the admin API."""
        now = self._now()
        out: dict[str, tuple[str, float]] = {}
        for name, by_replica in self.by_adapter.items():
            refusal = by_replica.get(replica_id)
            if refusal is not None and refusal.until_s > now:
                out[name] = (refusal.error, refusal.until_s - now)
        return out
