"""The replica pool: one :class:`VllmClient` per replica, a poller that keeps a
:class:`ReplicaSnapshot` of each from ``/health``, ``/metrics`` and ``/v1/models``, passive
health (a failed proxy connection takes a replica out at once), and single-flight adapter loads.

Registered adapters: the set from ``/v1/models`` (entries with a ``parent``), plus the
adapters this gateway loaded since that poll began (a poll that started before a load finished
cannot see it, so it must not erase it).

Settings: a replica's ``settings:`` in the config are what it is modelled with, except
``max_loras`` while vLLM reports its ``max_lora`` (``vllm:lora_requests_info``, from the
server's first engine step on): the running server's is the truth (:func:`effective_settings`),
and a difference from the config is said once (a WARNING naming both) per change.

A :class:`PoolListener` (the gateway's shared state) hears about every poll, every adapter
load and unload, so the shadow residency shared by all gateway instances follows the pool; it
is also the refusals' sink, so every instance knows the refusals any of them met.

Replicas can be added and removed while running (config reload).
Replicas a config reload removes or replaces: the requests waiting for an adapter load there
stop waiting (``ReplicaRetiredError``), and the proxy routes them again.

The pool's parts (``backends.pool_*``; :class:`ReplicaPool` composes them):
``pool_types`` (the replica record, the listener protocol, the pool's errors), ``pool_state``
(the shared state), ``pool_health`` (out of rotation and back: failed polls, the
shutting-down hold, drains), ``pool_lora_off`` (replicas that serve no adapters),
``pool_loads`` (single-flight adapter loads and in-place reloads), ``pool_unloads``
(unloads, deleted adapters), ``pool_stopped`` (replicas that stopped listening or
answering). This module: the pool's lifecycle, membership (config reloads), polling and
queries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence

import aiohttp

from loragate.backends.client import ModelCard, VllmClient
from loragate.backends.metrics import VllmMetrics
from loragate.backends.pool_health import (
    connection_refused,
    poll_failure_reason,
    poll_found_gone,
)
from loragate.backends.pool_state import assumed_settings, fits
from loragate.backends.pool_stopped import PoolStopped
from loragate.backends.pool_types import ReplicaEntry, ReplicaRetiredError
from loragate.backends.pool_unloads import PoolUnloads
from loragate.core.config import ReplicaConfig
from loragate.core.errors import LoragateError
from loragate.core.tasks import cancel_and_wait
from loragate.core.types import ReplicaId, ReplicaSettings, ReplicaSnapshot, Residency

log = logging.getLogger(__name__)


class ReplicaPool(PoolStopped, PoolUnloads):
    """Owns the replicas' clients and their latest snapshots. Start it with :meth:`start`."""

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
            await cancel_and_wait(task)
        for load in [
            *self._loads.values(),
            *self._unloads.values(),
            *self._orphan_loads,
            *self._lora_checks.values(),
            *self._stale_checks.values(),
        ]:
            load.cancel()
        for rep in self._replicas.values():
            if rep.client is not None:
                rep.client.upstream.close()

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
        fresh: list[ReplicaEntry] = []
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

    def _retire_replica(self, rep: ReplicaEntry, *, successor: ReplicaEntry | None = None) -> None:
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

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poller.interval_s)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die
                log.exception("replica poll failed unexpectedly")

    async def poll_once(self) -> None:
        """Poll every replica concurrently and update snapshots and health."""
        await asyncio.gather(*(self._poll(rep) for rep in self._replicas.values()))
        self._rebuild_healthy()

    async def _poll(self, rep: ReplicaEntry) -> None:
        client = self._client(rep)
        started = self._clock.now()
        try:
            _, metrics, models = await asyncio.gather(
                client.check_health(), client.metrics(), client.list_models()
            )
        except (LoragateError, ValueError) as exc:
            reason = poll_failure_reason(exc)
            self._poll_failed(rep, reason)
            if rep.stopping_until is not None and poll_found_gone(exc):
                # It went away: the next poll that succeeds is it back (for every instance
                # sharing the hold). A poll that timed out ends no hold: a draining replica
                # may only be slow to answer.
                rep.stopping_until = None
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
            and not fits(roots[name], spec, self._replacing)
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

    async def _tell_polled(self, rep: ReplicaEntry, *, models_seen: bool) -> None:
        listener, snap = self.listener, rep.snapshot
        if listener is None or snap is None:
            return
        try:
            rid = rep.config.replica_id
            loading = frozenset(name for name, r in self._loads if r == rid)
            await listener.replica_polled(snap, models_seen=models_seen, loading=loading)
        except Exception:
            log.exception("pool listener failed on a poll of %s", rep.config.replica_id)

    def _snapshot_from(
        self, rep: ReplicaEntry, m: VllmMetrics, *, healthy: bool
    ) -> ReplicaSnapshot:
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

    @property
    def replica_ids(self) -> tuple[ReplicaId, ...]:
        return tuple(self._replicas)

    def client(self, replica_id: ReplicaId) -> VllmClient:
        return self._client(self._replicas[replica_id])

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
        loaded outside loragate. They are left alone (see ``backends.pool_unloads``)."""
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
