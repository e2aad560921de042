"""The replica pool: one :class:`VllmClient` per replica, a poller that keeps a
:class:`ReplicaSnapshot` of each from ``/health``, ``/metrics`` and ``/v1/models``, passive
health (a failed proxy connection takes a replica out at once), and single-flight adapter loads.

Health: a replica is taken out of rotation after ``failures_to_unhealthy`` failed polls in a
row (a poll that timed out counts only once ``timeouts_to_unhealthy`` polls in a row timed out:
on a busy host a healthy replica may miss the poll timeout now and then), or at once when the
gateway reports a failed connection, or while its ``/v1/models`` does not list the base model
(``base_model``: a replica started without the right ``--served-model-name`` would answer every
base-model request with a 404); one successful poll brings it back. Registered adapters: the set
from ``/v1/models`` (entries with a ``parent``), plus the adapters this gateway loaded since that
poll began (a poll that started before a load finished cannot see it, so it must not erase it).

Adapter paths: the gateway tells the pool the adapters it serves
(:meth:`ReplicaPool.expect_adapters`, at start and whenever the catalog changes). A replica
whose ``/v1/models`` card for an adapter has another ``root`` (the path it was loaded from)
than the configured path holds other weights under that name: the adapter does not count as
registered there (no request for it is sent there as is), a warning names the replica, the
adapter and both paths, and the pool reloads it with ``load_inplace: true`` (vLLM answers 200
and the card's ``root`` becomes the new path). If that reload fails, the failure is a refusal
like any other (below) and the adapter stays unregistered there; a request routed there anyway
tries the in-place load again first.

Refused loads: a replica that refuses to load an adapter (a rank above its
``--max-lora-rank``, a folder it cannot read) stays in rotation, and the refusal is
remembered for ``poller.adapter_refusal_ttl_s`` (``backends.refusals``): the proxy asks
:meth:`ReplicaPool.refusing` and leaves those replicas out of that adapter's candidates.

A replica that serves no adapters (``backends.lora_off``: vLLM's 500 "LoRA is not enabled" to
a load, without ``--enable-lora``; its 404 ``{"detail":"Not Found"}`` for the load route,
without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) is marked as such, not as refusing that one
adapter: :attr:`ReplicaPool.lora_off` (the proxy routes no adapter request there, base-model
requests still go; without runtime loading, only the adapters it lists go there), one WARNING
naming the cause, ``last_error`` saying it while nothing else is wrong. It is checked again
with a load that changes nothing (:data:`~loragate.backends.lora_off.CHECK_PATH` does not
exist) every ``poller.adapter_refusal_ttl_s`` and at its first answered poll after a failed one
(it may have restarted with other flags); a ``/metrics`` with ``vllm:lora_requests_info`` lets
a replica marked for no ``--enable-lora`` go at once. A replica whose ``/metrics`` shows
generated tokens without that gauge is checked so before any request finds out.

Settings: a replica's ``settings:`` in the config are what it is modelled with, except
``max_loras`` while vLLM reports its ``max_lora`` (``vllm:lora_requests_info``, from the
server's first engine step on): the running server's is the truth (:func:`effective_settings`),
and a difference from the config is said once (a WARNING naming both) per change.

A :class:`PoolListener` (the gateway's shared state) hears about every poll, every adapter
load and unload, so the shadow residency shared by all gateway instances follows the pool; it
is also the refusals' sink, so every instance knows the refusals any of them met.

Deleted adapters: ``DELETE /admin/adapters/N`` unloads the adapter from the replicas that
hold it, but another gateway instance that has not refreshed its view yet may still route a
request for it and load it back on demand. So every poll also unloads, in the background, the
adapters a replica lists that the listener says were deleted lately (tombstones in the shared
state) and the catalog does not serve, once the listener confirms from the shared registry
itself that the name is still deleted (:meth:`PoolListener.still_retired`: this instance's
view lags by up to a refresh, and another instance may have registered the name again and
loaded it there meanwhile; unloading that would cost its next request vLLM's 404).
Adapters are never unloaded for being merely unknown to the catalog: a replica may hold
adapters an operator loaded outside loragate (``--lora-modules``), and those stay.
:meth:`ReplicaPool.unknown_adapters` lists them (and those an embedded store forgot at a
gateway restart): the gateway warns about them (``gateway.unknown_adapters``) and does not
serve them.
Replicas can be added and removed while running (config reload).

A replica that stopped listening: a poll refused at connect (vLLM closes its listener at once on
SIGTERM; a connect that timed out does not count: the replica may only be slow) wakes the
requests in progress there (``UpstreamPool.replica_stopped``): each fails with
``ReplicaStoppedError`` once it has received nothing for ``stopped_replica_grace_s``
(``limits.stopped_replica_grace_s``), and its connection is closed, so that a vLLM waiting for
its connections to close can exit; the proxy retries the request elsewhere or ends it. The
adapter loads under way there are abandoned at once (their connections closed too), and the
requests waiting for them fail with ``ReplicaStoppedError`` at once (nothing was generated, and
the replica takes no request any more): the proxy retries them elsewhere or answers a 502.
A replica the gateway's own request found refused at connect counts the same
(:meth:`ReplicaPool.report_failure` with ``refused``).

A replica that stopped answering: once its polls timed out ``timeouts_to_unhealthy`` times in
a row (it is out of rotation; a hung process, e.g. SIGSTOPped, or a wedged engine keeps its
sockets open and sends nothing), the requests in progress there are watched
(``UpstreamPool.replica_silent``): if none of them receives a byte for
``stopped_replica_grace_s``, each fails with ``ReplicaHungError`` (a ``ReplicaStoppedError``:
the proxy retries it elsewhere or ends it, as for a replica that stopped listening) and its
connection is closed. The whole replica's silence is the evidence, not one request's: a
replica only slow under load still sends on some connection (a stream producing, an answer
completing), and then none of its requests is failed (one waiting in its queue waits on). Each
later poll that times out watches again; a poll it answers ends a watch under way. A watch that
failed its requests also wakes the requests waiting for adapter loads there: each fails with
``ReplicaHungError`` (nothing was generated: the proxy retries it elsewhere or answers a 502);
the loads themselves run on to ``limits.admin_timeout_s`` (a replica that comes back may finish
them). Without requests in progress there is nothing to judge by: load waits end as before.

A replica that says it is shutting down while its ``/health`` still answers 200 (vLLM 0.32's
drain under ``--shutdown-timeout N``: its 500 "cannot schedule new futures after shutdown" to a
new request, "Server shutting down" to a load; ``backends.engine_failures``) is held out of
rotation (:meth:`ReplicaPool.report_stopping`): unhealthy, ``last_error`` saying so, while its
polls succeed, until a poll fails (it went away: the next poll that succeeds is the server back,
a new process at its URL) or ``stopping_hold_s`` (:data:`STOPPING_HOLD_S`) passes, whichever
comes first. The bound keeps a replica that answered so without going away (a URL in front of
several servers, one of them draining) from being lost for good: past it, a successful poll
brings it back, and a new request refused the same way holds it again (one retry elsewhere per
hold). The hold is shared by the gateway instances on one state store: the listener hears of
each (``replica_stopping``) and of each end by a failed poll (``replica_stopping_ended``), and
hands the shared holds back (:meth:`ReplicaPool.adopt_stopping`), so another instance holds the
replica from its next refresh on, without a retry of its own, and a failed poll of any
instance ends the hold for all. A load it answers so is not a refusal of the adapter (none is
recorded): the requests waiting for it fail with :class:`ReplicaStoppingError` (the proxy
retries them elsewhere as a load that failed).

Replicas a config reload removes or replaces: the requests waiting for an adapter load there
stop waiting (``ReplicaRetiredError``), and the proxy routes them again.

Request ids: each admin call carries the ``X-Request-Id`` its caller gives
(:meth:`ReplicaPool.ensure_adapter`'s ``load_id``, :meth:`ReplicaPool.unload_adapter`'s
``request_id``: the gateway's request's id with ``-load``/``-unload`` parts, see
``gateway.request_ids``); the pool's own calls (an in-place reload a poll found needed, a
deleted adapter's unload) get ``<generated>-reload`` / ``<generated>-unload`` from
:attr:`ReplicaPool.new_request_id`. A load ends with one log line (INFO; a refusal's is the
WARNING above) naming the adapter, the replica, the request it was for (the one that started
it: the others wait for the same load) and the load's id, its result and duration, so a load
in a replica's (or a proxy's) log can be matched to the request or admin call that caused it.

Draining (``POST /admin/replicas/{id}/drain``, shared by every gateway instance through the
listener's state): :meth:`ReplicaPool.set_draining` names the replicas that get no new
requests. They are polled as before (health, residency, in-place reloads, tombstone unloads)
and keep their requests and adapter loads under way, but :meth:`ReplicaPool.healthy_snapshots`
(the replicas that may get traffic) leaves them out, so the proxy neither routes nor retries
there, and the admin API loads no newly registered adapter there. A drain outlives the
replica's place in the pool: one a reload removes and adds back under its id is drained still
(until the drain is ended), as other instances sharing the drain may route there meanwhile.
A drained replica whose polls fail goes out of rotation as any other (the same health state
and metrics), but its line is INFO, ``drained replica r0 is down (expected during a restart):
...``, not the WARNING ``replica r0 is unhealthy: ...``: a drain ahead of a restart is how a
rolling restart is planned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import aiohttp

from loragate.backends.client import ModelCard, VllmClient
from loragate.backends.engine_failures import load_refused_stopping
from loragate.backends.lora_off import (
    CHECK_NAME,
    CHECK_PATH,
    LORA_DISABLED,
    LoraOff,
    cause_of,
    explain,
    looks_lora_off,
)
from loragate.backends.metrics import VllmMetrics
from loragate.backends.refusals import Refusals, RefusalSink
from loragate.backends.upstream import ReplicaHungError, ReplicaStoppedError
from loragate.core.clock import Clock, WallClock
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.errors import (
    AdapterLoadError,
    LoragateError,
    NoReplicaAvailableError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from loragate.core.log_fields import about_request
from loragate.core.tasks import cancel_and_wait
from loragate.core.types import AdapterSpec, ReplicaId, ReplicaSettings, ReplicaSnapshot, Residency

log = logging.getLogger(__name__)

# Why a poll failed (``ReplicaPool.on_poll_failed``; loragate_replica_poll_failures_total).
POLL_FAILURE_REASONS = ("connect", "timeout", "bad_response", "wrong_model")


class ReplicaRetiredError(UpstreamConnectError):
    """A config reload removed or replaced the replica's entry while a request waited for an
    adapter load there: the request is routed again (not a failure of the replica)."""


# How long at most a replica that said it is shutting down stays out of rotation while its polls
# succeed (see the module docstring; a failed poll ends the hold first). vLLM's drain lasts up to
# its --shutdown-timeout; past the hold a request refused again costs one retry and holds it again.
STOPPING_HOLD_S = 30.0


class ReplicaStoppingError(UpstreamConnectError):
    """The replica answered an adapter load that it is shutting down (vLLM's 500 "Server
    shutting down" while it drains, or its engine-dead 500): nothing was loaded, and it takes
    no new work; not a refusal of the adapter."""


class ReplicaServesNoAdaptersError(AdapterLoadError):
    """The replica refused an adapter load for a reason of its own, not the adapter's (no
    ``--enable-lora``; no ``/v1/load_lora_adapter`` route: ``backends.lora_off``): it is
    marked as serving no adapters, and no refusal of the adapter is recorded."""


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
        """A load (``ensure_adapter``: for a request routed there, an admin registration, an
        in-place reload) succeeded: the replica answered 200, so vLLM activated the adapter
        (a GPU slot). Not called when the replica answered that it had the adapter already:
        that load did nothing there (the adapter stays where it was)."""
        ...

    async def adapter_unloaded(self, replica_id: ReplicaId, adapter: str) -> None: ...

    def replica_stopping(self, replica_id: ReplicaId, error: str, hold_s: float) -> None:
        """The replica answered that it is shutting down (``error``; :meth:`ReplicaPool.
        report_stopping`): held out of rotation here for ``hold_s`` at most. Told
        synchronously (the listener queues what it shares)."""
        ...

    def replica_stopping_ended(self, replica_id: ReplicaId) -> None:
        """A poll found the held replica gone: its hold ended here."""
        ...

    def retired_adapters(self) -> Collection[str]:
        """Adapters deleted through the admin API lately (their tombstones): a replica that
        still lists one, and that the catalog does not serve (again), gets it unloaded."""
        ...

    async def still_retired(self, adapter: str) -> bool:
        """Asked just before such an unload: whether ``adapter`` is still deleted in the
        shared registry itself, not only in this instance's view of it (which lags by up to
        a refresh: another instance may have registered the name again since, and loaded it
        on the replica). False: registered again (the catalog takes it up): not unloaded."""
        ...


@dataclasses.dataclass(slots=True)
class _Replica:
    config: ReplicaConfig
    client: VllmClient | None = None
    snapshot: ReplicaSnapshot | None = None
    registered: set[str] = dataclasses.field(default_factory=set)
    loaded_at_s: dict[str, float] = dataclasses.field(default_factory=dict)
    failures: int = 0
    timeouts: int = 0  # polls in a row that timed out (poller.timeouts_to_unhealthy)
    last_error: str | None = None
    answered: bool = False  # a poll has succeeded at least once
    # Said it is shutting down (:meth:`ReplicaPool.report_stopping`): out of rotation until a
    # poll fails or this time (the pool's clock) passes; None: not held.
    stopping_until: float | None = None
    # Its polls time out (``_stopped_answering``): what was said of the watches of its requests
    # since its last answer (each said once a run: a slow replica is watched at every poll).
    watch_said: bool = False
    spared_said: bool = False
    # Adapter -> the path the replica registered it from (its /v1/models card's ``root``, or
    # the path of this gateway's load since the poll that listed it began).
    roots: dict[str, str] = dataclasses.field(default_factory=dict)
    # Adapter -> the other path the replica holds it from (not the configured one): these are
    # left out of ``registered`` until an in-place reload succeeds.
    stale: dict[str, str] = dataclasses.field(default_factory=dict)
    # Adapter -> the configured path whose in-place reload failed (polls do not retry it).
    inplace_failed: dict[str, str] = dataclasses.field(default_factory=dict)
    # The base model's card in the replica's last /v1/models that listed it (root, max_model_len).
    base_card: ModelCard | None = None
    # Found serving no adapters (``backends.lora_off``): why, and when it is checked again.
    lora_off: LoraOff | None = None
    # Its /metrics hinted at no --enable-lora and the check load said otherwise: not checked
    # again for the hint until a poll fails (it may restart with other flags).
    lora_hint_checked: bool = False
    # vLLM's max_lora (vllm:lora_requests_info) at its last successful poll (None: not
    # reported), and the one that differed from the config, as last said.
    reported_max_loras: int | None = None
    said_max_loras: int | None = None
    # The requests waiting for adapter loads here wait on this too (made by the first of them):
    # set, they stop waiting (:meth:`ReplicaPool._wake_load_waiters`: the replica stopped
    # listening, or a reload retired this entry), with the error class and the reason.
    wake: asyncio.Future[tuple[type[UpstreamConnectError], str]] | None = None


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
        stopped_replica_grace_s: float = 5.0,
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
        # Replicas that get no new requests (:meth:`set_draining`; ids not in the pool too).
        self._draining: frozenset[ReplicaId] = frozenset()
        self._loads: dict[tuple[str, ReplicaId], asyncio.Task[None]] = {}
        self._unloads: dict[tuple[str, ReplicaId], asyncio.Task[None]] = {}
        # Loads still running on replicas a reload replaced or removed (see _retire_replica).
        self._orphan_loads: set[asyncio.Task[None]] = set()
        # Adapters loaded, by replica id, for the pool's whole life: a replica that a reload
        # replaces or removes keeps its count (loragate_adapter_loads_total is a counter).
        self._load_counts: dict[ReplicaId, int] = {}
        # When :meth:`forget_unloaded` was last called (the pool's clock).
        self._unloads_seen_s = self._clock.now()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.refusals = Refusals(self._poller.adapter_refusal_ttl_s, self._clock)
        self._listener: PoolListener | None = None
        self.listener = listener
        # The model every replica must serve (None: not checked). A reload may change it.
        self.base_model = base_model
        # The adapters the gateway serves, by name (:meth:`expect_adapters`).
        self._specs: dict[str, AdapterSpec] = {}
        # How long a request in progress on a replica that stopped listening may go without
        # a byte before it is failed (``limits.stopped_replica_grace_s``; a reload may change it).
        self.stopped_replica_grace_s = stopped_replica_grace_s
        # The longest a replica that said it is shutting down is held out of rotation while
        # its polls succeed (STOPPING_HOLD_S; see report_stopping).
        self.stopping_hold_s = STOPPING_HOLD_S
        # Told of each adapter load's end: (replica, result, seconds it took); the result is
        # ok, already_loaded, refused, timeout, unreachable, stopping, abandoned or error
        # (_timed_load).
        self.on_load_done: Callable[[ReplicaId, str, float], None] | None = None
        # Told of each failed poll: (replica, one of POLL_FAILURE_REASONS).
        self.on_poll_failed: Callable[[ReplicaId, str], None] | None = None
        # Replicas found serving no adapters (``backends.lora_off``), by id: read by the proxy
        # for each adapter request (empty while every replica serves adapters).
        self.lora_off: dict[ReplicaId, LoraOff] = {}
        self._lora_checks: dict[ReplicaId, asyncio.Task[None]] = {}
        # Makes the request ids of the pool's own admin calls (an in-place reload a poll
        # found needed: ``<id>-reload``; a deleted adapter's unload: ``<id>-unload``); the
        # gateway's generator (``gateway.request_ids``). None: sent without X-Request-Id.
        self.new_request_id: Callable[[], str] | None = None

    @staticmethod
    def _new_replica(cfg: ReplicaConfig) -> _Replica:
        rep = _Replica(config=cfg)
        rep.snapshot = ReplicaSnapshot(
            replica_id=cfg.replica_id,
            url=cfg.url,
            healthy=False,
            settings=cfg.settings or assumed_settings(None),
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

    @property
    def clock(self) -> Clock:
        """The clock the pool stamps its snapshots (``scraped_at_s``) with."""
        return self._clock

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        for load in [
            *self._loads.values(),
            *self._unloads.values(),
            *self._orphan_loads,
            *self._lora_checks.values(),
        ]:
            load.cancel()
        for rep in self._replicas.values():
            if rep.client is not None:
                rep.client.upstream.close()

    # -- membership (config reload) ------------------------------------------------------------

    async def add_replica(self, cfg: ReplicaConfig) -> None:
        """Add (or replace) one replica and poll it once (:meth:`add_replicas`)."""
        await self.poll_replicas(self.add_replicas((cfg,)))

    def add_replicas(self, configs: Sequence[ReplicaConfig]) -> tuple[ReplicaId, ...]:
        """Add replicas, or replace those whose URL, key or settings changed; returns their
        ids, to poll with :meth:`poll_replicas` (an added one gets no traffic before).
        Every new entry is built first: if one cannot be (its client cannot be made), this
        raises with the pool as it was. A replaced replica keeps its place in the pool
        (config order) and its adapter-load count; requests already on it finish on it,
        those waiting for an adapter load there are routed again (:meth:`_retire_replica`).
        Replaced at the same URL (key or settings changed: the same vLLM server), the new
        entry starts from what the old one knew of the adapters registered there, and an
        adapter load under way there registers on the new entry when it ends."""
        fresh: list[_Replica] = []
        for cfg in configs:
            old = self._replicas.get(cfg.replica_id)
            if old is not None and old.config == cfg:
                continue
            rep = self._new_replica(cfg)
            if self._session is not None:
                self._bind(rep, self._session)
            fresh.append(rep)
        for rep in fresh:
            rid = rep.config.replica_id
            old = self._replicas.get(rid)
            if old is not None:
                self._retire_replica(old, successor=rep)
            elif rid in self._draining:
                log.warning(
                    "replica %s (%s) is added drained: a drain of that id is in force, so it "
                    "gets no requests until DELETE /admin/replicas/%s/drain",
                    rid, rep.config.url, rid,
                )  # fmt: skip
            self._replicas[rid] = rep
        return tuple(rep.config.replica_id for rep in fresh)

    async def poll_replicas(self, replica_ids: Collection[ReplicaId]) -> None:
        """Poll these replicas once (concurrently; none before :meth:`start`), then route
        by what they answered."""
        if self._session is not None:
            reps = [rep for rid in replica_ids if (rep := self._replicas.get(rid)) is not None]
            await asyncio.gather(*(self._poll(rep) for rep in reps))
        self._rebuild_healthy()

    def remove_replica(self, replica_id: ReplicaId) -> None:
        """Stop routing to a replica. Requests already on it finish; those waiting for an
        adapter load there are routed again (the load runs on); its idle connections close.
        Its adapter-load count stays."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        if len(self._replicas) == 1:
            raise ValueError("a pool needs at least one replica")
        del self._replicas[replica_id]
        self._retire_replica(rep)
        self._rebuild_healthy()
        if replica_id in self._draining:
            log.info(
                "replica %s left the config while drained: its drain stays in force (other "
                "gateway instances may still have it; DELETE /admin/replicas/%s/drain ends it)",
                replica_id, replica_id,
            )  # fmt: skip

    def _retire_replica(self, rep: _Replica, *, successor: _Replica | None = None) -> None:
        """``rep`` leaves the pool (removed, or replaced by ``successor``). The requests
        already running there finish there; those waiting for an adapter load there stop
        waiting (:class:`ReplicaRetiredError`: the proxy routes them again, to the
        successor or another replica). Its adapter loads run on to their end (the replica
        may still be serving). A successor at the same URL is the same vLLM
        server: it takes over what ``rep`` knew of its adapters, and ``rep``'s loads stay
        the single flight for that id (they register on the entry in the pool when they
        end; a request routed again to the successor waits for them). Otherwise the loads
        leave ``_loads`` and the next load for the id is the successor's own. Background
        unloads stop; its refusals are forgotten here; its idle connections close."""
        rid = rep.config.replica_id
        self._wake_load_waiters(
            rep,
            ReplicaRetiredError,
            "was removed from the pool by a config reload"
            if successor is None
            else "was replaced by a config reload (its URL, key or settings changed)",
        )
        if successor is not None and successor.config.url == rep.config.url:
            successor.registered = set(rep.registered)
            successor.roots = dict(rep.roots)
            successor.loaded_at_s = dict(rep.loaded_at_s)
            successor.stale = dict(rep.stale)
            successor.inplace_failed = dict(rep.inplace_failed)
            successor.base_card = rep.base_card
            successor.lora_off = rep.lora_off
            successor.said_max_loras = rep.said_max_loras
            self._refresh_residency(successor)
        else:
            for key in [k for k in self._loads if k[1] == rid]:
                self._orphan_loads.add(self._loads.pop(key))
        for key in [k for k in self._unloads if k[1] == rid]:
            self._unloads[key].cancel()
        check = self._lora_checks.pop(rid, None)
        if check is not None:
            check.cancel()
        if successor is not None and successor.lora_off is not None:
            self.lora_off[rid] = successor.lora_off
        else:
            self.lora_off.pop(rid, None)
        self.refusals.forget_replica(rid)
        if rep.client is not None:
            rep.client.upstream.close()

    def expect_adapters(self, adapters: Mapping[str, AdapterSpec]) -> None:
        """The adapters the gateway serves (its catalog), with the paths they must be
        registered from. An adapter a replica holds from another path stops counting as
        registered there at once, and (once started) is reloaded in place."""
        self._specs = dict(adapters)
        for rep in self._replicas.values():
            changed = False
            for name, held in list(rep.stale.items()):  # e.g. a path changed back
                spec = self._specs.get(name)
                if spec is None or same_path(held, spec.path):
                    del rep.stale[name]
                    rep.registered.add(name)
                    changed = True
            for name in list(rep.registered):
                spec = self._specs.get(name)
                root = rep.roots.get(name)
                if spec is not None and root is not None and not same_path(root, spec.path):
                    rep.registered.discard(name)
                    rep.loaded_at_s.pop(name, None)
                    changed = True
                    self._found_stale(rep, spec, root)
            for name, path in list(rep.inplace_failed.items()):
                if name not in self._specs or self._specs[name].path != path:
                    del rep.inplace_failed[name]
            if changed:
                self._refresh_residency(rep)

    def _found_stale(self, rep: _Replica, spec: AdapterSpec, root: str) -> None:
        """``rep`` holds ``spec.name`` from ``root``, not from ``spec.path``: say so (once per
        old path) and reload it in place in the background (unless that failed already)."""
        rid = rep.config.replica_id
        if rep.stale.get(spec.name) != root:
            rep.stale[spec.name] = root
            log.warning(
                "replica %s (%s) has adapter %s registered from %s, not from the configured %s: "
                "it gets no requests for %s until it is reloaded in place from %s",
                rid, rep.config.url, spec.name, root, spec.path, spec.name, spec.path,
            )  # fmt: skip
        if self._session is None or rep.inplace_failed.get(spec.name) == spec.path:
            return
        key = (spec.name, rid)
        if key not in self._loads:
            self._start_load(
                key, rep, spec, self._own_id("reload"), by="the poller (an in-place reload)"
            )

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
            reason = poll_failure_reason(exc)
            self._poll_failed(rep, reason)
            if rep.stopping_until is not None:  # it went away: the next poll that succeeds
                rep.stopping_until = None  # is it back (for every instance sharing the hold)
                if self.listener is not None:
                    self.listener.replica_stopping_ended(rep.config.replica_id)
            rep.timeouts = rep.timeouts + 1 if reason == "timeout" else 0
            # It may be restarting (with other flags): checked again at its next answer.
            rep.lora_hint_checked = False
            if rep.lora_off is not None:
                rep.lora_off.check_at_s = 0.0
            self._record_failure(rep, str(exc), immediate=False, timed_out=reason == "timeout")
            if connection_refused(exc):
                self._stopped_listening(rep, client, str(exc))
            elif reason == "timeout":
                if rep.timeouts >= self._poller.timeouts_to_unhealthy:
                    self._stopped_answering(rep, client, str(exc))
            elif reason == "bad_response":  # it answered (an error): alive
                self._answered(rep, client)
            await self._tell_polled(rep, models_seen=False)
            return
        rep.timeouts = 0
        self._answered(rep, client)
        base = self.base_model
        if base is not None and base not in models.base_models:
            self._poll_failed(rep, "wrong_model")
            self._refuse(rep, _wrong_model(base, models.base_models))
            await self._tell_polled(rep, models_seen=False)
            return
        stopping = self._still_stopping(rep)
        if stopping:
            pass  # (its failures and last_error stay: it said it is shutting down)
        else:
            if rep.failures or rep.snapshot is None or not rep.snapshot.healthy:
                log.info("replica %s is healthy", rep.config.replica_id)
            rep.failures = 0
            rep.last_error = None
        rep.answered = True
        rep.base_card = next((c for c in models.cards if c.id == base and c.parent is None), None)
        recent = {a for a, t in rep.loaded_at_s.items() if t >= started}
        roots = {c.id: c.root for c in models.cards if c.parent is not None and c.root}
        for name in recent:  # our load may be newer than the card this poll read
            if name in rep.roots:
                roots[name] = rep.roots[name]
        rep.roots = roots
        stale = {
            name: (spec, roots[name])
            for name in models.adapters - recent
            if (spec := self._specs.get(name)) is not None
            and name in roots
            and not same_path(roots[name], spec.path)
        }
        for name in [n for n in rep.stale if n not in stale]:
            del rep.stale[name]
        rep.registered = (set(models.adapters) - set(stale)) | recent
        self.refusals.listed(rep.config.replica_id, models.adapters - set(stale))
        rep.loaded_at_s = {a: t for a, t in rep.loaded_at_s.items() if a in recent}
        rep.snapshot = self._snapshot_from(rep, metrics, healthy=not stopping)
        for spec, root in stale.values():
            self._found_stale(rep, spec, root)
        self._check_lora(rep, metrics)
        self._retire(rep, models.adapters)
        await self._tell_polled(rep, models_seen=True)

    def _still_stopping(self, rep: _Replica) -> bool:
        """Whether ``rep``'s hold (:meth:`report_stopping`) is in force; a hold past its time
        ends here (logged)."""
        until = rep.stopping_until
        if until is None:
            return False
        if self._clock.now() < until:
            return True
        rep.stopping_until = None
        log.info(
            "replica %s (%s) still answers its polls %g s after it said it was shutting down: "
            "back in rotation (a request it refuses so again takes it out again)",
            rep.config.replica_id, rep.config.url, self.stopping_hold_s,
        )  # fmt: skip
        return False

    # -- replicas that serve no adapters (backends.lora_off) ----------------------------------

    def _check_lora(self, rep: _Replica, m: VllmMetrics) -> None:
        """After a successful poll: a replica marked as serving no adapters is checked again
        once its time comes (``poller.adapter_refusal_ttl_s`` after the last check, at once
        after a failed poll: it may have restarted), or let go when its ``/metrics`` shows the
        LoRA gauge (vLLM has it only with --enable-lora); one whose ``/metrics`` hints at no
        --enable-lora is checked before any request finds out."""
        off = rep.lora_off
        if off is not None:
            if off.cause == LORA_DISABLED and m.max_loras is not None:
                self._lora_back(rep, "its /metrics has vllm:lora_requests_info (--enable-lora)")
            elif self._clock.now() >= off.check_at_s:
                self._start_lora_check(rep)
        elif not rep.lora_hint_checked and looks_lora_off(m):
            rep.lora_hint_checked = True
            self._start_lora_check(rep)

    def _start_lora_check(self, rep: _Replica) -> None:
        rid = rep.config.replica_id
        if self._session is None or rid in self._lora_checks:
            return
        task = asyncio.create_task(self._lora_check(rep), name=f"lora check {rid}")
        self._lora_checks[rid] = task
        task.add_done_callback(functools.partial(self._lora_check_done, rid))

    def _lora_check_done(self, rid: ReplicaId, task: asyncio.Task[None]) -> None:
        if self._lora_checks.get(rid) is task:
            del self._lora_checks[rid]
        if not task.cancelled():
            task.exception()

    async def _lora_check(self, rep: _Replica) -> None:
        """Ask the replica to load an adapter from a path that does not exist: a replica that
        serves adapters answers 404 "No adapter found" (nothing registered), one that does
        not answers as it does every load (``backends.lora_off``)."""
        off = rep.lora_off
        if off is not None:  # (until this check's answer, or the next time)
            off.check_at_s = self._clock.now() + self._poller.adapter_refusal_ttl_s
        try:
            await self._client(rep).load_adapter(CHECK_NAME, CHECK_PATH)
        except AdapterLoadError as exc:
            cause = cause_of(exc.status, exc.message)
            if cause is not None:
                self._mark_lora_off(rep, cause, exc.message)
                return
        except LoragateError as exc:  # unreachable: the polls say so; checked again later
            log.debug("replica %s: LoRA check failed: %s", rep.config.replica_id, exc)
            return
        if off is not None:
            self._lora_back(rep, "a check load was answered as by a server that loads adapters")

    def _mark_lora_off(self, rep: _Replica, cause: str, answer: str) -> None:
        """``rep`` serves no adapters (``cause``, the replica's ``answer``): said once (until the
        cause changes), checked again in ``poller.adapter_refusal_ttl_s``."""
        rid = rep.config.replica_id
        check_at_s = self._clock.now() + self._poller.adapter_refusal_ttl_s
        old = rep.lora_off
        off = LoraOff(cause=cause, answer=answer, check_at_s=check_at_s)
        for entry in self._entries_of(rep):
            entry.lora_off = off
        current = self._replicas.get(rid)
        if current is not None and current.lora_off is off:  # (not a retired entry's)
            self.lora_off[rid] = off
        if old is None or old.cause != cause:
            log.warning(
                "replica %s (%s) serves no adapters: %s (it answered an adapter load: %s); "
                "checked again every %g s and when it restarts",
                rid, rep.config.url, explain(cause), answer,
                self._poller.adapter_refusal_ttl_s,
            )  # fmt: skip
        else:
            log.debug("replica %s still serves no adapters: %s", rid, answer)

    def _lora_back(self, rep: _Replica, why: str) -> None:
        rid = rep.config.replica_id
        for entry in self._entries_of(rep):
            entry.lora_off = None
        current = self._replicas.get(rid)
        if current is None or current.lora_off is None:
            self.lora_off.pop(rid, None)
        log.info("replica %s (%s) serves adapters again: %s", rid, rep.config.url, why)

    def takes_adapter(self, replica_id: ReplicaId, adapter: str) -> bool:
        """Whether a request for ``adapter`` may go to the replica: it serves adapters, or it
        only cannot load them (no runtime loading) and has ``adapter`` registered."""
        off = self.lora_off.get(replica_id)
        if off is None:
            return True
        rep = self._replicas.get(replica_id)
        return off.serves_listed and rep is not None and adapter in rep.registered

    def lora_checking(self, replica_id: ReplicaId) -> bool:
        """Whether a check of the replica's LoRA support (:meth:`_lora_check`) is under way."""
        return replica_id in self._lora_checks

    def lora_off_of(self, replica_id: ReplicaId) -> tuple[str, str, float] | None:
        """Why the replica serves no adapters: (cause, its answer, seconds until it is checked
        again), None if it does. For the admin API."""
        off = self.lora_off.get(replica_id)
        if off is None:
            return None
        return off.cause, off.answer, max(0.0, off.check_at_s - self._clock.now())

    def _poll_failed(self, rep: _Replica, reason: str) -> None:
        if self.on_poll_failed is not None:
            self.on_poll_failed(rep.config.replica_id, reason)

    def _stopped_listening(self, rep: _Replica, client: VllmClient, error: str) -> None:
        """A poll found ``rep``'s listener closed (vLLM closes it at once on SIGTERM): the
        requests in progress there fail once nothing arrives for the grace
        (``stopped_replica_grace_s``): the proxy retries them elsewhere or ends them. The
        adapter loads under way there are abandoned at once (their connections closed: vLLM
        may wait for them before it exits), and the requests waiting for them fail now with
        :class:`ReplicaStoppedError` (nothing was generated; the replica takes no request)."""
        rid = rep.config.replica_id
        grace_s = self.stopped_replica_grace_s
        waiting = client.upstream.replica_stopped(grace_s)
        if waiting:
            log.warning(
                "replica %s (%s) stopped listening (%s): %d request(s) in progress there end "
                "if nothing arrives for %g s",
                rid, rep.config.url, error, waiting, grace_s,
            )  # fmt: skip
        self._wake_load_waiters(rep, ReplicaStoppedError, _STOPPED_LOADING)
        abandoned = sorted(name for name, r in self._loads if r == rid)
        for name in abandoned:
            self._loads.pop((name, rid)).cancel()
        if abandoned:
            log.warning(
                "replica %s (%s) stopped listening (%s): adapter load(s) under way there "
                "abandoned (%s); the requests waiting for them are retried on another replica "
                "or answered with a 502",
                rid, rep.config.url, error, ", ".join(abandoned),
            )  # fmt: skip

    @staticmethod
    def _answered(rep: _Replica, client: VllmClient) -> None:
        """``rep`` answered a poll: alive; a watch of its silence ends (``_stopped_answering``)."""
        client.upstream.replica_answered()
        rep.watch_said = rep.spared_said = False

    def _stopped_answering(self, rep: _Replica, client: VllmClient, error: str) -> None:
        """``rep``'s polls timed out ``timeouts_to_unhealthy`` times in a row (it is out of
        rotation): a hung replica (its process stopped, its engine wedged) keeps its sockets
        open and sends nothing. Its requests in progress are watched for
        ``stopped_replica_grace_s``: if none of them receives a byte meanwhile, each fails
        (``ReplicaHungError``; the proxy retries it elsewhere or ends it) and its connection
        is closed; a byte on any of them (it is only slow) leaves them all alone. Called at
        each poll that times out from then on (a watch under way goes on; the next one starts
        when it ended with the replica alive); a poll it answers ends the watch. A watch that
        failed requests wakes the requests waiting for adapter loads there too
        (``ReplicaHungError``: the proxy retries them elsewhere or answers a 502; the loads run
        on). Until then
        the start of a watch is logged once, so is a watch that spared the requests (at
        DEBUG after that); every watch that failed requests is."""
        rid = rep.config.replica_id
        url = rep.config.url
        grace_s = self.stopped_replica_grace_s
        reason = f"its polls timed out {rep.timeouts} times in a row"

        def done(alive: bool, failed: int) -> None:
            if not alive:  # (nothing arrived on any connection it had in progress)
                self._wake_load_waiters(
                    rep,
                    ReplicaHungError,
                    f"stopped answering ({reason}) and sent nothing on any connection for "
                    f"{grace_s:g} s",
                )
            if failed:
                log.warning(
                    "replica %s (%s) stopped answering: nothing arrived on any of its "
                    "connections for %g s: %d request(s) in progress there failed "
                    "(retried on another replica, or ended with an error)",
                    rid, url, grace_s, failed,
                )  # fmt: skip
            elif alive:
                log.log(
                    logging.DEBUG if rep.spared_said else logging.INFO,
                    "replica %s (%s) does not answer its polls but still sends on its "
                    "connections: its request(s) in progress there go on",
                    rid, url,
                )  # fmt: skip
                rep.spared_said = True

        watched = client.upstream.replica_silent(grace_s, reason, done)
        if watched:
            log.log(
                logging.DEBUG if rep.watch_said else logging.WARNING,
                "replica %s (%s) stopped answering (%s: %s): %d request(s) in progress "
                "there fail if none of them receives anything for %g s",
                rid, url, reason, error, watched, grace_s,
            )  # fmt: skip
            rep.watch_said = True

    def _retire(self, rep: _Replica, listed: Collection[str]) -> None:
        """Unload (in the background) the adapters ``rep`` lists that were deleted through the
        admin API lately (the listener's tombstones) and that the catalog does not serve."""
        listener = self.listener
        if listener is None or self._session is None or not listed:
            return
        retired = listener.retired_adapters()
        if not retired:
            return
        rid = rep.config.replica_id
        for name in listed:
            key = (name, rid)
            if (
                name not in retired
                or name in self._specs
                or key in self._loads  # a load of ours is running: the next poll decides
                or key in self._unloads
            ):
                continue
            unload_id = self._own_id("unload")
            log.info(
                "replica %s (%s) still holds adapter %s, deleted through the admin API: "
                "unloading it (X-Request-Id %s)",
                rid, rep.config.url, name, unload_id or "-",
            )  # fmt: skip
            task = asyncio.create_task(
                self._unload_retired(rid, name, unload_id), name=f"unload {key}"
            )
            self._unloads[key] = task
            task.add_done_callback(functools.partial(self._unload_done, key))

    def _own_id(self, kind: str) -> str | None:
        """The request id of an admin call of the pool's own (``kind``: reload, unload)."""
        new = self.new_request_id
        return None if new is None else f"{new()}-{kind}"

    async def _unload_retired(
        self, replica_id: ReplicaId, adapter: str, request_id: str | None
    ) -> None:
        try:
            listener = self.listener
            if listener is not None and not await listener.still_retired(adapter):
                log.info(
                    "replica %s: adapter %s not unloaded: registered again through the admin "
                    "API since its deletion (this instance's view had not caught up yet)",
                    replica_id, adapter,
                )  # fmt: skip
                return
            await self.unload_adapter(replica_id, adapter, request_id=request_id)
        except Exception as exc:  # the next poll tries again (if the tombstone still stands)
            log.warning(
                "unloading deleted adapter %s from replica %s failed (X-Request-Id %s): %s",
                adapter, replica_id, request_id or "-", exc,
            )  # fmt: skip

    def _unload_done(self, key: tuple[str, ReplicaId], task: asyncio.Task[None]) -> None:
        if self._unloads.get(key) is task:
            del self._unloads[key]
        if not task.cancelled():
            task.exception()

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
        configured = rep.config.settings
        rep.reported_max_loras = m.max_loras
        settings = effective_settings(configured, m.max_loras)
        if configured is not None and m.max_loras == configured.max_loras:
            rep.said_max_loras = None  # (agrees again: a later difference is said again)
        elif (
            configured is not None
            and settings is not configured
            and rep.said_max_loras != m.max_loras
        ):
            rep.said_max_loras = m.max_loras
            log.warning(
                "replica %s (%s): its config says settings.max_loras %d, but vLLM reports "
                "max_lora %s (vllm:lora_requests_info): the shadow residency models %d GPU "
                "slots, as the server runs (set settings.max_loras: %s in the config)",
                rep.config.replica_id, rep.config.url, configured.max_loras, m.max_loras,
                settings.max_loras, m.max_loras,
            )  # fmt: skip
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

    def _record_failure(
        self, rep: _Replica, error: str, *, immediate: bool, timed_out: bool = False
    ) -> None:
        """``timed_out``: a poll that timed out (weak evidence: the replica may only be slow,
        or the gateway's host busy): out only after ``timeouts_to_unhealthy`` in a row."""
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
        poller = self._poller
        out = immediate or rep.failures >= poller.failures_to_unhealthy
        if out and timed_out and not immediate and rep.timeouts < poller.timeouts_to_unhealthy:
            log.info(
                "replica %s: poll timed out (%d in a row; out of rotation at %d): %s",
                rep.config.replica_id, rep.timeouts, poller.timeouts_to_unhealthy, error,
            )  # fmt: skip
            return
        if out:
            rid = rep.config.replica_id
            if rid in self._draining:  # drained first: a planned restart or removal
                log.info("drained replica %s is down (expected during a restart): %s", rid, error)
            else:
                log.warning("replica %s is unhealthy: %s", rid, error)
            self._take_out(rep)

    def _refuse(self, rep: _Replica, error: str) -> None:
        """The replica answers but must get no traffic (it serves another model): out at once,
        said once (until its error changes)."""
        if rep.last_error != error:
            rid, url = rep.config.replica_id, rep.config.url
            log.warning("replica %s (%s) gets no traffic: it %s", rid, url, error)
        rep.last_error = error
        self._take_out(rep)

    def _take_out(self, rep: _Replica) -> None:
        """No traffic to the replica until a poll finds it healthy again (if it has any now)."""
        snap = rep.snapshot
        if snap is not None and snap.healthy:
            rep.snapshot = dataclasses.replace(snap, healthy=False)
            self._rebuild_healthy()

    def _rebuild_healthy(self) -> None:
        draining = self._draining
        self._healthy = tuple(
            r.snapshot
            for rid, r in self._replicas.items()
            if r.snapshot is not None and r.snapshot.healthy and rid not in draining
        )

    # -- draining -----------------------------------------------------------------------------

    def set_draining(self, replica_ids: Collection[ReplicaId]) -> None:
        """The replicas being drained now (every instance's drains, from the shared state).
        An id not in the pool is kept (another instance drained a replica that a reload may
        add here later) and ignored until then. Each change is logged once."""
        new = frozenset(replica_ids)
        old = self._draining
        if new == old:
            return
        self._draining = new
        for rid in sorted(new - old):
            if rid in self._replicas:
                log.info(
                    "replica %s (%s) is draining: no new requests are routed there; those "
                    "under way finish",
                    rid, self._replicas[rid].config.url,
                )  # fmt: skip
        for rid in sorted(old - new):
            if rid in self._replicas:
                log.info("replica %s is no longer draining: it gets requests again", rid)
        self._rebuild_healthy()

    def is_draining(self, replica_id: ReplicaId) -> bool:
        return replica_id in self._draining and replica_id in self._replicas

    def no_replica_error(self) -> NoReplicaAvailableError:
        """The 503 for a request no replica may take: says which replicas are healthy but
        draining, if any (an operator's doing, not a fault)."""
        draining = [
            rid
            for rid, r in self._replicas.items()
            if rid in self._draining and r.snapshot is not None and r.snapshot.healthy
        ]
        if not draining:
            return NoReplicaAvailableError("no healthy replica is available", param="model")
        which = ", ".join(draining)
        if len(draining) == len(self._replicas):
            what = f"every replica is draining ({which})"
        else:
            verb = "is" if len(draining) == 1 else "are"
            what = f"{which} {verb} draining and the others are unhealthy"
        return NoReplicaAvailableError(
            f"no replica is available: {what}; DELETE /admin/replicas/{{id}}/drain puts one back",
            param="model",
        )

    def report_failure(
        self,
        replica_id: ReplicaId,
        error: str,
        *,
        client: VllmClient | None = None,
        refused: bool = False,
    ) -> None:
        """Passive health: the gateway could not talk to this replica. It gets no traffic until
        a poll succeeds again. ``client``: the one the failed call used (``client(id)`` when
        it began); if a reload replaced the replica since, the failure was the old entry's
        (its old URL, key or settings) and says nothing of the new one: it is ignored.
        ``refused``: the connection was refused (:func:`connection_refused`: nothing listens
        there): what a poll refused at connect does follows (the requests in progress there
        are woken, the adapter loads under way abandoned) without waiting for the next poll."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        if client is not None and rep.client is not client:
            log.debug(
                "replica %s: a failure on its entry from before a reload replaced it, ignored: %s",
                replica_id,
                error,
            )
            return
        self._record_failure(rep, error, immediate=True)
        if refused:
            self._stopped_listening(rep, self._client(rep), error)

    def report_stopping(
        self, replica_id: ReplicaId, error: str, *, client: VllmClient | None = None
    ) -> None:
        """The replica answered that it is shutting down although its ``/health`` may still
        answer 200 (vLLM's drain, see the module docstring): out of rotation until a poll
        fails, for ``stopping_hold_s`` at most. ``client``: as for :meth:`report_failure`."""
        rep = self._replicas.get(replica_id)
        if rep is None or (client is not None and rep.client is not client):
            return
        self._hold_stopping(rep, error)

    def _hold_stopping(self, rep: _Replica, error: str) -> None:
        self._hold(rep, error, self.stopping_hold_s)
        if self.listener is not None:  # (it queues the write: no I/O here)
            self.listener.replica_stopping(rep.config.replica_id, error, self.stopping_hold_s)

    def _hold(self, rep: _Replica, error: str, hold_s: float, *, where: str = "") -> None:
        """Hold ``rep`` out of rotation for ``hold_s`` (or until a poll fails); ``where``:
        who found it shutting down, if not this instance (for the log line)."""
        now = self._clock.now()
        held = rep.stopping_until is not None and rep.stopping_until > now
        rep.stopping_until = now + hold_s
        message = (
            f"shutting down: {error}; no new requests until a poll finds it gone, for "
            f"{self.stopping_hold_s:g} s at most"
        )
        if not held:
            log.warning(
                "replica %s (%s) is %s%s", rep.config.replica_id, rep.config.url, message, where
            )
        rep.failures += 1
        rep.last_error = message
        self._take_out(rep)

    def adopt_stopping(self, holds: Mapping[ReplicaId, tuple[str, float]]) -> None:
        """The holds of replicas shutting down that every gateway instance sharing the state
        keeps (the listener's, at each refresh): replica -> (what it answered, seconds left).
        A replica held there and not here is held here too, as long (another instance's
        request found it shutting down: this instance pays no retry to learn it); one held
        here follows the shared time; one held here and not there any more is released (a
        poll of some instance found it gone, or the hold lapsed): back in rotation at its
        next successful poll. Ids not in the pool are ignored."""
        now = self._clock.now()
        for rid, rep in self._replicas.items():
            shared = holds.get(rid)
            until = rep.stopping_until
            if shared is not None:
                error, left_s = shared
                if until is None or until <= now:
                    self._hold(rep, error, left_s, where=" (another gateway instance found so)")
                else:
                    rep.stopping_until = now + left_s
            elif until is not None:
                rep.stopping_until = None
                log.info(
                    "replica %s (%s): its shutting-down hold ended for every gateway instance "
                    "(a poll found it gone, or the hold lapsed): back in rotation at its next "
                    "successful poll",
                    rid, rep.config.url,
                )  # fmt: skip

    def stopping_for_s(self, replica_id: ReplicaId) -> float | None:
        """How long the replica's hold (:meth:`report_stopping`) may last yet, None if it is
        not held. For the admin API."""
        rep = self._replicas.get(replica_id)
        until = rep.stopping_until if rep is not None else None
        if until is None:
            return None
        left_s = until - self._clock.now()
        return left_s if left_s > 0 else None

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
        """Snapshots of the replicas that may get traffic: healthy and not draining (same tuple
        until something changes)."""
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

    def poll_timeouts_in_a_row(self, replica_id: ReplicaId) -> int:
        """How many of the replica's latest polls in a row timed out (0: the last did not)."""
        rep = self._replicas.get(replica_id)
        return rep.timeouts if rep is not None else 0

    def last_error(self, replica_id: ReplicaId) -> str | None:
        """Why the replica gets no traffic (its last failed poll, ...), else why it gets no
        adapter traffic (it serves no adapters), else None."""
        rep = self._replicas[replica_id]
        if rep.last_error is None and rep.lora_off is not None:
            return rep.lora_off.message(replica_id)
        return rep.last_error

    def reported_max_loras(self, replica_id: ReplicaId) -> int | None:
        """vLLM's ``max_lora`` at the replica's last successful poll (None: not reported)."""
        return self._replicas[replica_id].reported_max_loras

    def configured_settings(self, replica_id: ReplicaId) -> ReplicaSettings | None:
        """The replica's ``settings:`` in the config (None: not given)."""
        return self._replicas[replica_id].config.settings

    def registered_adapters(self) -> Mapping[ReplicaId, frozenset[str]]:
        return {rid: frozenset(r.registered) for rid, r in self._replicas.items()}

    def unknown_adapters(self) -> dict[ReplicaId, dict[str, str | None]]:
        """Adapters replicas list as registered that the gateway does not serve (not in
        :meth:`expect_adapters`' catalog, not deleted lately: the listener's tombstones), by
        replica: adapter -> the path its ``/v1/models`` card gives (None: no ``root``). E.g.
        registered through an embedded store's admin API before the gateway restarted, or
        loaded outside loragate. They are left alone (see the module docstring)."""
        retired = self.listener.retired_adapters() if self.listener is not None else ()
        out: dict[ReplicaId, dict[str, str | None]] = {}
        for rid, rep in self._replicas.items():
            names = sorted(n for n in rep.registered if n not in self._specs and n not in retired)
            if names:
                out[rid] = {n: rep.roots.get(n) for n in names}
        return out

    def has_answered(self, replica_id: ReplicaId) -> bool:
        """Whether a poll of the replica has succeeded since it joined the pool."""
        rep = self._replicas.get(replica_id)
        return rep is not None and rep.answered

    def base_model_card(self) -> ModelCard | None:
        """The base model as the replicas' ``/v1/models`` described it at their last good poll:
        ``root`` from the first replica (config order) that listed it, ``max_model_len`` the
        smallest any of them reports (a request may go to any of them). Healthy replicas only,
        unless none is healthy (then every replica's last card). None before any poll listed it.
        """
        cards = [
            (r.snapshot is not None and r.snapshot.healthy, r.base_card)
            for r in self._replicas.values()
            if r.base_card is not None and r.base_card.id == self.base_model
        ]
        chosen = [c for healthy, c in cards if healthy] or [c for _, c in cards]
        if not chosen:
            return None
        lens = [c.max_model_len for c in chosen if c.max_model_len is not None]
        root = next((c.root for c in chosen if c.root), None)
        return ModelCard(
            id=chosen[0].id, parent=None, root=root, max_model_len=min(lens) if lens else None
        )

    def stale_adapters(self) -> Mapping[ReplicaId, Mapping[str, str]]:
        """Adapters replicas hold from another path than the configured one: replica ->
        adapter -> the path it holds it from (they do not count as registered there)."""
        return {rid: dict(r.stale) for rid, r in self._replicas.items() if r.stale}

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
        """How many adapters this gateway loaded on each replica since the pool started: the
        replicas in the pool (config order), then those a reload removed, with their last
        count. A replica that a reload replaced counts on from where it was."""
        counts = self._load_counts
        loads = {rid: counts.get(rid, 0) for rid in self._replicas}
        loads.update((rid, n) for rid, n in counts.items() if rid not in loads)
        return loads

    def loading(self, replica_id: ReplicaId) -> frozenset[str]:
        """The adapters this gateway is loading on the replica now."""
        return frozenset(name for name, rid in self._loads if rid == replica_id)

    def refusing(self, spec: AdapterSpec) -> Collection[ReplicaId]:
        """The replicas that refused to load ``spec`` within ``adapter_refusal_ttl_s`` (and
        did not list it since)."""
        return self.refusals.refusing(spec)

    def refused_adapters(self, replica_id: ReplicaId) -> Mapping[str, tuple[str, float]]:
        """The refusals of ``replica_id`` in force now: adapter -> (the replica's error,
        seconds until it is forgotten)."""
        return self.refusals.of_replica(replica_id)

    # -- adapters ---------------------------------------------------------------------------

    async def ensure_adapter(
        self,
        replica_id: ReplicaId,
        spec: AdapterSpec,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        load_id: str | None = None,
        refusal_outlook: str | None = None,
        ask: bool = False,
    ) -> bool:
        """Make sure ``spec`` is registered on the replica, loading it through the admin API if
        needed. One load per (adapter, replica) at a time however many requests wait; a waiter
        that is cancelled does not cancel the load for the others. Returns True if this call
        waited for a load, False if the adapter was already registered.

        ``ask``: send the load even if this pool's view says the replica has the adapter (an
        admin registration, whose answer names where the adapter is: the view is the last
        poll's, and another gateway instance may have unloaded it since; vLLM's "already
        loaded" answer is a success that changes nothing there).

        ``timeout_s``: the longest this call waits for the load (None: until the load ends,
        which is within ``admin_timeout_s``). Past it, it raises
        :class:`UpstreamTimeoutError`, and the load goes on, up to ``admin_timeout_s``, for
        its other waiters and the next requests (a load the replica completes registers the
        adapter there as usual).

        The wait also ends when the replica goes away: :class:`ReplicaStoppedError` once a
        poll finds its listener closed (the load is abandoned: its connection is closed),
        :class:`ReplicaRetiredError` once a config reload removes or replaces its entry (the
        load runs on; a replacement at the same URL waits for it again).

        ``request_id``: the id of the gateway request this load is for, and ``load_id`` the
        ``X-Request-Id`` the load call carries (``gateway.request_ids``), if this call starts
        the load (else it waits for the one under way, started for another request); the
        load's log line, at its end, names both. ``refusal_outlook``: what a refusal means for
        the adapter's requests, for the refusal's log line, if this call starts the load
        (None: what it means for requests routed there; an admin registration's load says
        what happens to the registration)."""
        rep = self._replicas.get(replica_id)
        if rep is None:  # removed by a reload while the request was being routed
            raise ReplicaRetiredError(
                f"was removed from the pool by a config reload before adapter {spec.name!r} "
                "could load there"
            )
        if (
            not ask
            and spec.name in rep.registered
            and same_path(rep.roots.get(spec.name), spec.path)
        ):
            return False
        key = (spec.name, replica_id)
        task = self._loads.get(key)
        if task is None:
            task = self._start_load(key, rep, spec, load_id, refusal_outlook, request_id=request_id)
        wake = rep.wake
        if wake is None:
            wake = rep.wake = asyncio.get_running_loop().create_future()
        # (asyncio.wait neither cancels the task at its timeout nor when this waiter is.)
        wait_s = None if timeout_s is None else max(timeout_s, 0.0)
        await asyncio.wait((task, wake), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        if wake.done() and not (task.done() and not task.cancelled() and not task.exception()):
            error, reason = wake.result()
            raise error(f"{reason} while adapter {spec.name!r} was loading there")
        if not task.done():
            raise UpstreamTimeoutError(
                f"loading adapter {spec.name} on replica {replica_id} did not finish within "
                f"{wait_s:.3g} s (the load goes on, up to {self._admin_timeout_s:g} s)"
            )
        task.result()  # its error, if it failed (cancelled: the pool stopped)
        return True

    def holds_adapter(self, replica_id: ReplicaId, adapter: str) -> bool:
        """Whether the replica has ``adapter`` registered, from the configured path or from
        another one (being reloaded in place)."""
        rep = self._replicas.get(replica_id)
        return rep is not None and (adapter in rep.registered or adapter in rep.stale)

    async def reload_adapter(
        self,
        replica_id: ReplicaId,
        spec: AdapterSpec,
        *,
        request_id: str | None = None,
        load_id: str | None = None,
    ) -> None:
        """Reload ``spec`` in place on a replica that holds it (``load_inplace: true``: vLLM
        swaps the weights under the name; requests already running there finish as vLLM
        finishes them, and the name stays registered throughout). If a load of it is under
        way there (the in-place reload :meth:`expect_adapters` starts when the path changed),
        this waits for that one; else it starts one, from ``spec.path`` even if the replica
        holds it from there already (the folder was rewritten). Errors as
        :meth:`ensure_adapter`'s (:class:`AdapterLoadError`: the replica refused it, and
        keeps what it had)."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            raise ReplicaRetiredError(
                f"was removed from the pool by a config reload before adapter {spec.name!r} "
                "could be reloaded there"
            )
        key = (spec.name, replica_id)
        task = self._loads.get(key)
        if task is None:
            task = self._start_load(key, rep, spec, load_id, request_id=request_id, inplace=True)
        await asyncio.shield(task)

    def _wake_load_waiters(
        self, rep: _Replica, error: type[UpstreamConnectError], reason: str
    ) -> None:
        """The requests waiting for adapter loads on ``rep`` now stop waiting: each raises
        ``error`` (``reason``, and the adapter it waited for). Later ones wait anew."""
        wake, rep.wake = rep.wake, None
        if wake is not None and not wake.done():
            wake.set_result((error, reason))

    def _start_load(
        self,
        key: tuple[str, ReplicaId],
        rep: _Replica,
        spec: AdapterSpec,
        load_id: str | None,
        refusal_outlook: str | None = None,
        *,
        request_id: str | None = None,
        by: str = "the gateway",
        inplace: bool = False,
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(
            self._timed_load(
                rep, spec, load_id, refusal_outlook, request_id=request_id, by=by, inplace=inplace
            ),
            name=f"load {key}",
        )
        self._loads[key] = task
        task.add_done_callback(lambda t: self._load_done(key, t))
        return task

    def _load_done(self, key: tuple[str, ReplicaId], task: asyncio.Task[None]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        self._orphan_loads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: all waiters may have gone away

    async def _timed_load(
        self,
        rep: _Replica,
        spec: AdapterSpec,
        load_id: str | None,
        refusal_outlook: str | None = None,
        *,
        request_id: str | None = None,
        by: str = "the gateway",
        inplace: bool = False,
    ) -> None:
        """:meth:`_load`, its duration and outcome told to :attr:`on_load_done` and logged
        (INFO; DEBUG for a refusal, which :meth:`_load` logs as a WARNING): the adapter, the
        replica, what it was for (the request ``request_id``, else ``by``: the poller) and its
        ``X-Request-Id`` (``load_id``). The lines of a load for a request carry its id
        (``core.log_fields``)."""
        started = self._clock.now()
        result = "error"
        try:
            loaded = await self._load(
                rep, spec, load_id, refusal_outlook, request_id=request_id, inplace=inplace
            )
            result = "ok" if loaded else "already_loaded"
        except AdapterLoadError:
            result = "refused"
            raise
        except ReplicaStoppingError:
            result = "stopping"
            raise
        except UpstreamTimeoutError:
            result = "timeout"
            raise
        except UpstreamConnectError:
            result = "unreachable"
            raise
        except asyncio.CancelledError:
            result = "abandoned"
            raise
        finally:
            took_s = self._clock.now() - started
            if self.on_load_done is not None:
                self.on_load_done(rep.config.replica_id, result, took_s)
            log.log(
                logging.DEBUG if result == "refused" else logging.INFO,
                "adapter %s load on replica %s (%s) for %s (X-Request-Id %s): %s after %.0f ms",
                spec.name, rep.config.replica_id, rep.config.url,
                by if request_id is None else f"request {request_id}", load_id or "-",
                _LOAD_RESULTS.get(result, result), took_s * 1000.0,
                extra=about_request(request_id),
            )  # fmt: skip

    async def _load(
        self,
        rep: _Replica,
        spec: AdapterSpec,
        load_id: str | None = None,
        refusal_outlook: str | None = None,
        *,
        request_id: str | None = None,
        inplace: bool = False,
    ) -> bool:
        """Load ``spec`` on ``rep``; True if the replica loaded it (200), False if it had it
        registered already (from the configured path). ``load_id``: the call's
        ``X-Request-Id`` (an in-place reload after "already loaded": ``<load_id>-inplace``);
        ``request_id``: the request it is for, if any (its log lines carry it).
        ``inplace``: reload it in place even if the replica holds it from ``spec.path``
        (:meth:`reload_adapter`: the folder's weights changed)."""
        # Errors are already loragate errors: AdapterLoadError (the replica refused the
        # adapter), UpstreamConnectError or UpstreamTimeoutError (the replica is unreachable).
        rid = rep.config.replica_id
        client = self._client(rep)
        old = rep.stale.get(spec.name)
        if old is None and inplace:
            old = rep.roots.get(spec.name, spec.path)
        loaded = True  # the replica loaded it (answered 200), not "already loaded"
        try:
            if old is not None:
                await client.load_adapter(
                    spec.name, spec.path, load_inplace=True, request_id=load_id
                )
            elif not await client.load_adapter(spec.name, spec.path, request_id=load_id):
                # "already loaded": registered there since the last poll (by another gateway,
                # or by hand). From the configured path? Its card says.
                old = await self._root_on(rep, spec.name)
                if old is not None and not same_path(old, spec.path):
                    log.warning(
                        "replica %s (%s) has adapter %s registered from %s, not from the "
                        "configured %s: reloading it in place",
                        rid, rep.config.url, spec.name, old, spec.path,
                        extra=about_request(request_id),
                    )  # fmt: skip
                    await client.load_adapter(
                        spec.name, spec.path, load_inplace=True,
                        request_id=None if load_id is None else f"{load_id}-inplace",
                    )  # fmt: skip
                else:
                    old = None
                    loaded = False
        except AdapterLoadError as exc:  # the clients get a 502; the operator a log line
            if load_refused_stopping(exc.status, exc.message):
                # The replica is shutting down (or its engine died): not the adapter's fault.
                self._hold_stopping(rep, f"loading adapter {spec.name!r}: {exc.message}")
                raise ReplicaStoppingError(
                    f"replica {rid} is shutting down ({exc.message})"
                ) from exc
            cause = cause_of(exc.status, exc.message)
            if cause is not None:  # the replica's doing, not the adapter's: no refusal
                self._mark_lora_off(rep, cause, exc.message)
                raise ReplicaServesNoAdaptersError(
                    f"serves no adapters: {exc.message}", status=exc.status
                ) from exc
            refusals = self.refusals
            news = refusals.record(spec, rid, exc.message)
            if old is not None:
                for entry in self._entries_of(rep):
                    entry.inplace_failed[spec.name] = spec.path
            # Once per (adapter, replica) while the refusal is remembered (a load there again
            # meanwhile, e.g. racing another instance's shared refusal, logs at debug).
            log.log(
                logging.WARNING if news else logging.DEBUG,
                "adapter %s (%s) failed to load on replica %s (%s%s): %s%s%s",
                spec.name,
                spec.path,
                rid,
                rep.config.url,
                "" if load_id is None else f", X-Request-Id {load_id}",
                exc,
                f" (it stays registered there from {old}: it gets no requests for "
                f"{spec.name} there that this gateway does not try to reload in place first)"
                if old is not None
                else "",
                refusal_outlook
                if refusal_outlook is not None
                else self._refusal_outlook(spec, rid)
                if refusals.ttl_s > 0
                else "",
                extra=about_request(request_id),
            )
            raise
        if old is not None:
            log.info(
                "adapter %s reloaded in place on replica %s: %s (was %s)",
                spec.name, rid, spec.path, old, extra=about_request(request_id),
            )  # fmt: skip
        self.refusals.forget(spec.name, rid)
        if loaded:
            self._load_counts[rid] = self._load_counts.get(rid, 0) + 1
        now = self._clock.now()
        for entry in self._entries_of(rep):
            entry.stale.pop(spec.name, None)
            entry.inplace_failed.pop(spec.name, None)
            entry.registered.add(spec.name)
            entry.roots[spec.name] = spec.path
            entry.loaded_at_s[spec.name] = now
            self._refresh_residency(entry)
        if loaded and self.listener is not None:  # ("already loaded" changed nothing there)
            try:
                await self.listener.adapter_loaded(rep.config.replica_id, spec.name)
            except Exception:
                log.exception(
                    "pool listener failed on a load of %s", spec.name,
                    extra=about_request(request_id),
                )  # fmt: skip
        return loaded

    def _entries_of(self, rep: _Replica) -> tuple[_Replica, ...]:
        """``rep``, and the entry that replaced it if that is at the same URL (the same vLLM
        server: what an adapter load there did holds for both)."""
        current = self._replicas.get(rep.config.replica_id)
        if current is None or current is rep or current.config.url != rep.config.url:
            return (rep,)
        return (rep, current)

    def _refusal_outlook(self, spec: AdapterSpec, replica_id: ReplicaId) -> str:
        """What a refusal just recorded means for ``spec``'s requests, for the log line."""
        ttl_s = self.refusals.ttl_s
        refusing = self.refusals.refusing(spec)
        if any(s.replica_id not in refusing for s in self._healthy):
            return (
                f" (it gets no requests for {spec.name} for {ttl_s:g} s while another "
                "replica can take them)"
            )
        return (
            f" (every healthy replica refused it: requests for {spec.name} get a 502 naming "
            f"the refusals, without a load, until a refusal lapses (within {ttl_s:g} s) or a "
            "replica lists the adapter)"
        )

    async def _root_on(self, rep: _Replica, adapter: str) -> str | None:
        """The path ``rep``'s ``/v1/models`` card of ``adapter`` gives (None: not listed, no
        ``root``, or the list could not be read)."""
        try:
            models = await self._client(rep).list_models()
        except (LoragateError, ValueError):
            return None
        return next((c.root for c in models.cards if c.id == adapter and c.parent), None)

    async def unload_adapter(
        self, replica_id: ReplicaId, adapter: str, *, request_id: str | None = None
    ) -> bool:
        """Unregister ``adapter`` on the replica through the admin API (``request_id``: the
        call's ``X-Request-Id``). Returns False if the replica did not know it. Errors
        (unreachable replica, refusal) propagate."""
        rep = self._replicas[replica_id]
        known = await self._client(rep).unload_adapter(adapter, request_id=request_id)
        rep.registered.discard(adapter)
        rep.loaded_at_s.pop(adapter, None)
        rep.roots.pop(adapter, None)
        rep.stale.pop(adapter, None)
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

    def forget_everywhere(self, adapter: str) -> None:
        """``adapter`` was registered anew (an admin registration of a name the shared registry
        did not hold: deleted, maybe by another gateway instance, or never registered): what
        this pool's polls said of it predates the registration (the deletion may have unloaded
        it since), so it counts as registered nowhere until a load or a poll says otherwise (a
        request routed where it still is loads it again: vLLM's "already loaded", no error)."""
        for rid in self._replicas:
            self.forget_adapter(rid, adapter)

    def forget_unloaded(self, gone: Mapping[ReplicaId, Collection[str]]) -> None:
        """The shared residency dropped these adapters from these replicas since the last call
        (``SharedState.sync_unloads``, called each round of its loop, with nothing if nothing
        was dropped): another gateway instance unloaded them (an admin
        ``DELETE``, the planner), or refused them, or its polls stopped listing them. This
        pool's view (its last poll's) stops counting them as registered there at once,
        instead of at its next poll: a request routed there would get vLLM's 404 and spend its
        retry. Kept: a load of ours under way there, or one that ended since the last call
        (the shared view may have been read before that load was written). A drop that was
        wrong costs the next request there one load that vLLM answers "already loaded"."""
        since, self._unloads_seen_s = self._unloads_seen_s, self._clock.now()
        for rid, names in gone.items():
            rep = self._replicas.get(rid)
            if rep is None:
                continue
            dropped = [
                name
                for name in names
                if name in rep.registered
                and (name, rid) not in self._loads
                and rep.loaded_at_s.get(name, -math.inf) < since
            ]
            if not dropped:
                continue
            for name in dropped:
                rep.registered.discard(name)
                rep.loaded_at_s.pop(name, None)
            log.debug(
                "replica %s (%s): adapter(s) %s no longer registered there per the shared "
                "state (unloaded by another gateway instance, or no longer listed): loaded "
                "again on demand",
                rid, rep.config.url, ", ".join(sorted(dropped)),
            )  # fmt: skip
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
            raise self.no_replica_error()
        return healthy


# A load's result (``_timed_load``) as its log line says it.
_LOAD_RESULTS = {
    "ok": "loaded",
    "already_loaded": "already registered there",
    "refused": "refused",
    "timeout": "no answer in time",
    "unreachable": "unreachable",
    "stopping": "the replica is shutting down",
    "abandoned": "abandoned",
    "error": "failed",
}

# Why the requests waiting for a load on a replica that stopped listening stop waiting.
_STOPPED_LOADING = "stopped listening (its poll could not connect)"


def poll_failure_reason(exc: BaseException) -> str:
    """The reason (one of ``POLL_FAILURE_REASONS``) a poll failed with ``exc``."""
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    return "bad_response"


def connection_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a refused connection: nothing
    listens on the replica's port (not a connect that timed out: it may only be slow)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ECONNREFUSED:
            return True
        seen = seen.__cause__
    # asyncio's "Multiple exceptions: [Errno 111] Connect call failed (...), ..." (every
    # address of the host refused) has no errno of its own.
    text = str(exc)
    return "Multiple exceptions" in text and text.count("[Errno") == text.count(
        f"[Errno {errno.ECONNREFUSED}]"
    )


def same_path(a: str | None, b: str) -> bool:
    """Whether adapter path ``a`` (None: unknown, taken as the same) names ``b``, spelled
    alike up to redundant separators and dots (symbolic links are not followed: the paths
    are the replica's, not this host's)."""
    return a is None or a == b or os.path.normpath(a) == os.path.normpath(b)


def assumed_settings(max_loras: int | None) -> ReplicaSettings:
    """The settings of a replica without ``settings:`` in the config: vLLM's defaults for what
    it does not report. ``max_loras`` comes from ``vllm:lora_requests_info``'s ``max_lora``
    label once the server ran a request (any: vLLM 0.32 exports the series from its first
    engine step on, ``bench/vllm_cpu/lora_off_transcript.md``; None before: the default 4 is
    assumed);
    ``max_cpu_loras`` is not reported at all, and vLLM's default for it is ``max_loras`` (a
    CPU cache smaller than the GPU slots is refused at start), so that is what is assumed."""
    slots = ReplicaSettings().max_loras if max_loras is None else max_loras
    return ReplicaSettings(max_loras=slots, max_cpu_loras=slots)


def effective_settings(
    configured: ReplicaSettings | None, reported_max_loras: int | None
) -> ReplicaSettings:
    """The settings the pool models a replica with: vLLM's reported ``max_lora`` is the truth
    for the running server (the config may be wrong or stale: it is replaced there, and the
    CPU cache is at least as large, as vLLM requires), the config's settings for the rest,
    :func:`assumed_settings` without a config. Not reported (no LoRA request ran since the
    server started: vLLM 0.32 exports the series from its first engine step on): the config's
    (``configured`` itself)."""
    if configured is None:
        return assumed_settings(reported_max_loras)
    if reported_max_loras is None or reported_max_loras == configured.max_loras:
        return configured
    return dataclasses.replace(
        configured,
        max_loras=reported_max_loras,
        max_cpu_loras=max(configured.max_cpu_loras, reported_max_loras),
    )


def _wrong_model(base_model: str, served: Sequence[str]) -> str:
    listed = ", ".join(repr(m) for m in served) if served else "no base model"
    return (
        f"serves {listed}, not the gateway's base_model {base_model!r} (start it with "
        f"--served-model-name {base_model}, or set base_model to the name it serves)"
    )
