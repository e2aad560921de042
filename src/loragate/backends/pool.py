"""The replica pool: one :class:`VllmClient` per replica, a poller that keeps a
:class:`ReplicaSnapshot` of each from ``/health``, ``/metrics`` and ``/v1/models``, passive
health (a failed proxy connection takes a replica out at once), and single-flight adapter loads.

Health: a replica is taken out of rotation after ``failures_to_unhealthy`` failed polls in a
row, or at once when the gateway reports a failed connection, or while its ``/v1/models`` does
not list the base model (``base_model``: a replica started without the right
``--served-model-name`` would answer every base-model request with a 404); one successful poll
brings it back. Registered adapters: the set from ``/v1/models`` (entries with a ``parent``),
plus the adapters this gateway loaded since that poll began (a poll that started before a load
finished cannot see it, so it must not erase it).

Refused loads: a replica that refuses to load an adapter (no ``--enable-lora``, a rank above
its ``--max-lora-rank``, a folder it cannot read) stays in rotation, and the refusal is
remembered for ``poller.adapter_refusal_ttl_s`` (``backends.refusals``): the proxy asks
:meth:`ReplicaPool.refusing` and leaves those replicas out of that adapter's candidates.

A :class:`PoolListener` (the gateway's shared state) hears about every poll, every adapter
load and unload, so the shadow residency shared by all gateway instances follows the pool; it
is also the refusals' sink, so every instance knows the refusals any of them met.
Replicas can be added and removed while running (config reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import aiohttp

from loragate.backends.client import VllmClient
from loragate.backends.metrics import VllmMetrics
from loragate.backends.refusals import Refusals, RefusalSink
from loragate.core.clock import Clock, WallClock
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.errors import (
    AdapterLoadError,
    LoragateError,
    NoReplicaAvailableError,
    UpstreamConnectError,
)
from loragate.core.types import AdapterSpec, ReplicaId, ReplicaSettings, ReplicaSnapshot, Residency

log = logging.getLogger(__name__)


class PoolListener(RefusalSink, Protocol):
    """Told about what the pool learns (the gateway keeps the shared state with it), and
    where the pool's adapter-load refusals are shared."""

    async def replica_polled(
        self,
        snapshot: ReplicaSnapshot,
        *,
        models_seen: bool,
        loading: frozenset[str] = frozenset(),
    ) -> None:
        """A poll finished. ``models_seen``: ``/v1/models`` answered, and
        ``snapshot.residency.registered`` is the registered set it gave (plus adapters this
        gateway loaded while the poll ran). ``loading``: adapters this gateway's admin loads
        are still registering on the replica (a poll cannot list them yet)."""
        ...

    async def adapter_loaded(self, replica_id: ReplicaId, adapter: str) -> None:
        """An on-demand load (``ensure_adapter``, for a request routed there) succeeded."""
        ...

    async def adapter_unloaded(self, replica_id: ReplicaId, adapter: str) -> None: ...


@dataclasses.dataclass(slots=True)
class _Replica:
    config: ReplicaConfig
    client: VllmClient | None = None
    snapshot: ReplicaSnapshot | None = None
    registered: set[str] = dataclasses.field(default_factory=set)
    loaded_at_s: dict[str, float] = dataclasses.field(default_factory=dict)
    failures: int = 0
    last_error: str | None = None
    adapter_loads: int = 0
    answered: bool = False  # a poll has succeeded at least once


