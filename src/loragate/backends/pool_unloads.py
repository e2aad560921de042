"""The replica pool's adapter unloads: admin unloads, adapters a replica or another gateway
instance says are gone (dropped from the view), and deleted adapters unloaded after a poll.

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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Collection, Mapping

from loragate.backends.pool_state import PoolState
from loragate.backends.pool_types import ReplicaEntry
from loragate.core.types import ReplicaId

# One logger for the whole pool (its modules split one concept): operators' log filters and
# the tests name ``loragate.backends.pool``.
log = logging.getLogger("loragate.backends.pool")


class PoolUnloads(PoolState):
    """Adapter unloads, and dropping adapters from the view when they are gone."""

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

    def forget_unloaded(
        self, gone: Mapping[ReplicaId, Collection[str]]
    ) -> dict[ReplicaId, frozenset[str]]:
        """The shared residency dropped these adapters from these replicas since the last call
        (``SharedState.sync_unloads``, called each round of its loop, with nothing if nothing
        was dropped): another gateway instance unloaded them (an admin
        ``DELETE``, the planner), or refused them, or its polls stopped listing them. This
        pool's view (its last poll's) stops counting them as registered there at once,
        instead of at its next poll: a request routed there would get vLLM's 404 and spend its
        retry. Kept: a load of ours under way there, or one that ended since the last call
        (the shared view may have been read before that load was written). A drop that was
        wrong costs the next request there one load that vLLM answers "already loaded".
        Returns the names kept (the caller hands them again while the shared view lacks
        them: by then the load is older than the last call, and they are dropped)."""
        since, self._unloads_seen_s = self._unloads_seen_s, self._clock.now()
        kept: dict[ReplicaId, frozenset[str]] = {}
        for rid, names in gone.items():
            rep = self._replicas.get(rid)
            if rep is None:
                continue
            held = [name for name in names if name in rep.registered]
            dropped = [
                name
                for name in held
                if (name, rid) not in self._loads and rep.loaded_at_s.get(name, -math.inf) < since
            ]
            if len(dropped) < len(held):
                kept[rid] = frozenset(held).difference(dropped)
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
        return kept

    def _retire(self, rep: ReplicaEntry, listed: Collection[str]) -> None:
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
