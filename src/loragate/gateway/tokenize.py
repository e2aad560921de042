"""vLLM's own endpoints that clients of a vLLM server call besides the OpenAI ones, forwarded to
a replica: ``POST /tokenize``, ``POST /detokenize`` (body: ``model`` and ``prompt`` or
``messages``, or ``tokens``) and ``GET /version``.

What real vLLM 0.32 does (``bench/vllm_cpu/tokenize_transcript.md``, its source
``entrypoints/serve/tokenize/``): the model is checked as a completion's, but an adapter changes
nothing (the base model's tokenizer counts; the adapter is only logged), so a tokenize needs no
adapter in the engine. It needs the name *registered*, though: an unregistered one is a 404, or,
with a LoRA resolver, gets registered and loaded by the tokenize itself. So the gateway sends an
adapter's tokenize to a healthy replica that has the adapter registered if there is one, else to
another with the base model's name in its ``model`` (same answer, no load, no 404); a replica
that answers 404 for an adapter it was thought to hold is forgotten to hold it and asked again
with the base model's name. The rest of the body is sent as the client sent it.

Like the completion endpoints: the tenant's API key when keys are configured (401), the
catalog's view of the model (an unknown adapter, or one the tenant may not use: 404, before any
replica sees the name), the body limits (413, 408), vLLM's own refusals answered by the gateway
where it can make them exactly (content type, JSON, the fields of a body with no ``messages``:
``twin.replica_tokenize``'s readers; a chat body they refuse goes to a replica, whose words are
vLLM's), ``X-Request-Id`` (the client's or a new one) on every answer and sent to the replica
with ``-<try>``, and ``X-Loragate-Replica`` once one was chosen. A replica that refuses the
connection or drops it before answering is reported to the pool (out of rotation until a poll
succeeds) and the request is sent once to another one (idempotent; counted in
``loragate_upstream_retries_total``); a timeout (``limits.request_timeout_s``) is a 504.

Unlike them, a tokenize takes no in-flight lease, records no demand and touches no shadow
residency: it costs a replica's API server a tokenizer call, not a generation, so routing must not
see it as load. It goes to the least loaded candidate (the in-flight counts routing uses,
read only), in turns among equals. Answers are counted in
``loragate_tokenizer_requests_total{endpoint,replica,status}`` (endpoint one of three, replica
the pool's, status the HTTP status or ``client_closed``: bounded).

``GET /version`` is open, as vLLM's is (vLLM's ``--api-key`` guards only ``/v1/...``), and answers
a healthy replica's ``{"version": ...}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import hdrs, web

from loragate.backends.client import VllmClient
from loragate.backends.pool import ReplicaPool
from loragate.backends.pool_health import connection_refused
from loragate.core.config import LimitsConfig
from loragate.core.errors import (
    AuthenticationError,
    LoragateError,
    UpstreamError,
    UpstreamTimeoutError,
)
from loragate.core.types import AdapterSpec, ReplicaId, TenantId
from loragate.gateway.catalog import UnknownModelError
from loragate.gateway.errors import (
    VllmRequestError,
    classify,
    error_response,
    internal_error_response,
)
from loragate.gateway.proxy import REPLICA_HEADER, Proxy
from loragate.gateway.request_body import read_request_body
from loragate.gateway.request_ids import REQUEST_ID, REQUEST_ID_HEADER, UPSTREAM_ID
from loragate.gateway.shared import SharedState
from loragate.gateway.telemetry import Telemetry, retry_reason
from loragate.gateway.vllm_validation import check_media_type
from loragate.twin.replica_tokenize import parse_json, read_detokenize, read_tokenize
from loragate.twin.vllm_errors import VllmApiError

log = logging.getLogger(__name__)

TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"
VERSION = "/version"
# loragate_tokenizer_requests_total{endpoint}
ENDPOINTS = ("tokenize", "detokenize", "version")
CLIENT_CLOSED = "client_closed"
_JSON = "application/json"
_TRIES = 2  # the first replica, and one other if it could not be reached


def _vllm_error(exc: VllmApiError) -> VllmRequestError:
    return VllmRequestError(exc.message, err_type=exc.err_type, param=exc.param)


class TokenizerProxy:
    """The handlers of ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``."""

    def __init__(
        self,
        *,
        proxy: Proxy,
        pool: ReplicaPool,
        state: SharedState,
        telemetry: Telemetry,
        limits: Callable[[], LimitsConfig],
        auth_failed: Callable[[web.Request, str], None] | None = None,
        no_replica: Callable[[str, str | None, str, str], None] | None = None,
    ) -> None:
        """``proxy``: the completions' (its catalog, as a reload or the admin API swaps it, and
        its request ids); ``limits``: the limits in force (a reload may change them)."""
        self._proxy = proxy
        self._pool = pool
        self._state = state
        self._telemetry = telemetry
        self._limits = limits
        self._auth_failed = auth_failed
        self._no_replica = no_replica
        self._turns = itertools.count()

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, TOKENIZE)

    async def detokenize(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, DETOKENIZE)

    async def version(self, request: web.Request) -> web.StreamResponse:
        request_id = _ids(request, self._proxy.request_ids)[0]
        rid: ReplicaId = ""
        try:
            for rid, last in self._tries(None):
                client = self._pool.client(rid)
                try:
                    status, data = await client.version()
                except UpstreamError as exc:
                    if self._failed(exc, rid, client, request_id, VERSION, last):
                        continue
                    raise
                self._count(request_id, VERSION, rid, str(status), None)
                return web.Response(
                    body=data, status=status, content_type=_JSON,
                    headers=_headers(request_id, rid),
                )  # fmt: skip
            raise AssertionError("unreachable")  # (the last try returns or raises)
        except LoragateError as exc:
            return self._refused(request, request_id, VERSION, rid, exc, None)
        except asyncio.CancelledError:
            self._count(request_id, VERSION, rid, CLIENT_CLOSED, None)
            raise
        except Exception:  # (e.g. a reload removed the replica of the second try meanwhile)
            log.exception(
                "request %s: unexpected error forwarding GET %s (replica %s)",
                request_id, VERSION, rid or "<none chosen>",
            )  # fmt: skip
            self._count(request_id, VERSION, rid, "500", None)
            return internal_error_response(headers=_headers(request_id, rid))

    # -- the POST endpoints -------------------------------------------------------------------

    async def _handle(self, request: web.Request, path: str) -> web.StreamResponse:
        request_id, upstream_id = _ids(request, self._proxy.request_ids)
        model: str | None = None
        rid: ReplicaId = ""  # (none chosen before the body is read and checked)
        try:
            catalog = self._proxy.catalog
            tenant = catalog.tenant_of(request.headers.get(hdrs.AUTHORIZATION))
            limits = self._limits()
            body = await read_request_body(
                request,
                max_bytes=limits.max_body_bytes,
                idle_timeout_s=limits.client_body_timeout_s,
            )
            check_media_type(request.headers.get(hdrs.CONTENT_TYPE), body)
            try:
                payload = parse_json(body, members=2 if path == TOKENIZE else 1)
            except VllmApiError as exc:
                raise _vllm_error(exc) from None
            named = payload.get("model")
            if named is not None and type(named) is not str:
                _check_fields(payload, path, local_only=False)  # no model to route by
            model = named or None
            spec = await self._resolve(model, tenant)
            _check_fields(payload, path, local_only=True)
        except LoragateError as exc:
            return self._refused(request, request_id, path, rid, exc, model)
        except asyncio.CancelledError:
            self._count(request_id, path, rid, CLIENT_CLOSED, model)
            raise
        except Exception:
            log.exception("request %s: unexpected error reading POST %s", request_id, path)
            self._count(request_id, path, rid, "500", model)
            return internal_error_response(headers=_headers(request_id, rid))
        return await self._forward(
            request, request_id, upstream_id, path, body, payload, spec, limits
        )

    async def _resolve(self, model: str | None, tenant: TenantId | None) -> AdapterSpec | None:
        """The adapter ``model`` names (None: the base model), as the catalog lets ``tenant``
        see it; one read of the shared store for a name another instance may have added."""
        catalog = self._proxy.catalog
        try:
            return catalog.resolve(model, tenant)
        except UnknownModelError as exc:
            if await self._state.find_adapter(exc.model) is None:
                raise
            return self._proxy.catalog.resolve(model, tenant)

    async def _forward(
        self,
        request: web.Request,
        request_id: str,
        upstream_id: str,
        path: str,
        body: bytes,
        payload: Mapping[str, Any],
        spec: AdapterSpec | None,
        limits: LimitsConfig,
    ) -> web.Response:
        """Send the body to a replica (another if it cannot be reached) and pass its answer
        on as it is."""
        model = spec.name if spec is not None else None
        where: list[ReplicaId] = [""]  # the replica tried last (``_send`` sets it)
        try:
            return await self._send(
                request_id, upstream_id, path, body, payload, spec, limits, where
            )
        except LoragateError as exc:  # (a replica failed it, or none is healthy)
            return self._refused(request, request_id, path, where[0], exc, model)
        except asyncio.CancelledError:
            self._count(request_id, path, where[0], CLIENT_CLOSED, model)
            raise
        except Exception:
            log.exception("request %s: unexpected error forwarding POST %s", request_id, path)
            self._count(request_id, path, where[0], "500", model)
            return internal_error_response(headers=_headers(request_id, where[0]))

    async def _send(
        self,
        request_id: str,
        upstream_id: str,
        path: str,
        body: bytes,
        payload: Mapping[str, Any],
        spec: AdapterSpec | None,
        limits: LimitsConfig,
        where: list[ReplicaId],
    ) -> web.Response:
        pool = self._pool
        as_base: bytes | None = None  # the body with the base model's name, made once
        forgot = False
        tries = 0
        tried = self._tries(spec)
        rid, last = next(tried)
        while True:
            tries += 1
            where[0] = rid
            client = pool.client(rid)
            sent = body
            if spec is not None and (forgot or not pool.is_registered(rid, spec.name)):
                if as_base is None:
                    as_base = _with_model(payload, self._proxy.catalog.base_model)
                sent = as_base
            upstream = client.upstream
            try:
                conn = await upstream.start(
                    path, sent, whole=True, timeout_s=limits.request_timeout_s,
                    request_id=f"{upstream_id}-{tries}",
                )  # fmt: skip
            except UpstreamError as exc:
                if self._failed(exc, rid, client, request_id, path, last):
                    rid, last = next(tried)
                    continue
                raise
            try:
                status, data, content_type = conn.status, conn.body(), conn.content_type
            finally:
                upstream.release(conn)
            if status == 404 and sent is body and spec is not None and not forgot:
                # The replica no longer holds the adapter (a restart, an unload elsewhere):
                # forgotten there (the next completion loads it again); asked again as the
                # base model, which tokenizes alike.
                pool.forget_adapter(rid, spec.name)
                self._telemetry.count_retry(rid, "adapter_missing")
                forgot = True
                continue
            self._count(request_id, path, rid, str(status), spec.name if spec else None)
            return web.Response(
                body=data,
                status=status,
                headers={hdrs.CONTENT_TYPE: content_type or _JSON, **_headers(request_id, rid)},
            )

    # -- choosing and failing -----------------------------------------------------------------

    def _tries(self, spec: AdapterSpec | None) -> Iterator[tuple[ReplicaId, bool]]:
        """The replicas to try, in order, each with whether it is the last: healthy ones
        (not draining), those that have ``spec`` registered first, then the least loaded
        (this instance's and the others' in-flight generations), in turns among equals; at most
        ``_TRIES``. Raises the 503 when none is healthy."""
        healthy = self._pool.healthy_snapshots()
        if not healthy:
            raise self._pool.no_replica_error()
        turn = next(self._turns)
        n = len(healthy)
        count = self._state.in_flight_of
        is_registered = self._pool.is_registered

        def key(i: int) -> tuple[bool, int, int]:
            rid = healthy[i].replica_id
            held = spec is None or is_registered(rid, spec.name)
            return (not held, count(rid), (i - turn) % n)

        order = sorted(range(n), key=key)[:_TRIES]
        return ((healthy[i].replica_id, j == len(order) - 1) for j, i in enumerate(order))

    def _failed(
        self,
        exc: UpstreamError,
        rid: ReplicaId,
        client: VllmClient,
        request_id: str,
        path: str,
        last: bool,
    ) -> bool:
        """Report and log a replica that failed the request; whether to try the next one (it
        could not be reached or dropped the connection, and another is left)."""
        url = client.base_url
        timed_out = isinstance(exc, UpstreamTimeoutError)
        if not timed_out:
            self._pool.report_failure(
                rid, f"{path[1:]} ({url}): {exc.message}", client=client,
                refused=connection_refused(exc),
            )  # fmt: skip
        log.warning(
            "request %s (%s) on replica %s (%s) failed: %s%s",
            request_id, path, rid, url, exc.message,
            "" if timed_out or last else "; sent to another replica",
        )  # fmt: skip
        if timed_out or last:
            return False
        self._telemetry.count_retry(rid, retry_reason(exc, loading=False))
        return True

    def _refused(
        self,
        request: web.Request,
        request_id: str,
        path: str,
        rid: ReplicaId,
        exc: LoragateError,
        model: str | None,
    ) -> web.Response:
        status = classify(exc)[0] if not isinstance(exc, VllmRequestError) else 400
        if isinstance(exc, AuthenticationError) and self._auth_failed is not None:
            self._auth_failed(request, request_id)
        if status == 503 and self._no_replica is not None and path != VERSION:
            self._no_replica(path, model, exc.message, request_id)
        if isinstance(exc, UpstreamError):
            exc = type(exc)(f"replica {rid}: {exc.message}")  # its id, never its URL
        self._count(request_id, path, rid, str(status), model, exc.message)
        return error_response(exc, headers=_headers(request_id, rid))

    def _count(
        self,
        request_id: str,
        path: str,
        rid: ReplicaId,
        status: str,
        model: str | None,
        note: str = "",
    ) -> None:
        self._telemetry.count_tokenizer(path[1:], rid, status)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s %s model=%s replica=%s status=%s%s",
                request_id, path, repr(model[:64]) if model else "<base>", rid or "-", status,
                f" ({note})" if note else "",
            )  # fmt: skip


def _check_fields(payload: dict[str, Any], path: str, *, local_only: bool) -> None:
    """vLLM's refusal of the body's fields, where the gateway makes it exactly; with
    ``local_only``, a chat body (``messages``) the readers refuse is left to the replica (its
    messages' errors are vLLM's to word)."""
    try:
        if path == TOKENIZE:
            read_tokenize(payload)
        else:
            read_detokenize(payload)
    except VllmApiError as exc:
        if local_only and path == TOKENIZE and "messages" in payload:
            return
        raise _vllm_error(exc) from None


def _ids(request: web.Request, ids: Callable[[str | None], tuple[str, str]]) -> tuple[str, str]:
    """The request's ids (as ``request_ids.with_request_id`` gives the other routes'), also set
    where ``gateway.protocol_errors`` reads them: anything escaping a handler is answered with
    the id its log lines said."""
    request_id, upstream_id = ids(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = request_id
    request[UPSTREAM_ID] = upstream_id
    return request_id, upstream_id


def _with_model(payload: Mapping[str, Any], model: str) -> bytes:
    return json.dumps({**payload, "model": model}).encode()


def _headers(request_id: str, rid: ReplicaId) -> dict[str, str]:
    if rid:
        return {REQUEST_ID_HEADER: request_id, REPLICA_HEADER: rid}
    return {REQUEST_ID_HEADER: request_id}
