"""The replica pool's shared state: :class:`PoolState`, the base of the pool's parts, holds the
replica records by id (``backends.pool_types.ReplicaEntry``), the healthy tuple routing reads,
the drains, the adapter loads and unloads under way, the refusals, the catalog's adapters and
the hooks the gateway sets (listener, load and poll callbacks, request ids), with the helpers
every part uses (a replica's client, the entries a load's result holds for, residency and
healthy-tuple refreshes); and :func:`same_path`, :func:`assumed_settings`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from loragate.backends.client import VllmClient
from loragate.backends.lora_off import (
    CHECK_NAME,
    LoraOff,
)
from loragate.backends.pool_types import STOPPING_HOLD_S, PoolListener, ReplicaEntry
from loragate.backends.refusals import Refusals
from loragate.core.clock import Clock, WallClock
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.types import AdapterSpec, ReplicaId, ReplicaSettings, ReplicaSnapshot

# One logger for the whole pool (its modules split one concept): operators' log filters and
# the tests name ``loragate.backends.pool``.
log = logging.getLogger("loragate.backends.pool")


class PoolState:
    """The state every part of the replica pool shares (built by the constructor), and the
    helpers they all use. :class:`~loragate.backends.pool.ReplicaPool` composes the parts."""

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
        self._replicas: dict[ReplicaId, ReplicaEntry] = {}
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
        # Findings that a replica serves no adapters ride the refusals, as the check load's.
        self.refusals = Refusals(
            self._poller.adapter_refusal_ttl_s, self._clock, findings_name=CHECK_NAME
        )
        self.refusals.on_findings = self._adopt_lora_off
        self._listener: PoolListener | None = None
        self.listener = listener
        # The model every replica must serve (None: not checked). A reload may change it.
        self.base_model = base_model
        # The adapters the gateway serves, by name (:meth:`expect_adapters`).
        self._specs: dict[str, AdapterSpec] = {}
        # Adapters a ``PUT /admin/adapters/N`` is replacing: name -> the new path, which counts
        # as registered until the catalog takes it or the PUT gives it up
        # (:meth:`PoolLoads.begin_replace`).
        self._replacing: dict[str, str] = {}
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
        # (adapter, replica) -> the check of the paths in force before an in-place reload of
        # an adapter a poll found held from another path (``PoolLoads._found_stale``).
        self._stale_checks: dict[tuple[str, ReplicaId], asyncio.Task[None]] = {}
        # Makes the request ids of the pool's own admin calls (an in-place reload a poll
        # found needed: ``<id>-reload``; a deleted adapter's unload: ``<id>-unload``); the
        # gateway's generator (``gateway.request_ids``). None: sent without X-Request-Id.
        self.new_request_id: Callable[[], str] | None = None

    def _adopt_lora_off(self, findings: Mapping[ReplicaId, tuple[str, str, float]]) -> None:
        """The replicas every instance holds as serving no adapters (``PoolLoraOff``)."""

    @staticmethod
    def _new_replica(cfg: ReplicaConfig) -> ReplicaEntry:
        rep = ReplicaEntry(config=cfg)
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

    def _bind(self, rep: ReplicaEntry, session: aiohttp.ClientSession) -> None:
        rep.client = VllmClient(
            session,
            rep.config.url,
            api_key=rep.config.api_key,
            poll_timeout_s=self._poller.timeout_s,
            admin_timeout_s=self._admin_timeout_s,
            connect_timeout_s=self._connect_timeout_s,
            max_idle_connections=self._max_idle_connections,
        )

    @property
    def clock(self) -> Clock:
        """The clock the pool stamps its snapshots (``scraped_at_s``) with."""
        return self._clock

    @staticmethod
    def _client(rep: ReplicaEntry) -> VllmClient:
        if rep.client is None:
            raise RuntimeError("ReplicaPool.start() has not been called")
        return rep.client

    def _entries_of(self, rep: ReplicaEntry) -> tuple[ReplicaEntry, ...]:
        """``rep``, and the entry that replaced it if that is at the same URL (the same vLLM
        server: what an adapter load there did holds for both)."""
        current = self._replicas.get(rep.config.replica_id)
        if current is None or current is rep or current.config.url != rep.config.url:
            return (rep,)
        return (rep, current)

    def _refresh_residency(self, rep: ReplicaEntry) -> None:
        snap = rep.snapshot
        if snap is None:
            return
        rep.snapshot = dataclasses.replace(
            snap,
            residency=dataclasses.replace(snap.residency, registered=frozenset(rep.registered)),
        )
        if snap.healthy:
            self._rebuild_healthy()

    def _rebuild_healthy(self) -> None:
        draining = self._draining
        self._healthy = tuple(
            r.snapshot
            for rid, r in self._replicas.items()
            if r.snapshot is not None and r.snapshot.healthy and rid not in draining
        )

    def _own_id(self, kind: str) -> str | None:
        """The request id of an admin call of the pool's own (``kind``: reload, unload)."""
        new = self.new_request_id
        return None if new is None else f"{new()}-{kind}"


def fits(root: str | None, spec: AdapterSpec, replacing: Mapping[str, str]) -> bool:
    """Whether an adapter held from ``root`` is ``spec`` as the pool expects it: from its path,
    or from the new path a ``PUT`` is replacing it with (``replacing``: name -> path)."""
    if same_path(root, spec.path):
        return True
    new = replacing.get(spec.name)
    return new is not None and same_path(root, new)


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
