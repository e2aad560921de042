"""The admin API: ``/admin/*``, behind a bearer token.

==========================  ==================================================================
``GET /admin/replicas``     every replica: health, engine metrics, in-flight counts (all
                            instances, and this one's), settings, shadow residency, the
                            adapters it refused to load lately (``refused_adapters``), and
                            how old its engine metrics are (``seconds_since_scrape``; null
                            until a poll of it succeeded), and the adapters it holds registered
                            that this gateway does not serve (``unknown_registered``, see
                            below)
``GET /admin/replicas/R``   one replica, as listed above (404 for an unknown id, param
                            ``id``): what a script polls while the replica drains. A replica
                            this instance's config lacks but the shared state knows (another
                            instance's config, or drained) is answered from the shared state:
                            ``configured_here: false``, ``url``, ``draining``,
                            ``draining_for_s``, ``in_flight``, ``in_flight_here``; the list
                            shows the drained ones under ``drained_not_configured``
``POST /admin/replicas/R/drain``
                            drain replica R: no instance routes new requests there (within
                            one ``state.refresh_s`` for the others); requests under way,
                            streams included, and adapter loads under way finish; it is
                            still polled. 200 with the replica as above (``draining: true``,
                            ``in_flight``: every instance's requests there, ``in_flight_here``:
                            this one's); idempotent; kept in the state store (Redis: across
                            restarts); a reload keeps it, removing R from the config too
                            (other instances may still route there), and R added back under
                            its id is drained still
``DELETE /admin/replicas/R/drain``
                            end the drain: 200 with the replica (``draining: false``);
                            idempotent; also for an R no longer in this config
                            (any other method on a drain path: 405, ``Allow: DELETE,POST``, unless a
                            replica's id is ``R/drain``)
``GET /admin/adapters``     every adapter: config-file ones and admin-registered ones, the
                            replicas that hold it (``registered_on``) and those that hold it
                            from another path (``stale_on``: replica -> that path); a
                            config-file adapter that another instance's config file defines
                            otherwise, and first, or that was registered through the admin
                            API before, is served as that one defines it, and shows
                            ``definition_conflict`` (``configured``, ``in_force``; its
                            ``instance`` is ``admin API`` for a registration; see
                            ``state.definitions``). ``unknown_registered``: the adapters
                            replicas hold registered that this gateway does not serve
                            (``name``, ``registered_on``, ``paths``: replica -> the path it
                            holds it from), e.g. registered in the embedded store before a
                            restart; not adopted (``gateway.unknown_adapters``)
``POST /admin/adapters``    register ``{name, path, rank?, tenants?}``: 201 (the body says
                            where the rank came from: ``rank_source``, see
                            ``gateway.adapter_rank``; and where it was loaded: ``loaded_on``
                            (a list: empty if none was asked), ``untried`` (true then),
                            ``refused_by`` (replica -> vLLM's reason) and ``not_tried``
                            (replica -> why it was not asked); and where the registration
                            lives: ``persisted`` ``redis`` (shared, kept across restarts) or
                            ``memory`` (the embedded store: this process only, lost when it
                            restarts; then a ``warning`` says so, and the first such
                            registration is logged, WARNING)); 400 naming the bad key, or
                            a rank that disagrees with the folder's ``adapter_config.json``,
                            or a path
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
``PUT /admin/adapters/N``   replace an admin-registered adapter's definition in place
                            (``{path, rank?, tenants?}``, checked as ``POST``'s; ``tenants``
                            left out keeps the current ones, ``null`` opens it to every
                            tenant as in a ``POST``; the name is
                            served throughout, no window of 404s): the replicas holding it
                            reload it in place (vLLM's ``load_inplace``, as for a config-file
                            adapter whose path changed; requests running there finish), or
                            one loads it if none holds it. 200 with the definition (its
                            effective ``tenants``; ``tenants_source`` ``kept`` or
                            ``request``), ``rank_source``, ``previous``, ``reloaded_on``,
                            ``refused_by``, ``not_tried``, ``persisted``; 404 unknown (param
                            ``name``); 409
                            if only the config file defines it; 400 naming the bad key, or a
                            path every replica asked refused (the previous definition is put
                            back, still served); shared through the state store as ``POST``
                            (see ``gateway.admin_adapter_update``)
``POST /admin/reload``      re-read the config file (see ``gateway.reload``): 200; 400 with
                            the error naming the key (the old config stays in force); 500
                            (code ``reload_failed``) if it failed otherwise: logged with its
                            traceback, the running config stays in force
==========================  ==================================================================

The token is ``LORAGATE_ADMIN_TOKEN`` if set, else ``admin.token``; without one every path
under ``/admin`` answers the same 404 (code ``not_found``) saying that the admin API is disabled
and how to enable it; with one, a wrong or missing ``Authorization: Bearer`` gets 401.
Errors use the OpenAI error shape. Adapter changes go to the shared state store (with a
version bump), so every gateway instance on the same Redis serves them within its refresh
interval. While the store is degraded (Redis unreachable) ``POST``, ``PUT`` and ``DELETE
/admin/adapters`` and the drain writes answer 503 with code ``state_unavailable``.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from loragate.core.errors import AuthenticationError, ConfigError, LoragateError
from loragate.gateway.admin_adapter_update import AdapterUpdate
from loragate.gateway.admin_adapters import AdapterAdmin
from loragate.gateway.admin_common import json_response
from loragate.gateway.admin_replicas import ReplicaAdmin
from loragate.gateway.errors import error_payload, error_response
from loragate.gateway.reload import log_reload_failure, reload_from_file
from loragate.gateway.request_ids import REQUEST_ID, with_request_id

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway

_DISABLED = error_payload(
    "the admin API is disabled: no admin token is set (set admin.token in the config file "
    "or the LORAGATE_ADMIN_TOKEN environment variable)",
    "invalid_request_error",
    "not_found",
)


def _disabled() -> web.Response:
    return web.Response(status=404, body=_DISABLED, content_type="application/json")


def bearer_matches(request: web.Request, token: str) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>`` (compared in constant
    time). A header that is not UTF-8 (aiohttp hands it over with surrogates) does not match;
    it is not an error."""
    sent = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogatepass")
    return hmac.compare_digest(sent, f"Bearer {token}".encode())


