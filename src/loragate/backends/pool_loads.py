"""The replica pool's adapter loads: single-flight loads per (adapter, replica) for requests,
admin registrations and in-place reloads, their waits, results, counts and log lines.

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

Request ids: each admin call carries the ``X-Request-Id`` its caller gives
(:meth:`ReplicaPool.ensure_adapter`'s ``load_id``, :meth:`ReplicaPool.unload_adapter`'s
``request_id``: the gateway's request's id with ``-load``/``-unload`` parts, see
``gateway.request_ids``); the pool's own calls (an in-place reload a poll found needed, a
deleted adapter's unload) get ``<generated>-reload`` / ``<generated>-unload`` from
:attr:`ReplicaPool.new_request_id`. A load ends with one log line (INFO; a refusal's is the
WARNING above) naming the adapter, the replica, the request it was for (the one that started
it: the others wait for the same load) and the load's id, its result and duration, so a load
in a replica's (or a proxy's) log can be matched to the request or admin call that caused it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Collection, Mapping

from loragate.backends.engine_failures import load_refused_stopping
from loragate.backends.lora_off import (
    cause_of,
)
from loragate.backends.pool_health import PoolHealth
from loragate.backends.pool_lora_off import PoolLoraOff
from loragate.backends.pool_state import fits, same_path
from loragate.backends.pool_types import (
    LoadOrder,
    ReplicaEntry,
    ReplicaRetiredError,
    ReplicaServesNoAdaptersError,
    ReplicaStoppingError,
)
from loragate.core.errors import (
    AdapterLoadError,
    AdapterLoadTimeoutError,
    LoragateError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from loragate.core.log_fields import about_request
from loragate.core.types import AdapterSpec, ReplicaId

# One logger for the whole pool (its modules split one concept): operators' log filters and
# the tests name ``loragate.backends.pool``.
log = logging.getLogger("loragate.backends.pool")


class PoolLoads(PoolHealth, PoolLoraOff):
    """Adapter loads and in-place reloads, one at a time per (adapter, replica)."""

    def expect_adapters(self, adapters: Mapping[str, AdapterSpec]) -> None:
        """The adapters the gateway serves (its catalog), with the paths they must be
        registered from. An adapter a replica holds from another path stops counting as
        registered there at once, and (once started) is reloaded in place."""
        self._specs = dict(adapters)
        for rep in self._replicas.values():
            changed = False
            for name, held in list(rep.stale.items()):  # e.g. a path changed back
                spec = self._specs.get(name)
                if spec is None or fits(held, spec, self._replacing):
                    del rep.stale[name]
                    rep.registered.add(name)
                    changed = True
            for name in list(rep.registered):
                spec = self._specs.get(name)
                root = rep.roots.get(name)
                if spec is not None and root is not None and not fits(root, spec, self._replacing):
                    rep.registered.discard(name)
                    rep.loaded_at_s.pop(name, None)
                    changed = True
                    self._found_stale(rep, spec, root)
            for name, path in list(rep.inplace_failed.items()):
                if name not in self._specs or self._specs[name].path != path:
                    del rep.inplace_failed[name]
            if changed:
                self._refresh_residency(rep)

    def begin_replace(self, spec: AdapterSpec) -> None:
        """A ``PUT /admin/adapters/N`` is about to reload ``spec.name`` from ``spec.path`` while
        the catalog still has its old definition (swapped only once a replica took the new
        one): until :meth:`end_replace`, a replica holding it from either path counts as
        registered and serves it (the old weights until its reload is done), and no poll
        reloads one back to the old path."""
        self._replacing[spec.name] = spec.path

    def end_replace(self, name: str) -> None:
        """The ``PUT`` of ``name`` is over (the catalog has the definition in force, new or
        old): the replicas that hold it from another path are found stale and reloaded in
        place, as after any catalog change."""
        if self._replacing.pop(name, None) is not None:
            self.expect_adapters(self._specs)

    def _found_stale(self, rep: ReplicaEntry, spec: AdapterSpec, root: str) -> None:
        """``rep`` holds ``spec.name`` from ``root``, not from ``spec.path``: say so (once per
        old path) and reload it in place in the background (unless that failed already).
        With a shared state, only once the listener said that ``root`` is not a path in force
        for another instance (:meth:`PoolListener.paths_in_force`: a ``PUT`` of theirs is
        reloading the replicas from it, or put it in force since our catalog's last refresh):
        such a replica is not reloaded back, and gets no requests for the name here until
        this instance's catalog has that path."""
        rid = rep.config.replica_id
        news = rep.stale.get(spec.name) != root
        rep.stale[spec.name] = root
        key = (spec.name, rid)
        if self._session is None or key in self._loads or key in self._stale_checks:
            if news:
                self._say_stale(rep, spec, root)
            return
        asked = None if self.listener is None else self.listener.paths_in_force(spec.name)
        if asked is None:
            if news:
                self._say_stale(rep, spec, root)
            self._reload_stale(rep, spec)
            return
        task = asyncio.create_task(
            self._reload_unless_in_force(rep, spec, root, asked, news=news),
            name=f"stale check {spec.name} on {rid}",
        )
        self._stale_checks[key] = task
        task.add_done_callback(lambda t: self._stale_check_done(key, t))

    def _say_stale(self, rep: ReplicaEntry, spec: AdapterSpec, root: str) -> None:
        log.warning(
            "replica %s (%s) has adapter %s registered from %s, not from the configured %s: "
            "it gets no requests for %s until it is reloaded in place from %s",
            rep.config.replica_id, rep.config.url, spec.name, root, spec.path, spec.name,
            spec.path,
        )  # fmt: skip

    def _reload_stale(self, rep: ReplicaEntry, spec: AdapterSpec) -> None:
        if rep.inplace_failed.get(spec.name) == spec.path:
            return  # (failed already: a request routed there tries again first)
        self._start_load(
            LoadOrder(
                rep=rep,
                spec=spec,
                load_id=self._own_id("reload"),
                by="the poller (an in-place reload)",
            )
        )

    async def _reload_unless_in_force(
        self,
        rep: ReplicaEntry,
        spec: AdapterSpec,
        root: str,
        asked: Awaitable[frozenset[str]],
        *,
        news: bool,
    ) -> None:
        rid = rep.config.replica_id
        paths = await asked
        if any(same_path(root, p) and not same_path(p, spec.path) for p in paths):
            if news:
                log.info(
                    "replica %s (%s) has adapter %s registered from %s, the path another "
                    "gateway instance's PUT /admin/adapters is reloading it from or has put in "
                    "force (this instance's catalog still says %s): not reloaded back; it gets "
                    "no requests for %s here until the catalog takes the new path",
                    rid, rep.config.url, spec.name, root, spec.path, spec.name,
                )  # fmt: skip
            return
        if news:
            self._say_stale(rep, spec, root)
        # Still so after the wait (a poll or a catalog change may have settled it meanwhile)?
        if (
            self._session is not None
            and self._replicas.get(rid) is rep
            and self._specs.get(spec.name) == spec
            and rep.stale.get(spec.name) == root
            and (spec.name, rid) not in self._loads
        ):
            self._reload_stale(rep, spec)

    def _stale_check_done(self, key: tuple[str, ReplicaId], task: asyncio.Task[None]) -> None:
        if self._stale_checks.get(key) is task:
            del self._stale_checks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "checking the paths in force of adapter %s on replica %s failed", *key,
                exc_info=task.exception(),
            )  # fmt: skip

    def stale_checking(self, replica_id: ReplicaId, adapter: str) -> bool:
        """Whether the pool is finding out whether to reload ``adapter`` on the replica
        (:meth:`_found_stale`), or reloading it. Not read by the gateway itself: the tests
        wait on it, bounded."""
        key = (adapter, replica_id)
        return key in self._stale_checks or key in self._loads

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
            and fits(rep.roots.get(spec.name), spec, self._replacing)
        ):
            return False
        task = self._loads.get((spec.name, replica_id))
        if task is None:
            order = LoadOrder(
                rep=rep,
                spec=spec,
                load_id=load_id,
                request_id=request_id,
                refusal_outlook=refusal_outlook,
            )
            task = self._start_load(order)
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
            raise AdapterLoadTimeoutError(
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
        finishes them, and the name stays registered throughout). A load of it under way
        there (maybe of another path: a request's, while a ``PUT`` keeps the old definition in
        force) is waited for first; then it reloads from ``spec.path``, even if the replica
        holds it from there already (the folder was rewritten). Errors as
        :meth:`ensure_adapter`'s (:class:`AdapterLoadError`: the replica refused it, and
        keeps what it had)."""
        key = (spec.name, replica_id)
        while (under_way := self._loads.get(key)) is not None:
            await asyncio.wait((under_way,))
        rep = self._replicas.get(replica_id)
        if rep is None:
            raise ReplicaRetiredError(
                f"was removed from the pool by a config reload before adapter {spec.name!r} "
                "could be reloaded there"
            )
        task = self._start_load(
            LoadOrder(rep=rep, spec=spec, load_id=load_id, request_id=request_id, inplace=True)
        )
        await asyncio.shield(task)

    def _wake_load_waiters(
        self, rep: ReplicaEntry, error: type[UpstreamConnectError], reason: str
    ) -> None:
        """The requests waiting for adapter loads on ``rep`` now stop waiting: each raises
        ``error`` (``reason``, and the adapter it waited for). Later ones wait anew."""
        wake, rep.wake = rep.wake, None
        if wake is not None and not wake.done():
            wake.set_result((error, reason))

    def _start_load(self, order: LoadOrder) -> asyncio.Task[None]:
        key = order.key
        task = asyncio.create_task(self._timed_load(order), name=f"load {key}")
        self._loads[key] = task
        task.add_done_callback(lambda t: self._load_done(key, t))
        return task

    def _load_done(self, key: tuple[str, ReplicaId], task: asyncio.Task[None]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        self._orphan_loads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: all waiters may have gone away

    async def _timed_load(self, order: LoadOrder) -> None:
        """:meth:`_load`, its duration and outcome told to :attr:`on_load_done` and logged
        (INFO; DEBUG for a refusal, which :meth:`_load` logs as a WARNING): the adapter, the
        replica, what it was for (the request ``order.request_id``, else ``order.by``: the
        poller) and its ``X-Request-Id`` (``order.load_id``). The lines of a load for a request
        carry its id (``core.log_fields``)."""
        rep, spec, request_id = order.rep, order.spec, order.request_id
        started = self._clock.now()
        result = "error"
        try:
            loaded = await self._load(order)
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
                order.by if request_id is None else f"request {request_id}", order.load_id or "-",
                _LOAD_RESULTS.get(result, result), took_s * 1000.0,
                extra=about_request(request_id),
            )  # fmt: skip

    async def _load(self, order: LoadOrder) -> bool:
        """Load ``order.spec`` on ``order.rep``; True if the replica loaded it (200), False if
        it had it registered already (from the configured path). ``order.load_id``: the call's
        ``X-Request-Id`` (an in-place reload after "already loaded": ``<load_id>-inplace``);
        ``order.request_id``: the request it is for, if any (its log lines carry it).
        ``order.inplace``: reload it in place even if the replica holds it from ``spec.path``
        (:meth:`reload_adapter`: the folder's weights changed)."""
        # Errors are already loragate errors: AdapterLoadError (the replica refused the
        # adapter), UpstreamConnectError or UpstreamTimeoutError (the replica is unreachable).
        rep, spec, load_id, request_id = order.rep, order.spec, order.load_id, order.request_id
        rid = rep.config.replica_id
        client = self._client(rep)
        old = rep.stale.get(spec.name)
        if old is None and order.inplace:
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
                order.refusal_outlook
                if order.refusal_outlook is not None
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

    async def _root_on(self, rep: ReplicaEntry, adapter: str) -> str | None:
        """The path ``rep``'s ``/v1/models`` card of ``adapter`` gives (None: not listed, no
        ``root``, or the list could not be read)."""
        try:
            models = await self._client(rep).list_models()
        except (LoragateError, ValueError):
            return None
        return next((c.root for c in models.cards if c.id == adapter and c.parent), None)

    def loading(self, replica_id: ReplicaId) -> frozenset[str]:
        """The adapters this gateway is loading on the replica now."""
        return frozenset(name for name, rid in self._loads if rid == replica_id)

    def adapter_loads(self) -> Mapping[ReplicaId, int]:
        """How many adapters this gateway loaded on each replica since the pool started: the
        replicas in the pool (config order), then those a reload removed, with their last
        count. A replica that a reload replaced counts on from where it was."""
        counts = self._load_counts
        loads = {rid: counts.get(rid, 0) for rid in self._replicas}
        loads.update((rid, n) for rid, n in counts.items() if rid not in loads)
        return loads

    def refusing(self, spec: AdapterSpec) -> Collection[ReplicaId]:
        """The replicas that refused to load ``spec`` within ``adapter_refusal_ttl_s`` (and
        did not list it since)."""
        return self.refusals.refusing(spec)

    def refused_adapters(self, replica_id: ReplicaId) -> Mapping[str, tuple[str, float]]:
        """The refusals of ``replica_id`` in force now: adapter -> (the replica's error,
        seconds until it is forgotten)."""
        return self.refusals.of_replica(replica_id)


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