class ReplicaPool:
    """Owns the replicas' clients and their latest snapshots. Start it with :meth:`start`."""

    def __init__(
        self,
        replicas: Sequence[ReplicaConfig],
        *,
        poller: PollerConfig | None = None,
        admin_timeout_s: float = 60.0,
        connect_timeout_s: float = 3.0,
        max_idle_connections: int = 256,
        clock: Clock | None = None,
        listener: PoolListener | None = None,
        base_model: str | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a pool needs at least one replica")
        self._poller = poller or PollerConfig()
        self._admin_timeout_s = admin_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_idle_connections = max_idle_connections
        self._clock: Clock = clock or WallClock()
        self._replicas: dict[ReplicaId, _Replica] = {}
        for cfg in replicas:
            self._replicas[cfg.replica_id] = self._new_replica(cfg)
        self._healthy: tuple[ReplicaSnapshot, ...] = ()
        self._loads: dict[tuple[str, ReplicaId], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.refusals = Refusals(self._poller.adapter_refusal_ttl_s, self._clock)
        self._listener: PoolListener | None = None
        self.listener = listener
        # The model every replica must serve (None: not checked). A reload may change it.
        self.base_model = base_model

    @staticmethod
    def _new_replica(cfg: ReplicaConfig) -> _Replica:
        rep = _Replica(config=cfg)
        rep.snapshot = ReplicaSnapshot(
            replica_id=cfg.replica_id,
            url=cfg.url,
            healthy=False,
            settings=cfg.settings or ReplicaSettings(),
        )
        return rep

    @property
    def listener(self) -> PoolListener | None:
        return self._listener

    @listener.setter
    def listener(self, listener: PoolListener | None) -> None:
        """Set before :meth:`start`: it hears of every poll, load and refusal from then on."""
        self._listener = listener
        self.refusals.sink = listener
        if listener is not None:
            listener.attach_refusals(self.refusals)

    def _bind(self, rep: _Replica, session: aiohttp.ClientSession) -> None:
        rep.client = VllmClient(
            session,
            rep.config.url,
            api_key=rep.config.api_key,
            poll_timeout_s=self._poller.timeout_s,
            admin_timeout_s=self._admin_timeout_s,
            connect_timeout_s=self._connect_timeout_s,
            max_idle_connections=self._max_idle_connections,
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession, *, first_poll: bool = True) -> None:
        """Bind clients to ``session``, poll once (so routing starts with real health), then
        keep polling in a background task until :meth:`stop`."""
        self._session = session
        for rep in self._replicas.values():
            self._bind(rep, session)
        if first_poll:
            await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="loragate-replica-poller")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for load in list(self._loads.values()):
            load.cancel()
        for rep in self._replicas.values():
            if rep.client is not None:
                rep.client.upstream.close()

    # -- membership (config reload) ------------------------------------------------------------

    async def add_replica(self, cfg: ReplicaConfig) -> None:
        """Add (or replace, if its URL, key or settings changed) a replica and poll it once."""
        old = self._replicas.get(cfg.replica_id)
        if old is not None and old.config == cfg:
            return
        if old is not None:
            self.remove_replica(cfg.replica_id)
        rep = self._new_replica(cfg)
        if self._session is not None:
            self._bind(rep, self._session)
        self._replicas[cfg.replica_id] = rep
        if self._session is not None:
            await self._poll(rep)
        self._rebuild_healthy()

    def remove_replica(self, replica_id: ReplicaId) -> None:
        """Stop routing to a replica. Requests already on it finish; its idle connections
        close."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        if not self._replicas:
            self._replicas[replica_id] = rep
            raise ValueError("a pool needs at least one replica")
        for key in [k for k in self._loads if k[1] == replica_id]:
            self._loads[key].cancel()
        self.refusals.forget_replica(replica_id)
        if rep.client is not None:
            rep.client.upstream.close()
        self._rebuild_healthy()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poller.interval_s)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die
                log.exception("replica poll failed unexpectedly")

    # -- polling ----------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Poll every replica concurrently and update snapshots and health."""
        await asyncio.gather(*(self._poll(rep) for rep in self._replicas.values()))
        self._rebuild_healthy()

    async def _poll(self, rep: _Replica) -> None:
        client = self._client(rep)
        started = self._clock.now()
        try:
            _, metrics, models = await asyncio.gather(
                client.check_health(), client.metrics(), client.list_models()
            )
        except (LoragateError, ValueError) as exc:
            self._record_failure(rep, str(exc), immediate=False)
            await self._tell_polled(rep, models_seen=False)
            return
        base = self.base_model
        if base is not None and base not in models.base_models:
            self._refuse(rep, _wrong_model(base, models.base_models))
            await self._tell_polled(rep, models_seen=False)
            return
        if rep.failures or rep.snapshot is None or not rep.snapshot.healthy:
            log.info("replica %s is healthy", rep.config.replica_id)
        rep.failures = 0
        rep.last_error = None
        rep.answered = True
        recent = {a for a, t in rep.loaded_at_s.items() if t >= started}
        rep.registered = set(models.adapters) | recent
        self.refusals.listed(rep.config.replica_id, models.adapters)
        rep.loaded_at_s = {a: t for a, t in rep.loaded_at_s.items() if a in recent}
        rep.snapshot = self._snapshot_from(rep, metrics, healthy=True)
        await self._tell_polled(rep, models_seen=True)

    async def _tell_polled(self, rep: _Replica, *, models_seen: bool) -> None:
        listener, snap = self.listener, rep.snapshot
        if listener is None or snap is None:
            return
        try:
            rid = rep.config.replica_id
            loading = frozenset(name for name, r in self._loads if r == rid)
            await listener.replica_polled(snap, models_seen=models_seen, loading=loading)
        except Exception:
            log.exception("pool listener failed on a poll of %s", rep.config.replica_id)

    def _snapshot_from(self, rep: _Replica, m: VllmMetrics, *, healthy: bool) -> ReplicaSnapshot:
        settings = rep.config.settings
        if settings is None:
            settings = ReplicaSettings()
            if m.max_loras is not None:  # discovered from lora_requests_info's label
                settings = dataclasses.replace(settings, max_loras=m.max_loras)
        old = rep.snapshot
        return ReplicaSnapshot(
            replica_id=rep.config.replica_id,
            url=rep.config.url,
            healthy=healthy,
            settings=settings,
            num_running=m.num_running,
            num_waiting=m.num_waiting,
            num_deferred=m.num_deferred,
            kv_usage=m.kv_usage,
            active_adapters=frozenset(m.running_adapters),
            waiting_adapters=frozenset(m.waiting_adapters),
            in_flight=old.in_flight if old is not None else 0,
            residency=Residency(registered=frozenset(rep.registered)),
            scraped_at_s=self._clock.now(),
        )

    def _record_failure(self, rep: _Replica, error: str, *, immediate: bool) -> None:
        rep.failures += 1
        rep.last_error = error
        snap = rep.snapshot
        if not rep.answered:  # never answered yet (down at start-up): say so once
            if rep.failures == 1:
                log.warning(
                    "replica %s (%s) gets no traffic until a poll succeeds: %s",
                    rep.config.replica_id,
                    rep.config.url,
                    error,
                )
            return
        if snap is None or not snap.healthy:
            return
        if immediate or rep.failures >= self._poller.failures_to_unhealthy:
            log.warning("replica %s is unhealthy: %s", rep.config.replica_id, error)
            rep.snapshot = dataclasses.replace(snap, healthy=False)
            self._rebuild_healthy()

    def _refuse(self, rep: _Replica, error: str) -> None:
        """The replica answers but must get no traffic (it serves another model): out at once,
        said once (until its error changes)."""
        if rep.last_error != error:
            rid, url = rep.config.replica_id, rep.config.url
            log.warning("replica %s (%s) gets no traffic: it %s", rid, url, error)
        rep.last_error = error
        snap = rep.snapshot
        if snap is not None and snap.healthy:
            rep.snapshot = dataclasses.replace(snap, healthy=False)
            self._rebuild_healthy()

    def _rebuild_healthy(self) -> None:
        self._healthy = tuple(
            r.snapshot
            for r in self._replicas.values()
            if r.snapshot is not None and r.snapshot.healthy
        )

    def report_failure(self, replica_id: ReplicaId, error: str) -> None:
        """Passive health: the gateway could not talk to this replica. It gets no traffic until
        a poll succeeds again."""
        rep = self._replicas.get(replica_id)
        if rep is not None:
            self._record_failure(rep, error, immediate=True)

    # -- queries ----------------------------------------------------------------------------

    @property
    def replica_ids(self) -> tuple[ReplicaId, ...]:
        return tuple(self._replicas)

    def client(self, replica_id: ReplicaId) -> VllmClient:
        return self._client(self._replicas[replica_id])

    @staticmethod
    def _client(rep: _Replica) -> VllmClient:
        if rep.client is None:
            raise RuntimeError("ReplicaPool.start() has not been called")
        return rep.client

    def healthy_snapshots(self) -> tuple[ReplicaSnapshot, ...]:
        """Snapshots of the replicas that may get traffic (same tuple until something changes)."""
        return self._healthy

    def snapshots(self) -> tuple[ReplicaSnapshot, ...]:
        return tuple(r.snapshot for r in self._replicas.values() if r.snapshot is not None)

    def snapshot(self, replica_id: ReplicaId) -> ReplicaSnapshot:
        snap = self._replicas[replica_id].snapshot
        assert snap is not None
        return snap

    def is_healthy(self, replica_id: ReplicaId) -> bool:
        snap = self._replicas[replica_id].snapshot
        return snap is not None and snap.healthy

    def last_error(self, replica_id: ReplicaId) -> str | None:
        return self._replicas[replica_id].last_error

    def registered_adapters(self) -> Mapping[ReplicaId, frozenset[str]]:
        return {rid: frozenset(r.registered) for rid, r in self._replicas.items()}

    def is_registered(self, replica_id: ReplicaId, adapter: str) -> bool:
        rep = self._replicas.get(replica_id)
        return rep is not None and adapter in rep.registered

    def has_replica(self, replica_id: ReplicaId) -> bool:
        return replica_id in self._replicas

    def url(self, replica_id: ReplicaId) -> str | None:
        """The replica's URL (None once a reload removed it)."""
        rep = self._replicas.get(replica_id)
        return rep.config.url if rep is not None else None

    def adapter_loads(self) -> Mapping[ReplicaId, int]:
        """How many admin loads this gateway made on each replica."""
        return {rid: r.adapter_loads for rid, r in self._replicas.items()}

    def refusing(self, spec: AdapterSpec) -> Collection[ReplicaId]:
        """The replicas that refused to load ``spec`` within ``adapter_refusal_ttl_s`` (and
        did not list it since)."""
        return self.refusals.refusing(spec)

    def refused_adapters(self, replica_id: ReplicaId) -> Mapping[str, tuple[str, float]]:
        """The refusals of ``replica_id`` in force now: adapter -> (the replica's error,
        seconds until it is forgotten)."""
        return self.refusals.of_replica(replica_id)

    # -- adapters ---------------------------------------------------------------------------

    async def ensure_adapter(self, replica_id: ReplicaId, spec: AdapterSpec) -> bool:
        """Make sure ``spec`` is registered on the replica, loading it through the admin API if
        needed. One load per (adapter, replica) at a time however many requests wait; a waiter
        that is cancelled does not cancel the load for the others. Returns True if this call
        waited for a load, False if the adapter was already registered."""
        rep = self._replicas.get(replica_id)
        if rep is None:  # removed by a reload while the request was being routed
            raise UpstreamConnectError(f"replica {replica_id} was removed from the pool")
        if spec.name in rep.registered:
            return False
        key = (spec.name, replica_id)
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(self._load(rep, spec), name=f"load {key}")
            self._loads[key] = task
            task.add_done_callback(lambda t: self._load_done(key, t))
        await asyncio.shield(task)
        return True

    def _load_done(self, key: tuple[str, ReplicaId], task: asyncio.Task[None]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        if not task.cancelled():
            task.exception()  # retrieved: all waiters may have gone away

    async def _load(self, rep: _Replica, spec: AdapterSpec) -> None:
        # Errors are already loragate errors: AdapterLoadError (the replica refused the
        # adapter), UpstreamConnectError or UpstreamTimeoutError (the replica is unreachable).
        rid = rep.config.replica_id
        try:
            await self._client(rep).load_adapter(spec.name, spec.path)
        except AdapterLoadError as exc:  # the clients get a 502; the operator a log line
            refusals = self.refusals
            refusals.record(spec, rid, exc.message)
            log.warning(
                "adapter %s (%s) failed to load on replica %s (%s): %s%s",
                spec.name,
                spec.path,
                rid,
                rep.config.url,
                exc,
                f" (it gets no requests for {spec.name} for {refusals.ttl_s:g} s unless no "
                "other replica can take them)"
                if refusals.ttl_s > 0
                else "",
            )
            raise
        self.refusals.forget(spec.name, rid)
        rep.adapter_loads += 1
        rep.registered.add(spec.name)
        rep.loaded_at_s[spec.name] = self._clock.now()
        self._refresh_residency(rep)
        if self.listener is not None:
            try:
                await self.listener.adapter_loaded(rep.config.replica_id, spec.name)
            except Exception:
                log.exception("pool listener failed on a load of %s", spec.name)

    async def unload_adapter(self, replica_id: ReplicaId, adapter: str) -> bool:
        """Unregister ``adapter`` on the replica through the admin API. Returns False if the
        replica did not know it. Errors (unreachable replica, refusal) propagate."""
        rep = self._replicas[replica_id]
        known = await self._client(rep).unload_adapter(adapter)
        rep.registered.discard(adapter)
        rep.loaded_at_s.pop(adapter, None)
        self._refresh_residency(rep)
        if self.listener is not None:
            await self.listener.adapter_unloaded(replica_id, adapter)
        return known

    def forget_adapter(self, replica_id: ReplicaId, adapter: str) -> None:
        """The replica said it does not know ``adapter`` (e.g. it restarted): drop it so the
        next request loads it again."""
        rep = self._replicas.get(replica_id)
        if rep is not None and adapter in rep.registered:
            rep.registered.discard(adapter)
            rep.loaded_at_s.pop(adapter, None)
            self._refresh_residency(rep)

    def _refresh_residency(self, rep: _Replica) -> None:
        snap = rep.snapshot
        if snap is None:
            return
        rep.snapshot = dataclasses.replace(
            snap,
            residency=dataclasses.replace(snap.residency, registered=frozenset(rep.registered)),
        )
        if snap.healthy:
            self._rebuild_healthy()

    def require_healthy(self) -> tuple[ReplicaSnapshot, ...]:
        healthy = self._healthy
        if not healthy:
            raise NoReplicaAvailableError("no healthy replica is available")
        return healthy


def _wrong_model(base_model: str, served: Sequence[str]) -> str:
    listed = ", ".join(repr(m) for m in served) if served else "no base model"
    return (
        f"serves {listed}, not the gateway's base_model {base_model!r} (start it with "
        f"--served-model-name {base_model}, or set base_model to the name it serves)"
    )