class AdminApi:
    """Handlers of ``/admin/*`` for one gateway: the routes, the token guard and reload; the
    replica and adapter endpoints are ``admin_replicas``' and ``admin_adapters``'."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._replicas = ReplicaAdmin(gateway)
        self._adapters = AdapterAdmin(gateway)
        self._update = AdapterUpdate(gateway, self._adapters)
        self._ids = gateway.request_ids

    def register(self, router: web.UrlDispatcher) -> None:
        replicas, adapters = self._replicas, self._adapters
        # The patterns match any character with [\s\S] ('.' does not match a newline: a path
        # with %0a got aiohttp's plain-text 404, no request id, not counted).
        router.add_get("/admin/replicas", self._guard(replicas.replicas))
        # Replica ids may hold '/' (any header value): as written or percent-encoded.
        router.add_post(r"/admin/replicas/{id:[\s\S]+}/drain", self._guard(replicas.drain))
        router.add_delete(r"/admin/replicas/{id:[\s\S]+}/drain", self._guard(replicas.undrain))
        router.add_get(r"/admin/replicas/{id:[\s\S]+}", self._guard(replicas.replica))
        router.add_get("/admin/adapters", self._guard(adapters.adapters))
        router.add_post("/admin/adapters", self._guard(adapters.add_adapter))
        # Any name vLLM takes, '/' included ('org/name'): as written or percent-encoded.
        router.add_delete(r"/admin/adapters/{name:[\s\S]+}", self._guard(adapters.delete_adapter))
        router.add_put(r"/admin/adapters/{name:[\s\S]+}", self._guard(self._update.replace_adapter))
        router.add_post("/admin/reload", self._guard(self.reload))
        # Last: any other path under /admin, or a method an admin path does not take.
        router.add_route("*", r"/admin{tail:(/[\s\S]*)?}", with_request_id(self._ids, self._other))

    async def _other(self, request: web.Request) -> web.StreamResponse:
        """Without a token: the same 404 as every admin route. With one: what any unknown
        path or method gets (404 ``no such endpoint``, 405 with ``Allow``)."""
        if self._gw.admin_token is None:
            return self._gw.endpoint_errors.answered(request, _disabled())
        from loragate.gateway.app import no_route  # the app imports this module

        return await no_route(request)  # (counted there)

    def _guard(self, handler: Any) -> Any:
        """``handler`` behind the token, its errors in the OpenAI shape and counted
        (``gateway.endpoint_errors``)."""
        errors = self._gw.endpoint_errors

        async def guarded(request: web.Request) -> web.StreamResponse:
            token = self._gw.admin_token
            if token is None:
                return errors.answered(request, _disabled())
            if not bearer_matches(request, token):
                return errors.answered(
                    request,
                    error_response(
                        AuthenticationError("admin API: missing or invalid admin token")
                    ),
                )
            try:
                response: web.StreamResponse = await handler(request)
            except LoragateError as exc:
                return errors.answered(request, error_response(exc))
            if isinstance(response, web.Response):
                errors.answered(request, response)
            return response

        return with_request_id(self._ids, guarded)

    async def reload(self, request: web.Request) -> web.Response:
        """200 with what changed; a bad file is a 400 naming the key (``ConfigError``, through
        the guard); any other failure a 500 in the OpenAI error shape, logged with its
        traceback as a SIGHUP reload's is (``reload.log_reload_failure``): the running config
        stays in force and the gateway serves on."""
        how = f"POST /admin/reload, request {request[REQUEST_ID]}"
        try:
            result = await reload_from_file(self._gw, how=how, request_id=request[REQUEST_ID])
        except ConfigError:
            raise
        except Exception as exc:
            log_reload_failure(self._gw, how, request[REQUEST_ID])
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
        return json_response(result.to_json())
