"""The admin API's adapter endpoints: ``GET``/``POST /admin/adapters`` and ``DELETE
/admin/adapters/N`` (what they answer: ``gateway.admin``), and the checks of a registration's
body.

A registration whose rank is above the ``max_lora_rank`` of every replica (each one said in
its config's ``settings.max_lora_rank``) is refused, 400 ``param: rank`` naming the numbers,
with nothing registered and no load tried: no replica could ever load it, and every request
for it would be a 400. (Refused, not warned about: the registration's point is an adapter the
gateway can serve, which is why it tries a load at once.) The load it tries passes over the
replicas whose known ``max_lora_rank`` is below the rank (``not_tried`` says why).

Where it tries that load first (``gateway.load_placement``): not the first healthy replica in
config order every time (vLLM 0.32 activates what it loads, so each registration there
evicted that replica's hot adapters), but the one where it evicts least, with the fewest
loads under way, the routing policy's choice for the adapter when the policy has one, then
the fewest requests in flight and the most free slots, a burst taking turns over replicas
that would all evict alike. A replica that refuses, cannot be reached or does not answer in
time is passed over for the next one in that order.

The load is always sent to the replica (``ReplicaPool.ensure_adapter(ask=True)``), even where
this instance's view (its last poll) says the replica holds the name already: another
instance's ``DELETE`` may have unloaded it there a moment ago. vLLM's "already loaded" answer
is a success (from another path: reloaded in place), so ``loaded_on`` names a replica whose
``/v1/models`` lists the adapter. A registration also drops what this instance's polls said of
the name (``ReplicaPool.forget_everywhere``: it was deleted, or never registered), so the
placement and the next requests do not count on a replica holding it from before.

Request ids (``gateway.request_ids``): the log lines name the request's id; the load a
registration asks of the ``k``-th replica in turn carries ``X-Request-Id: <upstream id>-load-<k>``
and a deletion's unload from the ``k``-th replica ``<upstream id>-unload-<k>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from loragate.backends.pool_types import ReplicaServesNoAdaptersError
from loragate.core.config import adapter_name_problem, adapter_path_problem
from loragate.core.errors import (
    AdapterLoadError,
    ConflictError,
    InvalidRequestError,
    LoragateError,
    NotFoundError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from loragate.core.types import MAX_ADAPTER_RANK, AdapterSpec
from loragate.gateway.adapter_rank import (
    DEFAULT_RANK,
    RankError,
    SettledRank,
    rank_problem,
    settle_rank,
)
from loragate.gateway.admin_common import json_response, log, run_to_the_end, state_unavailable
from loragate.gateway.admin_name_locks import NameLocks
from loragate.gateway.load_placement import LoadPlacer, ReplicaView
from loragate.gateway.request_body import read_request_body
from loragate.gateway.request_ids import REQUEST_ID, UPSTREAM_ID
from loragate.gateway.unknown_adapters import unknown_json
from loragate.routing.rank_limit import within_rank_limit

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway

_ADAPTER_KEYS = ("name", "path", "rank", "tenants")
# How a registration's rank was settled (``SettledRank.source``), for its messages.
_RANK_SOURCES = {
    "adapter_config": "from its adapter_config.json",
    "request": "as given",
    "default": f"assumed: {DEFAULT_RANK} when none is given and the folder cannot be read",
}
_MAX_ADMIN_BODY = 64 * 1024
EMBEDDED_WARNING = (
    "registered in the embedded state store (state.backend: memory): kept in this gateway "
    "process only, lost when it restarts (the replicas keep the adapter, requests for it then "
    "get a 404); add it to the config file or use state.backend: redis to keep it"
)


def adapter_json(spec: AdapterSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "path": spec.path,
        "rank": spec.rank,
        "tenants": None if spec.tenants is None else sorted(spec.tenants),
    }


def parse_adapter(
    payload: object, *, base_model: str, tenants: set[str]
) -> tuple[AdapterSpec, int | None]:
    """Validate a ``POST /admin/adapters`` body; errors name the key (``param``). Returns the
    adapter (with the given rank, else 8) and the rank given (None: none)."""
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    for key in payload:
        if key not in _ADAPTER_KEYS:
            raise InvalidRequestError(
                f"unknown key {key!r} (allowed: {', '.join(_ADAPTER_KEYS)})", param=str(key)
            )
    for key in ("name", "path"):
        value = payload.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"'{key}' must be a non-empty string", param=key)
    name = payload["name"]
    if (problem := adapter_name_problem(name)) is not None:  # as a config file's names
        raise InvalidRequestError(problem, param="name")
    if name == base_model:
        raise InvalidRequestError("an adapter cannot be named like the base model", param="name")
    if (problem := adapter_path_problem(payload["path"])) is not None:  # as a config file's
        raise InvalidRequestError(problem, param="path")
    given = payload.get("rank")
    rank = DEFAULT_RANK if given is None else given
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_ADAPTER_RANK:
        # Routing's load-cost estimates compute with it in floats: keep it sane.
        raise InvalidRequestError(
            f"'rank' must be an integer from 1 to {MAX_ADAPTER_RANK}", param="rank"
        )
    allowed: frozenset[str] | None = None
    raw_tenants = payload.get("tenants")
    if raw_tenants is not None:
        if not isinstance(raw_tenants, list):
            raise InvalidRequestError("'tenants' must be a list of tenant names", param="tenants")
        for i, tenant in enumerate(raw_tenants):
            if not isinstance(tenant, str) or tenant not in tenants:
                raise InvalidRequestError(f"unknown tenant {tenant!r}", param=f"tenants[{i}]")
        allowed = frozenset(raw_tenants)
    spec = AdapterSpec(name=name, path=payload["path"], rank=rank, tenants=allowed)
    return spec, None if given is None else rank


class AdapterAdmin:
    """Handlers of ``/admin/adapters*`` for one gateway (bound methods, behind the guard)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._placer = LoadPlacer()  # where a registration's load is tried first
        self._said_embedded = False  # the embedded store's warning was logged
        # The admin writes under way (POST's, PUT's, DELETE's: ``run_to_the_end``), held till
        # they end.
        self.running: set[asyncio.Task[Any]] = gateway.admin_writes
        # One write of a name at a time on this instance (POST, PUT, DELETE: each whole).
        self.names: NameLocks = gateway.admin_names

    async def adapters(self, _: web.Request) -> web.Response:
        gw = self._gw
        configured = {a.name for a in gw.config.adapters}
        registered = gw.pool.registered_adapters()
        stale = gw.pool.stale_adapters()
        conflicts = gw.shared.definition_conflicts()
        out = []
        for name, spec in sorted(gw.catalog.adapters.items()):
            item = adapter_json(spec)
            item["source"] = "config" if name in configured else "admin"
            item["registered_on"] = sorted(r for r, names in registered.items() if name in names)
            # Replicas holding it from another path (being reloaded in place, or refusing to).
            item["stale_on"] = {r: held[name] for r, held in sorted(stale.items()) if name in held}
            if name in conflicts:  # another instance's config file defined it first
                ours, in_force = conflicts[name]
                item["definition_conflict"] = {
                    "configured": {"path": ours.path, "rank": ours.rank},
                    "in_force": {
                        "path": in_force.path,
                        "rank": in_force.rank,
                        "instance": in_force.instance,
                    },
                }
            out.append(item)
        # Held registered by replicas, unknown here (gateway.unknown_adapters): not served.
        unknown = unknown_json(gw.pool.unknown_adapters())
        return json_response({"adapters": out, "unknown_registered": unknown})

    async def add_adapter(self, request: web.Request) -> web.Response:
        gw = self._gw
        req_id = request[REQUEST_ID]
        payload = await read_json(request, gw.config.limits.client_body_timeout_s)
        spec, settled = await checked_spec(gw, payload, "registered")
        return await run_to_the_end(
            self._register(spec, settled, request),
            keep=self.running,
            req_id=req_id,
            what=f"the registration of adapter {spec.name!r}",
        )

    async def _register(
        self, spec: AdapterSpec, settled: SettledRank, request: web.Request
    ) -> web.Response:
        """``POST``'s store write, its load and, if every replica asked refused, its taking
        back (``run_to_the_end``: done even if the client leaves), after any other write of
        the name on this instance (``names``)."""
        async with self.names.held(spec.name):
            return await self._register_alone(spec, settled, request)

    async def _register_alone(
        self, spec: AdapterSpec, settled: SettledRank, request: web.Request
    ) -> web.Response:
        gw = self._gw
        req_id = request[REQUEST_ID]
        async with gw.lock:
            if gw.shared.degraded:
                return state_unavailable(request, f"register adapter {spec.name!r}")
            if any(a.name == spec.name for a in gw.config.adapters):
                raise ConflictError(f"adapter {spec.name!r} already exists", param="name")
            # The store decides, not this instance's view (which may not show a registration
            # another instance made a moment ago): one of two racing registrations wins.
            added = await gw.shared.store.put_adapter(spec)
            if gw.shared.degraded:  # Redis went away during the write
                return state_unavailable(request, f"register adapter {spec.name!r}", during=True)
            if not added:
                raise ConflictError(
                    f"adapter {spec.name!r} already exists (registered through the admin API, "
                    "or defined in the config file of a gateway instance on this state store)",
                    param="name",
                )
            gw.shared.check_adapters()  # this instance serves it at once
        gw.pool.refusals.forget(spec.name)  # registered anew: every replica may try it again
        # ... and what this instance's polls said of the name predates it: a DELETE (maybe on
        # another instance, a moment ago) may have unloaded it where the last poll listed it.
        gw.pool.forget_everywhere(spec.name)
        try:
            load = await self.try_load(spec, request)
        except InvalidRequestError:  # no replica can load it: take the registration back
            async with gw.lock:
                await gw.shared.store.delete_adapter(spec.name)
                gw.shared.check_adapters()
            raise
        if settled.unread is None:
            log.info("admin: request %s: registered adapter %s (%s, rank %d from its "
                     "adapter_config.json)", req_id, spec.name, spec.path, spec.rank)  # fmt: skip
        elif settled.source == "request":
            log.info("admin: request %s: registered adapter %s (%s), rank %d as given (%s)",
                     req_id, spec.name, spec.path, spec.rank, settled.unread)  # fmt: skip
        else:  # routing's load-cost estimates may be off: say so louder
            log.warning(
                "admin: request %s: registered adapter %s (%s) with rank %d assumed: no rank "
                "was given and %s",
                req_id, spec.name, spec.path, spec.rank, settled.unread,
            )  # fmt: skip
        return json_response(
            {
                **adapter_json(spec),
                "rank_source": settled.source,
                **load.to_json(),
                **self.persisted(req_id, spec.name),
            },
            status=201,
        )

    def persisted(self, req_id: str, name: str) -> dict[str, str]:
        """Where a registration lives, for its 201: ``persisted`` ``redis`` (the shared store:
        every instance, across restarts) or ``memory`` (the embedded store: this process only),
        then with a ``warning`` saying what that means; the first such registration of the
        process is also logged (WARNING) once."""
        if not self._gw.shared.embedded:
            return {"persisted": "redis"}
        if not self._said_embedded:
            self._said_embedded = True
            log.warning(
                "admin: request %s: adapter %s %s (said once)", req_id, name, EMBEDDED_WARNING
            )
        return {"persisted": "memory", "warning": EMBEDDED_WARNING}

    async def try_load(
        self, spec: AdapterSpec, request: web.Request, *, previous: AdapterSpec | None = None
    ) -> LoadAttempt:
        """Load ``spec`` (just registered) on the healthy replicas in turn until one has it, so
        that a path no replica can load is a 400 now, not a 502 for every request later. The
        turn is ``gateway.load_placement``'s order: least harm and most use first.

        A replica that refuses it (vLLM's 4xx/5xx) and one that cannot be reached or does not
        answer within ``limits.admin_timeout_s`` are both passed over for the next one, and
        one whose known ``max_lora_rank`` is below the rank is not asked (it would refuse). If
        none loads it: at least one refusal is a 400 (param ``path``) naming every refusal
        (vLLM's reasons) and every replica that could not be asked, and the registration is
        taken back (the replicas that answered all refused; the others run the same vLLM and
        read the same folders); no refusal at all (every healthy replica unreachable, or none
        healthy) leaves the registration standing, logged: nothing says the path is bad. A
        replica that refuses while another loads it keeps its refusal, as after a routed
        request. Returns what happened, for the 201's body. ``request``: the registration's
        (its id in the log lines and, ``-load-<k>`` appended, in each load's
        ``X-Request-Id``). ``previous``: the definition in force that a ``PUT`` is replacing
        (it stays if this raises; the log lines say so)."""
        gw = self._gw
        req_id, upstream_id = request[REQUEST_ID], request[UPSTREAM_ID]
        pool = gw.pool
        attempt = LoadAttempt()
        refused: list[str] = []
        passed_over: list[str] = []  # not asked: below the rank, unreachable, timed out
        skipped: list[str] = []  # of those, the ones tried in turn
        eligible = []
        for snap in pool.healthy_snapshots():
            rid = snap.replica_id
            if not within_rank_limit(snap.settings, spec.rank):  # it would refuse: not asked
                why = f"its max_lora_rank {snap.settings.max_lora_rank} is below rank {spec.rank}"
                passed_over.append(f"replica {rid} ({why})")
                attempt.not_tried[rid] = why
            elif not pool.takes_adapter(rid, spec.name):  # no --enable-lora, no runtime loads
                why = "it serves no adapters (GET /admin/replicas lora_off says why)"
                passed_over.append(f"replica {rid} ({why})")
                attempt.not_tried[rid] = why
            else:
                eligible.append(snap)
        view = ReplicaView(
            in_flight_of=gw.shared.in_flight_of,
            residency_of=gw.shared.residency_of,
            adapter_counts=gw.inflight.adapter_counts,
            loading=pool.loading,
            is_registered=pool.is_registered,
            now_s=gw.clock.now(),
        )
        order = self._placer.order(spec, eligible, view, gw.config.routing, req_id)
        if order:
            log.debug(
                "admin: request %s: adapter %s: load tried on %s in turn; %s first (%s)",
                req_id, spec.name, ", ".join(c.replica_id for c in order), order[0].replica_id,
                order[0].why(),
            )  # fmt: skip
        for k, cand in enumerate(order, 1):
            rid = cand.replica_id
            # What a refusal here means, for the pool's log line of it: not what it means for
            # routed requests (the registration is taken back if no replica loads it).
            if k < len(order):
                outlook = f" (tried next on replica {order[k].replica_id})"
            elif previous is not None:
                outlook = (
                    f" (no replica loaded it: the definition in force, from {previous.path}, "
                    f"stays, and request {req_id} gets a 400 naming the refusals)"
                )
            else:
                outlook = (
                    f" (no replica loaded it: the registration is taken back, request {req_id} "
                    f"gets a 400 naming the refusals, and requests for {spec.name} get a 404: the "
                    "model does not exist)"
                )
            try:
                await pool.ensure_adapter(
                    rid,
                    spec,
                    request_id=req_id,
                    load_id=f"{upstream_id}-load-{k}",
                    refusal_outlook=outlook,
                    ask=True,  # the 201's loaded_on is the replica's word, not our view's
                )
            except ReplicaServesNoAdaptersError as exc:  # the replica's doing, not the path's
                why = f"it serves no adapters: {exc.message}"
                log.warning("admin: adapter %s not loaded on replica %s: %s", spec.name, rid, why)
                passed_over.append(f"replica {rid} ({why})")
                skipped.append(passed_over[-1])
                attempt.not_tried[rid] = why
                continue
            except AdapterLoadError as exc:
                refused.append(f"replica {rid}: {exc.message}")
                attempt.refused_by[rid] = exc.message
                continue
            except LoragateError as exc:  # unreachable, timed out: not the adapter's fault
                log.warning(
                    "admin: request %s: adapter %s not tried on replica %s: %s",
                    req_id, spec.name, rid, exc,
                )  # fmt: skip
                passed_over.append(f"replica {rid} ({why_not_tried(exc)})")
                skipped.append(passed_over[-1])
                attempt.not_tried[rid] = why_not_tried(exc)
                continue
            if refused or skipped:  # (not the ones below the rank: never in the order)
                log.info(
                    "admin: request %s: adapter %s loaded on replica %s after %s",
                    req_id, spec.name, rid, "; ".join(refused + skipped),
                )  # fmt: skip
            self._placer.took(rid)
            attempt.loaded_on = rid
            return attempt
        if not refused:
            if passed_over:
                log.warning(
                    "admin: request %s: adapter %s registered untried: no healthy replica "
                    "could be asked (%s)",
                    req_id, spec.name, ", ".join(passed_over),
                )  # fmt: skip
            else:
                log.warning(
                    "admin: request %s: adapter %s registered untried: no healthy replica",
                    req_id, spec.name,
                )  # fmt: skip
            return attempt
        pool.refusals.forget(spec.name)  # taken back: nothing to remember
        message = f"no replica could load adapter {spec.name!r} from {spec.path!r}: " + "; ".join(
            refused
        )
        if passed_over:
            message += "; not tried: " + ", ".join(passed_over)
        if previous is None:
            log.warning(
                "admin: request %s: adapter %s not registered (taken back: requests for it "
                "get a 404: the model does not exist): %s",
                req_id, spec.name, message,
            )  # fmt: skip
        raise InvalidRequestError(message, param="path")

    async def delete_adapter(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await run_to_the_end(
            self._delete_held(name, request),
            keep=self.running,
            req_id=request[REQUEST_ID],
            what=f"the deletion of adapter {name!r}",
        )

    async def _delete_held(self, name: str, request: web.Request) -> web.Response:
        """``DELETE``'s store write and its unloads (``run_to_the_end``: done even if the
        client leaves, so a client timeout does not stop the unloads halfway), after any other
        write of the name on this instance (``names``)."""
        async with self.names.held(name):
            return await self._delete(request)

    async def _delete(self, request: web.Request) -> web.Response:
        gw = self._gw
        name = request.match_info["name"]
        async with gw.lock:
            # A name the file defines is deleted only as an admin registration that holds it
            # (registered before the file defined it: in force, see ``state.definitions``).
            if any(a.name == name for a in gw.config.adapters) and (
                name not in gw.shared.shared_adapters()
            ):
                raise ConflictError(
                    f"adapter {name!r} is defined in the config file: remove it there and reload",
                    param="name",
                )
            if gw.shared.degraded:
                return state_unavailable(request, f"delete adapter {name!r}")
            # Removes it and leaves its tombstone (see ``state.keys``) in one step: every
            # instance's poller unloads it from a replica that still lists it, e.g. loaded back
            # on demand by an instance that had not refreshed its view yet.
            existed = await gw.shared.store.delete_adapter(name)
            if gw.shared.degraded:
                return state_unavailable(request, f"delete adapter {name!r}", during=True)
            if not existed:
                raise NotFoundError(f"adapter {name!r} does not exist", param="name")
            gw.shared.check_adapters()
        pool = gw.pool
        pool.refusals.forget(name)
        unloaded, errors = [], {}
        upstream_id = request[UPSTREAM_ID]
        # Where it sits, decided before the first unload: this instance's poller may unload
        # it from one of them meanwhile (it lists the name the deletion just retired), which
        # would drop it from the view before the loop reaches it, and the answer would lack it.
        holding = [
            rid
            for rid in pool.replica_ids
            if pool.is_registered(rid, name) or name in gw.shared.residency_of(rid).registered
        ]
        for k, rid in enumerate(holding, 1):
            try:
                await pool.unload_adapter(rid, name, request_id=f"{upstream_id}-unload-{k}")
                unloaded.append(rid)
            except LoragateError as exc:
                errors[rid] = exc.message
        log.info(
            "admin: request %s: deleted adapter %s (unloaded from %s; X-Request-Id "
            "%s-unload-<k> for the k-th replica asked)",
            request[REQUEST_ID], name, unloaded, upstream_id,
        )  # fmt: skip
        return json_response({"deleted": name, "unloaded_from": unloaded, "unload_errors": errors})


@dataclasses.dataclass(slots=True)
class LoadAttempt:
    """What the load a registration tries did (``AdapterAdmin.try_load``), as the 201 tells
    it: ``loaded_on`` the replica that loaded it (None: none did, the registration stands
    untried), ``refused_by`` replica -> vLLM's reason, ``not_tried`` replica -> why it could
    not be asked (no healthy replica at all: both empty)."""

    loaded_on: str | None = None
    refused_by: dict[str, str] = dataclasses.field(default_factory=dict)
    not_tried: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "loaded_on": [] if self.loaded_on is None else [self.loaded_on],
            "untried": self.loaded_on is None,
            "refused_by": self.refused_by,
            "not_tried": self.not_tried,
        }


