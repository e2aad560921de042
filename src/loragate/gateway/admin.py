"""The admin API: ``/admin/*``, behind a bearer token.

==========================  ==================================================================
``GET /admin/replicas``     every replica: health, engine metrics, in-flight counts (all
                            instances, and this one's), settings, shadow residency, the
                            adapters it refused to load lately (``refused_adapters``), and
                            how old its engine metrics are (``seconds_since_scrape``; null
                            until a poll of it succeeded)
``GET /admin/replicas/R``   one replica, as listed above (404 for an unknown id, param
                            ``id``): what a script polls while the replica drains
``POST /admin/replicas/R/drain``
                            drain replica R: no instance routes new requests there (within
                            one ``state.refresh_s`` for the others); requests under way,
                            streams included, and adapter loads under way finish; it is
                            still polled. 200 with the replica as above (``draining: true``,
                            ``in_flight``: every instance's requests there, ``in_flight_here``:
                            this one's); idempotent; kept in the state store (Redis: across
                            restarts); a reload keeps it, removing R from the config ends it
``DELETE /admin/replicas/R/drain``
                            end the drain: 200 with the replica (``draining: false``);
                            idempotent
``GET /admin/adapters``     every adapter: config-file ones and admin-registered ones, the
                            replicas that hold it (``registered_on``) and those that hold it
                            from another path (``stale_on``: replica -> that path); a
                            config-file adapter that another instance's config file defines
                            otherwise, and first, or that was registered through the admin
                            API before, is served as that one defines it, and shows
                            ``definition_conflict`` (``configured``, ``in_force``; its
                            ``instance`` is ``admin API`` for a registration; see
                            ``state.definitions``)
``POST /admin/adapters``    register ``{name, path, rank?, tenants?}``: 201 (the body says
                            where the rank came from: ``rank_source``, see
                            ``gateway.adapter_rank``); 400 naming the bad key, or a rank that
                            disagrees with the folder's ``adapter_config.json``, or a path
                            no healthy replica loads while at least one refuses it (it is
                            loaded on the first that takes it at once, as vLLM would load it
                            on first use, passing over replicas that refuse it or cannot be
                            reached; vLLM's reasons and the replicas not reached are in the
                            message, and the registration is taken back; if no replica could
                            be reached at all it stays, logged);
                            409 if the name is taken (in the shared store, whatever this
                            instance's view shows yet). A name is what vLLM takes as
                            ``lora_name`` (any non-empty string, ``org/name`` too) but for
                            what DELETE could not address: control characters, and ``.``
                            or ``..`` between slashes (400, param ``name``; config files
                            follow the same rule)
``DELETE /admin/adapters/N``  (N as registered, slashes included, or percent-encoded)
                            remove an admin-registered adapter and unload it from the
                            replicas that registered it: 200; 404 unknown; 409 if the config
                            file defines it (edit the file and reload instead), unless it is
                            also registered (it was, before a file defined it: the
                            registration is in force, and deleting it puts the file's
                            definition in force). It leaves a
                            tombstone: any instance's poller unloads the adapter from a
                            replica that lists it later (loaded back by a stale instance)
``POST /admin/reload``      re-read the config file (see ``gateway.reload``): 200; 400 with
                            the error naming the key (the old config stays in force); 500
                            (code ``reload_failed``) if it failed otherwise: logged with its
                            traceback, the running config stays in force
==========================  ==================================================================

The token comes from ``admin.token`` or ``LORAGATE_ADMIN_TOKEN``; without one every path
under ``/admin`` answers the same 404 (code ``not_found``) saying that the admin API is disabled
and how to enable it; with one, a wrong or missing ``Authorization: Bearer`` gets 401.
Errors use the OpenAI error shape. Adapter changes go to the shared state store (with a
version bump), so every gateway instance on the same Redis serves them within its refresh
interval. While the store is degraded (Redis unreachable) ``POST`` and ``DELETE
/admin/adapters`` and the drain writes answer 503 with code ``state_unavailable``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from loragate.core.config import adapter_name_problem
from loragate.core.errors import (
    AdapterLoadError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LoragateError,
    NotFoundError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from loragate.core.types import MAX_ADAPTER_RANK, AdapterSpec, ReplicaSnapshot
from loragate.gateway.adapter_rank import DEFAULT_RANK, RankError, settle_rank
from loragate.gateway.errors import error_payload, error_response
from loragate.gateway.reload import log_reload_failure, reload_from_file
from loragate.gateway.request_body import read_request_body

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway

log = logging.getLogger(__name__)

_ADAPTER_KEYS = ("name", "path", "rank", "tenants")
_NEVER_SCRAPED = ReplicaSnapshot(replica_id="", url="").scraped_at_s
_MAX_ADMIN_BODY = 64 * 1024
_DISABLED = error_payload(
    "the admin API is disabled: no admin token is set (set admin.token in the config file "
    "or the LORAGATE_ADMIN_TOKEN environment variable)",
    "invalid_request_error",
    "not_found",
)


def _disabled() -> web.Response:
    return web.Response(status=404, body=_DISABLED, content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json"
    )


def bearer_matches(request: web.Request, token: str) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>`` (compared in constant
    time). A header that is not UTF-8 (aiohttp hands it over with surrogates) does not match;
    it is not an error."""
    sent = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogatepass")
    return hmac.compare_digest(sent, f"Bearer {token}".encode())


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


