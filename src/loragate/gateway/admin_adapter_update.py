"""``PUT /admin/adapters/N``: replace a registered adapter's definition (path, rank, tenants)
in place, e.g. with a retrained customer adapter, without a moment in which the name is
unknown (``DELETE`` then ``POST`` left a window of 404s).

1. The body is ``{path, rank?, tenants?}`` (``name`` may be given, equal to N: a ``PUT`` does
   not rename), checked as ``POST``'s (400 naming the key; the rank from the folder's
   ``adapter_config.json`` if readable; a rank above every replica's ``max_lora_rank`` is a 400,
   ``param: rank``). ``tenants`` left out keeps the definition in force's tenants
   (re-pointing a retrained adapter does not widen who may use it: before, it opened the
   adapter to every tenant); ``"tenants": null`` opens it to every tenant, as in a ``POST``;
   a list replaces them. The kept tenants are the store's, read with the definition the swap
   expects (another instance's change meanwhile is a 409). 404 (``param: name``) if N is not
   registered through the admin API; 409 if only the config file defines it (change it there
   and reload); 503 while the state store is unreachable.
2. The replicas that hold the adapter reload it in place from the new path (vLLM's
   ``load_inplace: true``; ``ReplicaPool.reload_adapter``, concurrently, each up to
   ``limits.admin_timeout_s``), also with the same path (the folder may have been rewritten);
   if no replica holds it, it is loaded on one as ``POST`` loads a new registration. The
   catalog and the state store keep the definition in force meanwhile, and the pool counts a
   replica holding either path as serving the name (``ReplicaPool.begin_replace``): requests
   arriving meanwhile are served at once by the weights the replica holds (the old ones until
   its reload is done), none waits for a reload nor fails because of it. The other instances
   on the state store, whose catalogs have the old definition until their refresh after the
   swap, do not reload back a replica holding the new path either: the store holds the new
   path while the ``PUT`` runs (``StateStore.begin_replacing``), and their pollers ask it
   (and the registry itself) before an in-place reload (``PoolListener.paths_in_force``).
3. Once a replica took the new definition, the state store swaps it atomically
   (``StateStore.replace_adapter`` with ``expected``: the version bump makes every instance
   on the same Redis serve it within its refresh interval; 409 if another instance replaced
   or deleted it meanwhile, whose change stands), and this instance's catalog at once; a
   replica that refused it is found stale and gets no requests for the name (``GET
   /admin/adapters`` ``stale_on``).
4. If no replica took it and at least one refused it (vLLM's reasons), nothing changed: the
   answer is a 400 (``param: path``) naming the refusals, and the definition in force stays.
   Replicas that could not be reached are not refusals (a ``PUT`` none could be asked about
   stands, as a registration does).
5. The write (from the existence check on) runs to its end even if the client goes away
   (``admin_common.run_to_the_end``: a client or ingress timeout cancels the handler, not
   the reloads nor the swap), logged. It runs after any other ``POST``/``PUT``/``DELETE`` of
   the name on this instance (``admin_name_locks``), one at a time.

200: the new definition (``name, path, rank, tenants``: the effective tenants, kept or
given; ``tenants_source`` ``kept`` or ``request``), ``rank_source``, ``previous`` (the
definition replaced), ``reloaded_on`` (replicas that hold the new definition now),
``refused_by`` (replica -> vLLM's reason), ``not_tried`` (replica -> why it was not asked) and
``persisted`` (plus ``warning`` with the embedded store), as ``POST``'s 201. The reloads carry
``X-Request-Id: <upstream id>-reload-<k>`` (the ``k``-th replica).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from aiohttp import web

from loragate.core.errors import (
    AdapterLoadError,
    ConflictError,
    InvalidRequestError,
    LoragateError,
    NotFoundError,
)
from loragate.core.types import AdapterSpec, ReplicaId
from loragate.gateway.adapter_rank import SettledRank
from loragate.gateway.admin_adapters import (
    AdapterAdmin,
    LoadAttempt,
    adapter_json,
    checked_spec,
    read_json,
    why_not_tried,
)
from loragate.gateway.admin_common import json_response, log, run_to_the_end, state_unavailable
from loragate.gateway.request_ids import REQUEST_ID, UPSTREAM_ID

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway


class AdapterUpdate:
    """The handler of ``PUT /admin/adapters/N`` for one gateway (behind the guard)."""

    def __init__(self, gateway: Gateway, adapters: AdapterAdmin) -> None:
        self._gw = gateway
        self._adapters = adapters  # its first load (no replica holds it) and persisted()

    async def replace_adapter(self, request: web.Request) -> web.Response:
        gw = self._gw
        name = request.match_info["name"]
        req_id = request[REQUEST_ID]
        payload = await read_json(request, gw.config.limits.client_body_timeout_s)
        if not isinstance(payload, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        if payload.get("name", name) != name:
            raise InvalidRequestError(
                f"'name' {payload['name']!r} is not the adapter's name {name!r} (a PUT does not "
                "rename: DELETE it and POST the new name)",
                param="name",
            )
        spec, settled = await checked_spec(gw, {**payload, "name": name}, "replaced")
        keep_tenants = "tenants" not in payload  # null is given: every tenant, as in a POST
        return await run_to_the_end(
            self._replace(spec, settled, request, keep_tenants=keep_tenants),
            keep=self._adapters.running,
            req_id=req_id,
            what=f"the replacement of adapter {name!r}",
        )

    async def _replace(
        self, spec: AdapterSpec, settled: SettledRank, request: web.Request, *, keep_tenants: bool
    ) -> web.Response:
        """The reloads, then the swap of the definition if a replica took it
        (``run_to_the_end``: done even if the client leaves), after any other write of the
        name on this instance (``AdapterAdmin.names``: a second ``PUT`` reads the definition
        the first left in force, and the pool's new path is one ``PUT``'s at a time)."""
        async with self._adapters.names.held(spec.name):
            return await self._replace_alone(spec, settled, request, keep_tenants=keep_tenants)

    async def _replace_alone(
        self, spec: AdapterSpec, settled: SettledRank, request: web.Request, *, keep_tenants: bool
    ) -> web.Response:
        gw = self._gw
        name = spec.name
        req_id = request[REQUEST_ID]
        what = f"replace adapter {name!r}"
        async with gw.lock:
            if gw.shared.degraded:
                return state_unavailable(request, what)
            if any(a.name == name for a in gw.config.adapters) and (
                name not in gw.shared.shared_adapters()
            ):
                raise ConflictError(
                    f"adapter {name!r} is defined in the config file: change it there and reload",
                    param="name",
                )
            current = await gw.shared.store.get_adapter(name)
            if gw.shared.degraded:
                return state_unavailable(request, what)
            if current is None:
                raise NotFoundError(
                    f"adapter {name!r} does not exist (POST /admin/adapters registers it)",
                    param="name",
                )
            if keep_tenants:  # the definition in force's (the one the swap expects)
                spec = dataclasses.replace(spec, tenants=current.tenants)
        pool = gw.pool
        pool.refusals.forget(name)  # a new definition: every replica may try it again
        # The catalog keeps the definition in force until a replica took the new one: the
        # replicas holding either path serve the name meanwhile (the old weights until their
        # reload is done), and a refused path changes nothing a request sees.
        pool.begin_replace(spec)
        # ... and so do the other instances on the state store, whose catalogs have the old
        # definition until their refresh after the swap: their polls do not reload back a
        # replica this PUT reloaded (bounded: the reloads run concurrently, a first load tries
        # the replicas one after the other).
        store = gw.shared.store
        bound_s = gw.config.limits.admin_timeout_s * (len(pool.replica_ids) + 1)
        swapped = False
        try:
            await store.begin_replacing(name, spec.path, bound_s)
            try:
                attempt = await self._reload(spec, current, request)
            except InvalidRequestError as exc:  # no replica took it, some refused
                log.warning(
                    "admin: request %s: adapter %s: no replica took its new definition (%s): "
                    "the one in force (%s) stays",
                    req_id, name, spec.path, current.path,
                )  # fmt: skip
                raise InvalidRequestError(
                    f"{exc.message}; adapter {name!r} stays as it was (path {current.path!r})",
                    param="path",
                ) from exc
            async with gw.lock:
                # The store swaps it atomically (with the version bump: every instance on the
                # same Redis serves the new one within its refresh interval), unless another
                # instance replaced or deleted it meanwhile (theirs stands).
                previous = await gw.shared.store.replace_adapter(spec, expected=current)
                if gw.shared.degraded:
                    return state_unavailable(request, what, during=True)
                if previous is None:
                    raise ConflictError(
                        f"adapter {name!r} was replaced or deleted meanwhile (another "
                        f"instance): that stands, and the replicas that reloaded it from "
                        f"{spec.path!r} are brought back to it",
                        param="name",
                    )
                gw.shared.check_adapters()  # this instance's catalog at once
                swapped = True
        finally:
            # The hint first: the pool's checks before reloading back ask the store.
            await store.end_replacing(name)
            pool.end_replace(name)  # replicas holding a path not in force are reloaded
            if not swapped:
                pool.refusals.forget(name)  # refusals of a definition not in force
        tenants_source = "kept" if keep_tenants else "request"
        log.info(
            "admin: request %s: replaced adapter %s: %s, rank %d, tenants %s (%s) (was %s, "
            "rank %d, tenants %s); reloaded on %s",
            req_id, name, spec.path, spec.rank, _tenants(spec), tenants_source, previous.path,
            previous.rank, _tenants(previous), attempt.reloaded_on or "no replica",
        )  # fmt: skip
        return json_response(
            {
                **adapter_json(spec),
                "tenants_source": tenants_source,
                "rank_source": settled.source,
                "previous": adapter_json(previous),
                "reloaded_on": attempt.reloaded_on,
                "refused_by": attempt.refused_by,
                "not_tried": attempt.not_tried,
                **self._adapters.persisted(req_id, name),
            }
        )

    async def _reload(
        self, spec: AdapterSpec, previous: AdapterSpec, request: web.Request
    ) -> Reloads:
        """Reload ``spec`` in place on every replica that holds the adapter (concurrently), or
        load it on one if none does (``AdapterAdmin.try_load``). Raises
        ``InvalidRequestError`` (param ``path``) if none took it and at least one refused."""
        gw = self._gw
        pool = gw.pool
        holders = [rid for rid in pool.replica_ids if pool.holds_adapter(rid, spec.name)]
        if not holders:
            first: LoadAttempt = await self._adapters.try_load(spec, request, previous=previous)
            return Reloads(
                reloaded_on=[] if first.loaded_on is None else [first.loaded_on],
                refused_by=first.refused_by,
                not_tried=first.not_tried,
            )
        req_id, upstream_id = request[REQUEST_ID], request[UPSTREAM_ID]
        outcomes = await asyncio.gather(
            *(
                self._reload_one(rid, spec, req_id, f"{upstream_id}-reload-{k}")
                for k, rid in enumerate(holders, 1)
            )
        )
        out = Reloads(reloaded_on=[], refused_by={}, not_tried={})
        for rid, (kind, why) in zip(holders, outcomes, strict=True):
            if kind == "ok":
                out.reloaded_on.append(rid)
            elif kind == "refused":
                out.refused_by[rid] = why
            else:
                out.not_tried[rid] = why
        if not out.reloaded_on and out.refused_by:
            message = f"no replica could reload adapter {spec.name!r} from {spec.path!r}: " + (
                "; ".join(f"replica {rid}: {why}" for rid, why in out.refused_by.items())
            )
            if out.not_tried:
                message += "; not tried: " + ", ".join(
                    f"replica {rid} ({why})" for rid, why in out.not_tried.items()
                )
            raise InvalidRequestError(message, param="path")
        return out

    async def _reload_one(
        self, rid: ReplicaId, spec: AdapterSpec, req_id: str, load_id: str
    ) -> tuple[str, str]:
        """("ok", ""), ("refused", vLLM's reason) or ("not_tried", why)."""
        try:
            await self._gw.pool.reload_adapter(rid, spec, request_id=req_id, load_id=load_id)
        except AdapterLoadError as exc:
            return "refused", exc.message
        except LoragateError as exc:
            log.warning(
                "admin: request %s: adapter %s not reloaded on replica %s: %s",
                req_id, spec.name, rid, exc,
            )  # fmt: skip
            return "not_tried", why_not_tried(exc)
        return "ok", ""


def _tenants(spec: AdapterSpec) -> str:
    """An adapter's tenants for a log line."""
    if spec.tenants is None:
        return "every tenant"
    return ", ".join(sorted(spec.tenants)) or "no tenant"


class Reloads:
    """What a ``PUT``'s reloads did (the 200's body)."""

    __slots__ = ("not_tried", "refused_by", "reloaded_on")

    def __init__(
        self, *, reloaded_on: list[str], refused_by: dict[str, str], not_tried: dict[str, str]
    ) -> None:
        self.reloaded_on = reloaded_on
        self.refused_by = refused_by
        self.not_tried = not_tried