def why_not_tried(exc: LoragateError) -> str:
    """Why a replica could not be asked to load an adapter, for a client: no URL (the log
    line has the whole error)."""
    if isinstance(exc, UpstreamTimeoutError):
        return "no answer within limits.admin_timeout_s"
    if isinstance(exc, UpstreamConnectError):
        return "unreachable"
    return "no usable answer"


async def checked_spec(gw: Gateway, payload: object, what: str) -> tuple[AdapterSpec, SettledRank]:
    """A ``POST``/``PUT /admin/adapters`` body checked (``parse_adapter``), its rank settled
    from the folder's ``adapter_config.json`` if readable (off the loop: it may be slow), and
    refused if every replica's ``max_lora_rank`` is below it (400, param ``rank``; ``what``:
    ``registered`` or ``replaced``, for that message)."""
    spec, given = parse_adapter(
        payload,
        base_model=gw.config.base_model,
        tenants={t.name for t in gw.config.tenants},
    )
    try:
        settled = await asyncio.to_thread(settle_rank, spec.path, given, given_source="request")
    except RankError as exc:
        raise InvalidRequestError(str(exc), param="rank") from exc
    spec = dataclasses.replace(spec, rank=settled.rank)
    if (problem := rank_problem(spec.rank, gw.config.replicas)) is not None:
        raise InvalidRequestError(
            f"adapter {spec.name!r} not {what}: its {problem} (the rank "
            f"{_RANK_SOURCES.get(settled.source, settled.source)}); no replica could load it",
            param="rank",
        )
    return spec, settled


async def read_json(request: web.Request, idle_timeout_s: float) -> object:
    body = await read_request_body(
        request, max_bytes=_MAX_ADMIN_BODY, idle_timeout_s=idle_timeout_s
    )
    if not body:  # said as the proxy says it, not as a JSON parse error at char 0
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequestError("the request body's JSON is nested too deeply") from exc