class AdminApi:
    """Handlers of ``/admin/*`` for one gateway (bound methods are the aiohttp handlers)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/replicas", self._guard(self.replicas))
        # Replica ids may hold '/' (any header value): as written or percent-encoded.
        router.add_post("/admin/replicas/{id:.+}/drain", self._guard(self.drain))
        router.add_delete("/admin/replicas/{id:.+}/drain", self._guard(self.undrain))
        router.add_get("/admin/replicas/{id:.+}", self._guard(self.replica))
        router.add_get("/admin/adapters", self._guard(self.adapters))
        router.add_post("/admin/adapters", self._guard(self.add_adapter))
        # Any name vLLM takes, '/' included ('org/name'): as written or percent-encoded.
        router.add_delete("/admin/adapters/{name:.+}", self._guard(self.delete_adapter))
        router.add_post("/admin/reload", self._guard(self.reload))
        # Last: any other path under /admin, or a method an admin path does not take.
        router.add_route("*", "/admin{tail:(/.*)?}", self._other)

    async def _other(self, request: web.Request) -> web.StreamResponse:
        """Without a token: the same 404 as every admin route. With one: what any unknown
        path or method gets (404 ``no such endpoint``, 405 with ``Allow``)."""
        if self._gw.admin_token is None:
            return _disabled()
        from loragate.gateway.app import no_route  # the app imports this module

        return await no_route(request)

    def _guard(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = self._gw.admin_token
            if token is None:
                return _disabled()
            if not bearer_matches(request, token):
                return error_response(
                    AuthenticationError("admin API: missing or invalid admin token")
                )
            try:
                response: web.StreamResponse = await handler(request)
            except LoragateError as exc:
                return error_response(exc)
            return response

        return guarded

    # -- replicas ---------------------------------------------------------------------------

    async def replicas(self, _: web.Request) -> web.Response:
        gw = self._gw
        out = [self._replica_json(snap) for snap in gw.pool.snapshots()]
        return _json({"replicas": out, "policy": gw.policy.name, "state": gw.shared.status()})

    async def replica(self, request: web.Request) -> web.Response:
        return _json(self._replica_json(self._known(request.match_info["id"])))

    async def drain(self, request: web.Request) -> web.Response:
        return await self._drain(request.match_info["id"], on=True)

    async def undrain(self, request: web.Request) -> web.Response:
        return await self._drain(request.match_info["id"], on=False)

    async def _drain(self, rid: str, *, on: bool) -> web.Response:
        """Drain (``on``) or undrain a replica of this instance's config, in the state store
        (shared; refused while it is degraded, as the adapter writes are)."""
        gw = self._gw
        what = f"{'drain' if on else 'undrain'} replica {rid!r}"
        async with gw.lock:  # no reload removes the replica meanwhile
            self._known(rid)
            if gw.shared.degraded:
                return _state_unavailable(what, check="GET /admin/replicas")
            changed = await (gw.shared.drain(rid) if on else gw.shared.undrain(rid))
            if gw.shared.degraded:  # Redis went away during the write
                return _state_unavailable(what, during=True, check="GET /admin/replicas")
            if changed:
                log.info(
                    "admin: replica %s %s", rid,
                    "drained: no new requests are routed there (every instance)" if on
                    else "undrained: it gets requests again (every instance)",
                )  # fmt: skip
            return _json(self._replica_json(gw.pool.snapshot(rid)))

    def _known(self, rid: str) -> ReplicaSnapshot:
        pool = self._gw.pool
        if not pool.has_replica(rid):
            raise NotFoundError(
                f"replica {rid!r} does not exist (GET /admin/replicas lists them)", param="id"
            )
        return pool.snapshot(rid)

    def _replica_json(self, snap: ReplicaSnapshot) -> dict[str, Any]:
        gw = self._gw
        pool, shared = gw.pool, gw.shared
        rid = snap.replica_id
        res = shared.residency_of(rid)
        since = shared.drains().get(rid)
        draining = pool.is_draining(rid)
        now = pool.clock.now()
        return {
            "id": rid,
            "url": snap.url,
            "healthy": snap.healthy,
            "last_error": pool.last_error(rid) if pool.has_replica(rid) else None,
            "settings": {
                "max_loras": snap.settings.max_loras,
                "max_cpu_loras": snap.settings.max_cpu_loras,
                "max_lora_rank": snap.settings.max_lora_rank,
                "max_num_seqs": snap.settings.max_num_seqs,
                "max_num_batched_tokens": snap.settings.max_num_batched_tokens,
            },
            "num_running": snap.num_running,
            "num_waiting": snap.num_waiting,
            "num_deferred": snap.num_deferred,
            "kv_usage": snap.kv_usage,
            "active_adapters": sorted(snap.active_adapters),
            "draining": draining,
            "draining_for_s": round(max(0.0, time.time() - since), 1)
            if draining and since is not None
            else None,
            "in_flight": shared.in_flight_of(rid),
            "in_flight_here": gw.inflight.count(rid),
            "adapter_loads_here": pool.adapter_loads().get(rid, 0),
            "adapter_loads_under_way_here": sorted(pool.loading(rid)),
            "refused_adapters": {
                name: {"error": error, "expires_in_s": round(left_s, 1)}
                for name, (error, left_s) in sorted(pool.refused_adapters(rid).items())
            }
            if pool.has_replica(rid)
            else {},
            "residency": {
                "registered": sorted(res.registered),
                "gpu": list(res.gpu),
                "cpu": list(res.cpu),
            },
            "seconds_since_scrape": _seconds_since_scrape(now, snap),
        }

    # -- adapters ---------------------------------------------------------------------------

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
        return _json({"adapters": out})

    async def add_adapter(self, request: web.Request) -> web.Response:
        gw = self._gw
        payload = await _read_json(request, gw.config.limits.client_body_timeout_s)
        spec, given = parse_adapter(
            payload,
            base_model=gw.config.base_model,
            tenants={t.name for t in gw.config.tenants},
        )
        try:  # the folder's rank, if the gateway can read it (off the loop: it may be slow)
            settled = await asyncio.to_thread(settle_rank, spec.path, given, given_source="request")
        except RankError as exc:
            raise InvalidRequestError(str(exc), param="rank") from exc
        spec = dataclasses.replace(spec, rank=settled.rank)
        async with gw.lock:
            if gw.shared.degraded:
                return _state_unavailable(f"register adapter {spec.name!r}")
            if any(a.name == spec.name for a in gw.config.adapters):
                raise ConflictError(f"adapter {spec.name!r} already exists", param="name")
            # The store decides, not this instance's view (which may not show a registration
            # another instance made a moment ago): one of two racing registrations wins.
            added = await gw.shared.store.put_adapter(spec)
            if gw.shared.degraded:  # Redis went away during the write
                return _state_unavailable(f"register adapter {spec.name!r}", during=True)
            if not added:
                raise ConflictError(
                    f"adapter {spec.name!r} already exists (registered through the admin API, "
                    "or defined in the config file of a gateway instance on this state store)",
                    param="name",
                )
            gw.shared.check_adapters()  # this instance serves it at once
        gw.pool.refusals.forget(spec.name)  # registered anew: every replica may try it again
        try:
            await self._try_load(spec)
        except InvalidRequestError:  # no replica can load it: take the registration back
            async with gw.lock:
                await gw.shared.store.delete_adapter(spec.name)
                gw.shared.check_adapters()
            raise
        if settled.unread is None:
            log.info("admin: registered adapter %s (%s, rank %d from its adapter_config.json)",
                     spec.name, spec.path, spec.rank)  # fmt: skip
        elif settled.source == "request":
            log.info("admin: registered adapter %s (%s), rank %d as given (%s)",
                     spec.name, spec.path, spec.rank, settled.unread)  # fmt: skip
        else:  # routing's load-cost estimates may be off: say so louder
            log.warning(
                "admin: registered adapter %s (%s) with rank %d assumed: no rank was given "
                "and %s",
                spec.name, spec.path, spec.rank, settled.unread,
            )  # fmt: skip
        return _json({**adapter_json(spec), "rank_source": settled.source}, status=201)

    async def _try_load(self, spec: AdapterSpec) -> None:
        """Load ``spec`` (just registered) on the healthy replicas in turn until one has it, so
        that a path no replica can load is a 400 now, not a 502 for every request later.

        A replica that refuses it (vLLM's 4xx/5xx) and one that cannot be reached or does not
        answer within ``limits.admin_timeout_s`` are both passed over for the next one. If
        none loads it: at least one refusal is a 400 (param ``path``) naming every refusal
        (vLLM's reasons) and every replica that could not be asked, and the registration is
        taken back (the replicas that answered all refused; the others run the same vLLM and
        read the same folders); no refusal at all (every healthy replica unreachable, or none
        healthy) leaves the registration standing, logged: nothing says the path is bad. A
        replica that refuses while another loads it keeps its refusal, as after a routed
        request."""
        pool = self._gw.pool
        refused: list[str] = []
        unreachable: list[str] = []
        for snap in pool.healthy_snapshots():
            rid = snap.replica_id
            try:
                await pool.ensure_adapter(rid, spec)
            except AdapterLoadError as exc:
                refused.append(f"replica {rid}: {exc.message}")
                continue
            except LoragateError as exc:  # unreachable, timed out: not the adapter's fault
                log.warning("admin: adapter %s not tried on replica %s: %s", spec.name, rid, exc)
                unreachable.append(f"replica {rid} ({_why_not_tried(exc)})")
                continue
            if refused or unreachable:
                log.info(
                    "admin: adapter %s loaded on replica %s after %s",
                    spec.name, rid, "; ".join(refused + unreachable),
                )  # fmt: skip
            return
        if not refused:
            if unreachable:
                log.warning(
                    "admin: adapter %s registered untried: no healthy replica could be asked "
                    "(%s)",
                    spec.name, ", ".join(unreachable),
                )  # fmt: skip
            else:
                log.warning("admin: adapter %s registered untried: no healthy replica", spec.name)
            return
        pool.refusals.forget(spec.name)  # taken back: nothing to remember
        message = f"no replica could load adapter {spec.name!r} from {spec.path!r}: " + "; ".join(
            refused
        )
        if unreachable:
            message += "; not tried: " + ", ".join(unreachable)
        raise InvalidRequestError(message, param="path")

    async def delete_adapter(self, request: web.Request) -> web.Response:
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
                return _state_unavailable(f"delete adapter {name!r}")
            # Removes it and leaves its tombstone (see ``state.keys``) in one step: every
            # instance's poller unloads it from a replica that still lists it, e.g. loaded back
            # on demand by an instance that had not refreshed its view yet.
            existed = await gw.shared.store.delete_adapter(name)
            if gw.shared.degraded:
                return _state_unavailable(f"delete adapter {name!r}", during=True)
            if not existed:
                raise NotFoundError(f"adapter {name!r} does not exist", param="name")
            gw.shared.check_adapters()
        pool = gw.pool
        pool.refusals.forget(name)
        unloaded, errors = [], {}
        for rid in pool.replica_ids:
            if not (
                pool.is_registered(rid, name) or name in gw.shared.residency_of(rid).registered
            ):
                continue
            try:
                await pool.unload_adapter(rid, name)
                unloaded.append(rid)
            except LoragateError as exc:
                errors[rid] = exc.message
        log.info("admin: deleted adapter %s (unloaded from %s)", name, unloaded)
        return _json({"deleted": name, "unloaded_from": unloaded, "unload_errors": errors})

    # -- reload -----------------------------------------------------------------------------

    async def reload(self, _: web.Request) -> web.Response:
        """200 with what changed; a bad file is a 400 naming the key (``ConfigError``, through
        the guard); any other failure a 500 in the OpenAI error shape, logged with its
        traceback as a SIGHUP reload's is (``reload.log_reload_failure``): the running config
        stays in force and the gateway serves on."""
        try:
            result = await reload_from_file(self._gw)
        except ConfigError:
            raise
        except Exception as exc:
            log_reload_failure(self._gw, "POST /admin/reload")
            what = f"{type(exc).__name__}: {exc}"[:300]
            return web.Response(
                status=500,
                body=error_payload(
                    f"config reload failed ({what}); the running config stays in force, "
                    "the gateway's log has the details",
                    "server_error",
                    "reload_failed",
                ),
                content_type="application/json",
            )
        return _json(result.to_json())


def _seconds_since_scrape(now: float, snap: ReplicaSnapshot) -> float | None:
    """How old the replica's engine figures are; None if it was never scraped (its snapshot
    keeps ``ReplicaSnapshot``'s default time, 0.0, until a poll succeeds: ``now`` minus that
    would be the machine's uptime)."""
    if snap.scraped_at_s == _NEVER_SCRAPED:
        return None
    return round(now - snap.scraped_at_s, 3)


def _why_not_tried(exc: LoragateError) -> str:
    """Why a replica could not be asked to load an adapter, for a client: no URL (the log
    line has the whole error)."""
    if isinstance(exc, UpstreamTimeoutError):
        return "no answer within limits.admin_timeout_s"
    if isinstance(exc, UpstreamConnectError):
        return "unreachable"
    return "no usable answer"


def _state_unavailable(
    what: str, *, during: bool = False, check: str = "GET /admin/adapters"
) -> web.Response:
    """503 for an admin write while the shared state store (Redis) is unreachable: the
    registry is shared, and a write this instance made alone would be decided later against
    other instances' writes (a deletion could come back, a name be taken twice)."""
    if during:
        message = (
            f"cannot {what} now: the shared state store (Redis) became unreachable during the "
            "write, which is applied when it is reachable again unless it conflicts with "
            f"another instance's; check {check} then"
        )
    else:
        message = (
            f"cannot {what} now: the shared state store (Redis) is unreachable; "
            "retry when /health says ok"
        )
    log.warning("admin: %s", message)
    return web.Response(
        status=503,
        body=error_payload(message, "service_unavailable", "state_unavailable"),
        content_type="application/json",
    )


async def _read_json(request: web.Request, idle_timeout_s: float) -> object:
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
