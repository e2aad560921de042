"""The hot path: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Per request: authenticate (one dict lookup; a missing or wrong key is a 401, logged as the
gateway's own endpoints' failed authentications are: ``gateway.endpoint_errors``, one WARNING a
minute at most), read the body as bytes, ``json.loads`` it once to validate it and read the few
fields routing needs, resolve the model to an adapter the tenant may use, route (the pool's
snapshots with in-flight counts and shadow residency from the shared state, read locally), take the
in-flight lease (``SharedState.begin``: one Redis round trip with Redis, released in the
``finally``), make sure the chosen replica has the adapter registered (single-flight admin load),
then forward the *original bytes* upstream on the replica's keep-alive connection pool
(``backends.upstream``, a lean HTTP/1.1 client) and pass the answer back: non-streaming bodies as
bytes, streams chunk by chunk as they arrive.

Faults: a replica that refuses or drops the connection before answering is reported to the pool
(no more traffic until a poll succeeds) and the request is retried once on another replica. A
replica that refuses to load the adapter stays in rotation, and the request is retried once on
another replica; the pool remembers the refusal for a while (``poller.adapter_refusal_ttl_s``),
and routing leaves that replica out of the adapter's candidates meanwhile (routing is pure and
per-request: the proxy filters the candidates it hands to the policy, so every policy gets
this). While every candidate has a refusal in force, the request is answered at once from them
(a 502 naming each replica and its reason, no load); the first refusal to lapse lets the next
request try that replica again (one load, the pool's single flight, however many requests
arrive meanwhile). A replica that refuses every adapter (no ``--enable-lora``, no runtime
loading: ``backends.lora_off``) is marked by the pool as a whole: it is left out of every
adapter's candidates (base-model requests still go there; without runtime loading, requests
for the adapters it lists too) until the pool finds it serving adapters again; with no other
candidate, the request is answered at once (a 502 naming each replica's cause, no load). A
request waits for an adapter load no longer than
``limits.request_timeout_s`` from its routing (the body read is not counted; a retry gets it
whole again, as it does for its answer); past it, it is retried once on another replica like a
load that could not connect (``load_failed``: nothing was generated), while the load itself,
shared by every request waiting for it, goes on up to ``limits.admin_timeout_s`` (a load the
replica completes registers the adapter as usual). Any other timeout is a 504 (not retried: the
replica may still be working on the request). An answer that says the replica stopped the
request before answering it (``backends.engine_failures``: vLLM's 200 with
``finish_reason: "abort"`` when it shuts down, its 500 when its engine died: the generation was
aborted and nothing reached the client; its 503 while it stops, and its 500 "cannot schedule
new futures after shutdown" while it drains under ``--shutdown-timeout``: the request did not
run) is retried once on another replica, counted as ``engine_stopped`` in
loragate_upstream_retries_total, and the replica is out of rotation until a poll succeeds (a
draining one, whose ``/health`` still says 200, until a poll finds it gone or a bounded hold
passes: ``ReplicaPool.report_stopping``). An on-demand load it answers "Server shutting down"
is retried once elsewhere (``load_failed``; no refusal of the adapter is recorded).
A replica that stopped listening (its poll was refused at connect: vLLM closes its listener at
once on SIGTERM, and may then lose the race between its shutdown and its abort answers, and
wait for its connections to close) wakes the requests in progress there
(``backends.pool_stopped``): one that has received nothing for
``limits.stopped_replica_grace_s`` fails with ``ReplicaStoppedError`` and its connection is
closed. Before any answer (or while a stream is
held, below) it is retried once on another replica (``engine_stopped``: the generation was
lost with the engine), else the client's 502 names the replica; a stream that had sent output
ends with an error event (``upstream_unavailable``, a ``stream_error``). A request waiting for
an adapter load there stops waiting at once (``ReplicaStoppedError``; the load is abandoned):
it is retried once on another replica (``load_failed``: nothing was generated), else the
client's 502 names the replica. The gateway's own connection refused there (a request's, a
load's) counts as such a poll. A replica that stopped answering (its polls timed out
``poller.timeouts_to_unhealthy`` times in a row: a hung process, e.g. SIGSTOPped, or a wedged
engine, keeps its sockets open and sends nothing) has its requests in progress watched
(``backends.pool_stopped``): if none of them receives a byte for ``limits.stopped_replica_grace_s``,
each fails with ``ReplicaHungError``, a ``ReplicaStoppedError`` handled as above (retried once
elsewhere before any answer, ``engine_stopped``, else a 502 naming the replica; a stream that
had sent output ends with an ``upstream_unavailable`` error event), its connection closed. A
replica that is only slow (its polls succeed; or they time out, but a byte still arrives on
one of its connections: a stream producing, an answer completing) is left alone: its requests
wait for ``limits.request_timeout_s`` / ``limits.stream_read_timeout_s`` as before, even one
silent meanwhile (queued behind the others). A watch that failed its requests also ends the
waits for adapter loads there (``ReplicaHungError``: retried once elsewhere, ``load_failed``,
else a 502 naming the replica); without requests in progress there to judge by, such a wait
ends with the load, within ``limits.admin_timeout_s``.

A request waiting for an adapter load on a replica entry that a config reload removes or
replaces is routed again at once (counted ``reload``; its one retry stays unused): a
replacement at the same URL is the same server, so the load there goes on, and a request
routed to it again waits for that load, not a second one.

Streams: while another replica could take the request (not retried yet, another healthy
replica), the response head and the chunks that carry no output (a chat's role chunk, a usage
chunk) wait for the first chunk that does, so that until then nothing of the stream reached the
client. A stream that fails before that is retried like a non-streaming request
(``engine_stopped``): the replica stopped the request (vLLM's ``[DONE]`` after its head alone,
or an abort chunk without text), its engine died (vLLM's engine-dead error event), or the
stream broke off (the connection dropped, the chunked framing broke, the body ended without
``[DONE]``; a read that timed out is not retried: the replica may still be working on it).
Without another replica (or after the one retry), or once output reached the client: a stream
that breaks off ends with an SSE error event of the gateway's, and the break is logged; one
the replica ended unfinished (an error event of its own, or ``finish_reason: "abort"``) is
relayed as is and logged; one the replica ended before any token or finish reason (with
``[DONE]`` or without) gets an SSE error event (before the ``[DONE]``), and so does one whose
body ended without ``[DONE]`` after output but without a finish reason (cut short on its way:
vLLM ends every stream with ``[DONE]``); all count as ``stream_error`` in
loragate_requests_total. A read that timed out
(``limits.stream_read_timeout_s`` of silence) ends the stream with an ``upstream_timeout``
error event, any other break with ``upstream_unavailable``. A client that goes away counts as
``client_closed``, unless the stream's ``[DONE]`` had gone out to it (a client that stops
reading at ``[DONE]`` and closes before the body's end arrives): it had the whole answer, which
counts with its outcome (200 or ``stream_error``) and its latency. A client that stops reading
(a write waits for it, its socket's buffers full, and it takes none of the bytes it owes for
``limits.client_write_timeout_s``; one that reads, however slowly, is not cut) has its
connection closed and is counted as one that went away (the access log says it
stalled); its lease is released and the replica's connection closed (vLLM aborts the
generation). The write of a whole (non-streamed) answer is bounded alike (``_Answer``): a
client that takes none of it for ``limits.client_write_timeout_s`` has its connection closed
(logged at DEBUG; the request was counted when the answer came). What a stream has shown so
far and what to relay of each read is ``gateway.stream_state``; ``_pipe`` is the I/O loop
around it.

Access log: one DEBUG line per finished request (id, path, tenant, model, replica, status or
outcome, latency, TTFT when streamed, retries, ``residency=``: where its last routing decision
found the adapter on the replica chosen, ``base`` for the base model, ``none`` when no replica
was chosen, ``load_wait_ms=``: its waits for adapter loads, all tries; and why for errors);
nothing is formatted unless DEBUG is on for ``loragate.gateway.proxy``. The same residency
labels loragate_ttft_by_residency_seconds, loragate_request_duration_seconds (the whole
answers: every request but the SSE streams a replica began) and
loragate_stream_duration_seconds (those streams, to their end). A request refused before routing
(the gateway's own 400s, an unknown model, a 401) is counted under the adapter its body names
when the catalog holds it (else ``adapter=""``: the label's values stay bounded; and every
adapter label is folded as ``metrics.adapter_labels`` says: ``label_fold``) and logged with the
name asked (an unknown one quoted and cut at 64 characters; ``-`` when no body was read or it
is no JSON object), never as ``<base>`` unless it named the base model or none.

Request ids: a request's id is its client's ``X-Request-Id`` when that is 1-128 printable
ASCII characters without spaces (anything else could forge or break log lines: replaced),
else generated (``<12 random hex of this instance>-<count>``: unique across instances and
restarts). Every log line about the request names it (``request <id> ...``), every answer
carries it (``X-Request-Id``: successes, streams, and each error the gateway gives, before or
after routing), and each try sends the replica ``X-Request-Id: <id>-<try>`` (1, 2, ...; a
client's id gets the gateway's own between: ``<client id>-<generated>-<try>``); an adapter
load a try starts there is sent as ``<id>-<try>-load`` (``<client id>-<generated>-<try>-load``),
and its log line (``backends.pool_loads``: at its end) names the request's id and the load's. The
gateway's other endpoints, aiohttp's own error answers and the admin API's loads and unloads
get their ids from the same generator (``gateway.request_ids``), so every answer of the
gateway carries one. vLLM 0.32
makes that header its request id (the answer's ``id`` is ``cmpl-<it>`` / ``chatcmpl-<it>``,
its request log names it); its engine appends 8 random characters internally, but an abort
(the gateway closing the connection: the client went away) ends every request sent with that
header's id. So each try's id is its own: a retry, and a client that reuses its id, never send
a replica the id of a request it may still be running.

Shutdown (:meth:`Proxy.drain`, run by the runner once the gateway stopped accepting
connections): the requests being handled may finish within the drain period; those still
running at its end are cancelled with a cancellation the handler recognises, so that each still
gets an answer (a 503, or a final SSE error event if its stream had started) and its upstream
connection is closed (vLLM aborts the generation). The per-request cost is one add and one
discard on a set of handler tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import re
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from loragate.backends.client import VllmClient
from loragate.backends.engine_failures import ABORT, DRAINING_MESSAGE, engine_stopped
from loragate.backends.pool import ReplicaPool
from loragate.backends.pool_health import connection_refused
from loragate.backends.pool_types import ReplicaRetiredError, ReplicaStoppingError
from loragate.backends.upstream import ReplicaStoppedError, UpstreamConn
from loragate.core.clock import Clock
from loragate.core.config import LimitsConfig
from loragate.core.errors import (
    AdapterLoadError,
    AdapterLoadTimeoutError,
    AuthenticationError,
    LoragateError,
    NoReplicaAvailableError,
    ShuttingDownError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)
from loragate.core.types import AdapterSpec, ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.gateway.catalog import Catalog, UnknownModelError
from loragate.gateway.errors import (
    classify,
    error_response,
    internal_error_response,
)
from loragate.gateway.inflight import InFlightTracker
from loragate.gateway.request_body import read_request_body
from loragate.gateway.request_ids import REQUEST_ID_HEADER, RequestIds, client_id_ok
from loragate.gateway.shared import SharedState
from loragate.gateway.stream_state import STREAM_ERROR, StreamState
from loragate.gateway.telemetry import (
    BASE,
    NOT_ROUTED,
    ResidencyLabel,
    RoutedResidency,
    Telemetry,
    retry_reason,
)
from loragate.gateway.vllm_validation import (
    check_body_object,
    check_max_tokens_first,
    check_media_type,
    missing_body,
    parse_body,
    read_chat,
    read_completion,
)
from loragate.routing import Policy
from loragate.routing.rank_limit import within_rank_limit

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Loragate-Replica"
# The request's id (``gateway.request_ids``): taken from the client's header when it is 1-128
# printable ASCII characters without spaces (else generated), in every log line about the
# request, in every answer's headers, and sent to the replica (``-<try>`` appended: vLLM makes
# it its own request id). ``_handle`` makes it inline (``RequestIds.of``, without its calls).
_client_id_ok = client_id_ok
_JSON = "application/json"
_DEFAULT_MAX_TOKENS = 16
_ROUTING_MAX_TOKENS = 1 << 20  # routing's view of max_tokens is capped here
_COMPLETIONS = "/v1/completions"
_CHAT = "/v1/chat/completions"
_LOGGED_NAME_CHARS = 64  # an unknown model name in the access log is cut here
_LOGGED_NOTE_CHARS = 300  # the access log's note (an error message) is cut here
# What a note may not hold as is (it may quote the client's text: a model name): control
# characters (a newline would start a forged log line, a NUL makes the log binary) and the
# line separators str.splitlines() breaks at; escaped as repr() escapes them.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_set_field = object.__setattr__
_current_task = asyncio.current_task
_SHUTTING_DOWN = ShuttingDownError(
    "the gateway is shutting down and the request did not finish within its drain period; retry it"
)
# Room for a stream's response head (a few hundred bytes), which goes out with its first bytes.
_HEAD_ROOM = 4096
_CUT = "loragate: shutdown deadline"  # the cancel message of a request cut at the deadline
# The status label in loragate_requests_total of a request whose client went away first.
CLIENT_CLOSED = "client_closed"
# The reason label in loragate_upstream_retries_total of a request whose replica answered
# that its engine stopped under it (``backends.engine_failures``).
ENGINE_STOPPED = "engine_stopped"
# The reason label of a request routed again because a config reload removed or replaced the
# replica entry whose adapter load it waited for.
RELOAD = "reload"
# What the request's routing found, for its accounting: (where its last routing decision found
# the adapter on the replica chosen: ``telemetry.ROUTED_RESIDENCIES``, or ``NOT_ROUTED``;
# seconds it waited for adapter loads, all its tries).
_Routed = tuple[ResidencyLabel, float]
_UNROUTED: _Routed = (NOT_ROUTED, 0.0)
# The same once a replica was chosen (a stream being relayed: its TTFT is observed by residency,
# which NOT_ROUTED is not).
_Chosen = tuple[RoutedResidency, float]


class _RelayResponse(web.StreamResponse):
    """A streamed answer whose head waits for the first body bytes, so that both leave in one
    write (``_send_headers_immediately``: what ``web.Response`` does). ``_pipe`` sends the head
    alone (an empty write) as soon as the next body bytes are not already there."""

    _send_headers_immediately = False


class Proxy:
    """Request handlers of the OpenAI front door (bound methods are the aiohttp handlers)."""

    __slots__ = (
        "_active",
        "_auth_failed",
        "_body_timeout_s",
        "_client_write_timeout_s",
        "_cut",
        "_hurry",
        "_id_prefix",
        "_id_source",
        "_ids",
        "_inflight",
        "_lora_off",
        "_max_body",
        "_no_replica",
        "_now",
        "_policy",
        "_pool",
        "_refused",
        "_state",
        "_stream_timeout_s",
        "_telemetry",
        "_timeout_s",
        "_view",
        "_view_src",
        "catalog",
    )

    def __init__(
        self,
        *,
        catalog: Catalog,
        pool: ReplicaPool,
        policy: Policy,
        inflight: InFlightTracker,
        state: SharedState,
        telemetry: Telemetry,
        limits: LimitsConfig,
        clock: Clock,
        auth_failed: Callable[[web.Request, str], None] | None = None,
        no_replica: Callable[[str, str | None, str, str], None] | None = None,
        ids: RequestIds | None = None,
    ) -> None:
        self.catalog = catalog
        # Told of each request refused for a missing or wrong key (the 401's log line).
        self._auth_failed = auth_failed
        # Told of each 503 no_replica_available (its log line): path, adapter, message, id.
        self._no_replica = no_replica
        self._pool = pool
        self._refused = pool.refusals.by_adapter  # adapters some replica refused lately
        self._lora_off = pool.lora_off  # replicas that serve no adapters (mostly empty)
        self._policy = policy
        self._inflight = inflight  # this instance's own counts, per adapter
        self._state = state
        self._telemetry = telemetry
        self.set_limits(limits)
        self._now = clock.now
        # Generated request ids: the app's generator's random prefix and count (unique across
        # instances and restarts, cheap to make; shared with the gateway's other endpoints).
        ids = self._id_source = ids or RequestIds()
        self._id_prefix = ids.prefix
        self._ids = ids.count
        self._view: list[ReplicaSnapshot] = []
        self._view_src: tuple[ReplicaSnapshot, ...] = ()
        # The handler tasks of the requests being handled, for the shutdown's drain.
        # (None never occurs: aiohttp runs every handler in a task; typed so to skip a check.)
        self._active: set[asyncio.Task[Any] | None] = set()
        self._cut: set[asyncio.Task[Any] | None] = set()  # cancelled at the drain's deadline
        self._hurry: asyncio.Event | None = None  # set: end the drain now

    def set_policy(self, policy: Policy) -> None:
        self._policy = policy

    def set_limits(self, limits: LimitsConfig) -> None:
        """Request limits (a reload may change them; requests already running keep theirs)."""
        self._max_body = limits.max_body_bytes
        self._timeout_s = limits.request_timeout_s
        self._stream_timeout_s = limits.stream_read_timeout_s
        self._body_timeout_s = limits.client_body_timeout_s
        self._client_write_timeout_s = limits.client_write_timeout_s
        # (the pool wakes the requests of a replica that stopped listening, after this grace)
        self._pool.stopped_replica_grace_s = limits.stopped_replica_grace_s

    # -- shutdown ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests being handled by this instance now."""
        return len(self._active)

    async def drain(self, timeout_s: float, *, grace_s: float) -> tuple[int, int]:
        """Shutdown, once no new requests arrive: wait up to ``timeout_s`` (or until
        :meth:`end_drain`) for the requests being handled to finish, answers sent; then cut
        those still running (a 503, or a final SSE error event once a stream started; the
        upstream connection is closed) and wait up to ``grace_s`` for those answers to go out.
        Returns (requests finished during the drain, requests cut)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        hurry = self._hurry = self._hurry or asyncio.Event()
        hurried = loop.create_task(hurry.wait())
        seen: set[asyncio.Task[Any]] = set()
        try:
            while not hurry.is_set():
                seen.update(t for t in self._active if t is not None)
                pending = {t for t in seen if not t.done()}
                left = deadline - loop.time()
                if not pending or left <= 0:
                    break
                everything = loop.create_task(asyncio.wait(pending))
                try:
                    await asyncio.wait(
                        (everything, hurried), timeout=left, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    everything.cancel()
        finally:
            hurried.cancel()
        cut = [t for t in self._active if t is not None and not t.done()]
        seen.update(cut)
        if cut:
            self._cut.update(cut)
            for task in cut:
                task.cancel(_CUT)
            await asyncio.wait(cut, timeout=grace_s)
        return len(seen) - len(cut), len(cut)

    def end_drain(self) -> None:
        """Cut the requests still running now rather than at the drain's deadline (e.g. a
        second SIGTERM)."""
        self._hurry = self._hurry or asyncio.Event()
        self._hurry.set()

    def _was_cut(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether the ``CancelledError`` being handled in ``task`` is the drain's cut (then
        the task's cancellation is withdrawn: the handler answers and ends normally)."""
        if task not in self._cut:
            return False
        self._cut.discard(task)
        assert task is not None
        task.uncancel()
        return True

    def request_ids(self, client_id: str | None) -> tuple[str, str]:
        """A request's id (its client's ``X-Request-Id`` if fit to log and send on, else a new
        one) and the id its tries send the replica (``-<try>`` appended), as :meth:`_handle`
        makes them: for the gateway's other forwarded endpoints (``gateway.tokenize``)."""
        return self._id_source.of(client_id)

    # -- handlers ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = self._now()
        task = _current_task()
        active = self._active
        active.add(task)
        own_id = self._id_prefix + str(next(self._ids))
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is None or not _client_id_ok(request_id):
            # (none, or not safe to log and send on: too long, spaces, control bytes, non-ASCII)
            request_id = upstream_id = own_id
        else:  # the client's: another request may reuse it; the replica's id must not collide
            upstream_id = f"{request_id}-{own_id}"
        id_header = {REQUEST_ID_HEADER: request_id}
        body = b""  # (read: the model it names counts and logs a refusal before routing)
        tenant: str | None = None
        try:
            # Until a replica is chosen: errors here are no replica's (``_forward`` answers,
            # counts and logs everything that happens after).
            try:
                tenant = self.catalog.tenant_of(request.headers.get(hdrs.AUTHORIZATION))
                body = await self._read_body(request, request_id)
                try:
                    spec, stream, max_tokens = self._parse(body, chat, tenant)
                except UnknownModelError as exc:
                    # Registered on another instance since our last refresh? One store read
                    # (not on the routed requests' path); found: the catalog now holds it.
                    if await self._state.find_adapter(exc.model) is None:
                        raise
                    spec, stream, max_tokens = self._parse(body, chat, tenant)
                rreq = RoutingRequest(
                    request_id=request_id,
                    adapter=spec.name if spec is not None else None,
                    tenant=tenant,
                    prompt_tokens=len(body) >> 2,  # rough: ~4 bytes per token
                    max_tokens=max_tokens,
                    stream=stream,
                    adapter_rank=spec.rank if spec is not None else None,
                )
            except LoragateError as exc:
                self._unrouted(
                    request_id, request.path, tenant, body, str(classify(exc)[0]), t0, exc.message
                )
                if isinstance(exc, AuthenticationError) and self._auth_failed is not None:
                    self._auth_failed(request, request_id)
                return error_response(exc, headers=id_header)
            except asyncio.CancelledError:
                if not self._was_cut(task):
                    # The client went away before its request was read (or the server's own
                    # shutdown): nobody to answer.
                    self._unrouted(
                        request_id, request.path, tenant, body, CLIENT_CLOSED, t0,
                        "the client went away before it was routed",
                    )  # fmt: skip
                    raise
                # Cut at the shutdown deadline before it was routed: 503 (retryable).
                self._unrouted(request_id, request.path, tenant, body, "503", t0)
                return error_response(_SHUTTING_DOWN, headers=id_header)
            except Exception:
                log.exception("request %s: unexpected error reading %s", request_id, request.path)
                self._unrouted(request_id, request.path, tenant, body, "500", t0)
                return internal_error_response(headers=id_header)
            return await self._forward(request, body, rreq, spec, chat, t0, upstream_id)
        finally:
            active.discard(task)

    async def _read_body(self, request: web.Request, request_id: str) -> bytes:
        body = await read_request_body(
            request,
            max_bytes=self._max_body,
            idle_timeout_s=self._body_timeout_s,
            request_id=request_id,
        )
        check_media_type(request.headers.get(hdrs.CONTENT_TYPE), body)  # vLLM's first check
        if not body:
            raise missing_body()
        return body

    def _parse(
        self, body: bytes, chat: bool, tenant: str | None
    ) -> tuple[AdapterSpec | None, bool, int]:
        """Check the body as vLLM would (``vllm_validation``: refused as a replica would refuse
        it) and read what routing needs: (adapter, stream, max_tokens)."""
        payload = check_body_object(parse_body(body))
        model, stream, max_tokens, echo = (read_chat if chat else read_completion)(payload)
        spec = self.catalog.resolve(model, tenant)  # vLLM looks the model up first
        if max_tokens is None:
            max_tokens = _DEFAULT_MAX_TOKENS
        elif max_tokens > _ROUTING_MAX_TOKENS:
            # Routing estimates work from it (floats, running means): keep any int sane there.
            # The replica gets the original body and judges the real value itself.
            max_tokens = _ROUTING_MAX_TOKENS
        elif max_tokens < 1:
            if not chat:  # raises where vLLM surely answers that (else the replica answers)
                card = self._pool.base_model_card()
                max_len = card.max_model_len if card is not None else None
                check_max_tokens_first(payload, max_tokens, echo, max_len)
            max_tokens = 1  # (echo without generation: vLLM runs it with max_tokens=1)
        return spec, stream, max_tokens

    # -- routing ----------------------------------------------------------------------------

    def _choose(
        self, rreq: RoutingRequest, spec: AdapterSpec | None, exclude: ReplicaId | None
    ) -> tuple[ReplicaId, RoutedResidency]:
        """The replica chosen for ``rreq``, and where the shadow residency had its adapter
        there (one of ``telemetry.ROUTED_RESIDENCIES``: ``base`` for the base model)."""
        healthy = self._pool.healthy_snapshots()
        inflight = self._inflight
        if healthy is not self._view_src:  # the pool polled or health changed: rebuild
            self._view_src = healthy
            self._view = [
                dataclasses.replace(s, adapter_in_flight=inflight.adapter_counts(s.replica_id))
                for s in healthy
            ]
        view = self._view
        # In-flight counts of every gateway instance and the shadow residency, from the shared
        # state's local view (no I/O).
        count = self._state.in_flight_of
        residency_of = self._state.residency_of
        for snap in view:
            rid = snap.replica_id
            n = count(rid)
            if snap.in_flight != n:
                # The view holds this proxy's own copies (made just above) and routing keeps
                # no snapshot across decisions: update the fields in place rather than copy a
                # 14-field frozen dataclass per replica per request (~25x dearer).
                # adapter_in_flight is a live read-only view: never stale.
                _set_field(snap, "in_flight", n)
            res = residency_of(rid)
            if snap.residency is not res:
                _set_field(snap, "residency", res)
        candidates = view if exclude is None else [s for s in view if s.replica_id != exclude]
        if not candidates:
            raise self._pool.no_replica_error()  # says so if the replicas are draining
        if spec is not None and self._lora_off:
            # Replicas that serve no adapters (no --enable-lora, no runtime loading: then
            # only the adapters they list) are left out of an adapter's candidates.
            takes = self._pool.takes_adapter
            kept = [s for s in candidates if takes(s.replica_id, spec.name)]
            if not kept:
                raise self._served_nowhere(spec, candidates)
            candidates = kept
        if spec is not None and spec.name in self._refused:
            refusing = self._pool.refusing(spec)
            # Replicas that refused to load this adapter lately are left out. None other left:
            # answered from the refusals, with no load (the first to lapse lets one load try
            # again: the pool's single flight for that replica).
            kept = [s for s in candidates if s.replica_id not in refusing]
            # (the others all above their known max_lora_rank: as good as refusing)
            if not any(within_rank_limit(s.settings, spec.rank) for s in kept):
                raise self._refused_everywhere(spec, view)
            candidates = kept
        chosen = self._policy.choose(rreq, candidates, self._policy.context(self._now()))
        if spec is None:
            return chosen, BASE
        for snap in candidates:  # where the adapter was there (before the lease's touch)
            if snap.replica_id == chosen:
                return chosen, self._telemetry.count_residency(chosen, spec.name, snap.residency)
        # (a policy chooses among the candidates; were it not, its residency all the same)
        return chosen, self._telemetry.count_residency(chosen, spec.name, residency_of(chosen))

    def _served_nowhere(
        self, spec: AdapterSpec, candidates: list[ReplicaSnapshot]
    ) -> AdapterLoadError:
        """The 502 for ``spec`` while no candidate serves adapters: each one's cause."""
        pool = self._pool
        return _RefusedEverywhere(
            f"no healthy replica serves adapter {spec.name!r}: "
            + "; ".join(pool.last_error(s.replica_id) or s.replica_id for s in candidates),
            status=None,
        )

    def _refused_everywhere(
        self, spec: AdapterSpec, view: list[ReplicaSnapshot]
    ) -> AdapterLoadError:
        """The 502 for ``spec`` while every candidate refused it lately: each healthy
        replica's refusal in force, in config order."""
        in_force = self._pool.refusals.in_force(spec)
        now = self._now()
        named = [(s.replica_id, in_force[s.replica_id]) for s in view if s.replica_id in in_force]
        left_s = min((r.until_s - now for _, r in named), default=0.0)
        limited = [
            f"replica {s.replica_id}: its max_lora_rank {s.settings.max_lora_rank} is below "
            f"the adapter's rank {spec.rank}"
            for s in view
            if s.replica_id not in in_force and not within_rank_limit(s.settings, spec.rank)
        ]
        return _RefusedEverywhere(
            f"every healthy replica refused to load adapter {spec.name!r} lately (tried "
            f"again in {max(left_s, 0.0):.0f} s)"
            + (" or cannot take its rank" if limited else "")
            + ": "
            + "; ".join([*(f"replica {rid}: {r.error}" for rid, r in named), *limited]),
            status=None,
        )

    # -- forwarding -------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        rreq: RoutingRequest,
        spec: AdapterSpec | None,
        chat: bool,
        t0: float,
        upstream_id: str,
    ) -> web.StreamResponse:
        """Route, forward and answer ``rreq``; the replica gets ``X-Request-Id:
        <upstream_id>-<try>`` (1, 2, ...: each try's id its own, on whichever replica)."""
        pool = self._pool
        stream = rreq.stream
        path = _CHAT if chat else _COMPLETIONS
        exclude: ReplicaId | None = None
        retried = reloaded = False
        retries = 0  # attempts that failed and were sent again (for the access log)
        state = self._state
        sync = state.sync
        telemetry = self._telemetry
        rid: ReplicaId = ""
        loading: str | None = None  # the adapter being loaded on rid, while that is under way
        refused: list[tuple[ReplicaId, str]] = []  # this request's refused loads
        piping = False  # the stream is being relayed (``_pipe`` counts how it ends)
        residency: ResidencyLabel = NOT_ROUTED  # where the last routing decision found the adapter
        load_wait_s = 0.0  # waited for adapter loads, all tries
        try:
            while True:
                rid = ""  # (an error before the choice is no replica's)
                residency = NOT_ROUTED
                rid, residency = self._choose(rreq, spec, exclude)
                # The try's start: its wait for a load ends within request_timeout_s of it (a
                # retry gets the whole of it again, as it does for its answer).
                t_try = self._now()
                client = pool.client(rid)  # (a reload may replace the replica's entry meanwhile)
                upstream = client.upstream
                if sync:  # the embedded store: no coroutine
                    lease = state.begin_now(rid, rreq.adapter)
                else:
                    lease = await state.begin(rid, rreq.adapter)
                try:
                    if spec is not None and not pool.is_registered(rid, spec.name):
                        loading = spec.name
                        t_load = self._now()
                        try:
                            # This try waits for the (shared) load what is left of its
                            # request_timeout_s; the load itself may go on to admin_timeout_s.
                            try:
                                await pool.ensure_adapter(
                                    rid,
                                    spec,
                                    timeout_s=self._timeout_s - (t_load - t_try),
                                    request_id=rreq.request_id,
                                    load_id=f"{upstream_id}-{retries + 1}-load",
                                )
                            finally:
                                waited = self._now() - t_load
                                load_wait_s += waited
                                telemetry.observe_load_wait(rid, waited)
                        except ReplicaRetiredError as exc:
                            # A reload removed or replaced the replica's entry meanwhile: not
                            # the replica's failure; routed again (its one retry stays unused).
                            self._rerouted(rid, rreq, exc)
                            loading = None
                            retries += 1
                            continue
                        except (
                            UpstreamConnectError,
                            UpstreamTimeoutError,
                            AdapterLoadError,
                        ) as exc:
                            # Unreachable: reported to the pool (out of rotation). Not loaded in
                            # time (a hung replica; a load that may still complete: nothing was
                            # generated): logged, left to the poller. Refused (a rank above
                            # its --max-lora-rank, a path it cannot read; no --enable-lora: the
                            # pool marked the replica): it stays in rotation, the pool logged
                            # the refusal. Either way another replica may take it.
                            if isinstance(exc, AdapterLoadError):
                                refused.append((rid, exc.message))
                            else:
                                self._upstream_failed(
                                    exc, rid, client, rreq, f"loading adapter {loading!r}"
                                )
                            if not retried and self._can_retry(rid, rreq):
                                self._telemetry.count_retry(rid, retry_reason(exc, loading=True))
                                retried, exclude, loading = True, rid, None
                                retries += 1
                                continue
                            if len(refused) > 1:  # both tries refused: name both
                                raise _RefusedEverywhere(
                                    f"no replica tried could load adapter {spec.name!r}: "
                                    + "; ".join(f"replica {r}: {m}" for r, m in refused)
                                ) from exc
                            raise
                        loading = None
                    t_send = self._now()
                    try:
                        conn = await upstream.start(
                            path,
                            body,
                            whole=not stream,
                            # (a stream's head: as every silence of the stream; vLLM sends
                            # it at once, its queue wait comes before the first chunk)
                            timeout_s=self._stream_timeout_s if stream else self._timeout_s,
                            request_id=f"{upstream_id}-{retries + 1}",
                        )
                    except UpstreamError as exc:
                        self._upstream_failed(exc, rid, client, rreq, "answering")
                        # Nothing reached the client yet: safe to try another replica once,
                        # unless it timed out (the replica may still be working on it).
                        if (
                            not isinstance(exc, UpstreamTimeoutError)
                            and not retried
                            and self._can_retry(rid, rreq)
                        ):
                            self._telemetry.count_retry(
                                rid,
                                # (a replica that stopped listening lost the generation)
                                ENGINE_STOPPED
                                if isinstance(exc, ReplicaStoppedError)
                                else retry_reason(exc, loading=False),
                            )
                            retried, exclude = True, rid
                            retries += 1
                            continue
                        raise
                    try:
                        status = conn.status
                        if status == 404 and spec is not None and not reloaded:
                            # The replica forgot the adapter (restart, external unload):
                            # reload it once.
                            pool.forget_adapter(rid, spec.name)
                            self._telemetry.count_retry(rid, "adapter_missing")
                            reloaded = True
                            retries += 1
                            continue
                        if stream and status == 200:
                            piping = True
                            # Hold the head until the first output when another replica could
                            # take the request if this one stops it before any.
                            hold = not retried and self._can_retry(rid, rreq)
                            out = await self._pipe(
                                request, conn, rid, client, rreq, path, t0, t_send, retries, hold,
                                (residency, load_wait_s),
                            )  # fmt: skip
                            if out is not None:
                                return out
                            # Stopped before it produced anything; nothing reached the client.
                            piping = False
                            self._telemetry.count_retry(rid, ENGINE_STOPPED)
                            retried, exclude = True, rid
                            retries += 1
                            continue
                        data = (
                            conn.body()
                            if not stream
                            else await self._drain(conn, rid, client, rreq)
                        )
                        if (status in (500, 503) or ABORT in data) and (
                            stopped := engine_stopped(status, data)
                        ):
                            # The replica stopped the request (its shutdown aborts what runs,
                            # its engine died): nothing reached the client, so another replica
                            # may run it; this one is out until a poll.
                            self._engine_stopped(rid, client, rreq, stopped)
                            if not retried and self._can_retry(rid, rreq):
                                self._telemetry.count_retry(rid, ENGINE_STOPPED)
                                retried, exclude = True, rid
                                retries += 1
                                continue
                        now = self._now()
                        self._telemetry.observe_latency(rid, now - t_send)
                        self._finished(
                            rreq, path, rid, str(status), t0, retries,
                            routed=(residency, load_wait_s), now=now,
                        )  # fmt: skip
                        return _Answer(
                            request.transport,
                            self._client_write_timeout_s,
                            body=data,
                            status=status,
                            headers={
                                hdrs.CONTENT_TYPE: conn.content_type or _JSON,
                                REPLICA_HEADER: rid,
                                REQUEST_ID_HEADER: rreq.request_id,
                            },
                        )
                    finally:
                        upstream.release(conn)
                finally:
                    state.end(rid, rreq.adapter, lease)
        except LoragateError as exc:
            if isinstance(exc, UpstreamError):
                # The client learns which replica failed by its id, never by its URL (the log
                # line and the admin API's last_error have that).
                exc = _for_client(exc, rid, loading)
            elif isinstance(exc, NoReplicaAvailableError) and self._no_replica is not None:
                # (a rate-limited WARNING)
                self._no_replica(path, rreq.adapter, exc.message, rreq.request_id)
            # Counted with the replica that failed it (the handler counts errors raised
            # before a replica was chosen), and named to the client in the replica header.
            self._finished(
                rreq, path, rid, str(classify(exc)[0]), t0, retries, note=exc.message,
                routed=(residency, load_wait_s),
            )  # fmt: skip
            return error_response(exc, headers=self._headers(rreq, rid))
        except asyncio.CancelledError:
            if not self._was_cut(_current_task()):
                # The client went away (aiohttp cancels its handler; the upstream connection,
                # released unfinished, was closed: vLLM aborts the generation). A stream
                # counts its own (``_pipe``).
                if not piping:
                    self._client_left(
                        rreq, path, rid, t0, retries, "waiting for the answer",
                        routed=(residency, load_wait_s),
                    )  # fmt: skip
                raise
            # Cut at the shutdown deadline before an answer started: 503 (retryable).
            self._finished(rreq, path, rid, "503", t0, retries, routed=(residency, load_wait_s))
            return error_response(_SHUTTING_DOWN, headers=self._headers(rreq, rid))
        except Exception:
            log.exception(
                "request %s (model %s) on replica %s: unexpected error while proxying %s",
                rreq.request_id,
                rreq.adapter or "<base>",
                rid or "<none chosen>",
                path,
            )
            self._finished(rreq, path, rid, "500", t0, retries, routed=(residency, load_wait_s))
            return internal_error_response(headers=self._headers(rreq, rid))

    @staticmethod
    def _headers(rreq: RoutingRequest, rid: ReplicaId) -> dict[str, str]:
        """An error answer's headers: the request's id, and the replica's if one was chosen."""
        if rid:
            return {REQUEST_ID_HEADER: rreq.request_id, REPLICA_HEADER: rid}
        return {REQUEST_ID_HEADER: rreq.request_id}

    # -- accounting -------------------------------------------------------------------------

    def _done(
        self,
        request_id: str,
        path: str,
        tenant: str | None,
        adapter: str,
        rid: ReplicaId,
        status: str,
        t0: float,
        retries: int = 0,
        ttft_s: float | None = None,
        note: str = "",
        model: str = "",
        routed: _Routed = _UNROUTED,
        streamed: bool = False,
        now: float | None = None,
    ) -> None:
        """A request finished with ``status`` (an HTTP status or an outcome label): counted in
        loragate_requests_total and in loragate_request_duration_seconds (until ``now``: the
        whole answer is ready), or if ``streamed`` (a replica began an SSE stream for it)
        loragate_stream_duration_seconds (until now), and the access log's line, at DEBUG
        (formatted only then). ``model``: the access log's model when it is not ``adapter``
        (or ``<base>``); ``routed``: what its routing found (residency, adapter load waits)."""
        residency = routed[0]
        seconds = (self._now() if now is None else now) - t0
        if streamed:
            self._telemetry.count_stream(adapter, rid, status, residency, seconds)
        else:
            self._telemetry.count(adapter, rid, status, residency, seconds, tenant or "")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s %s tenant=%s model=%s replica=%s status=%s latency_ms=%.1f%s "
                "retries=%d residency=%s load_wait_ms=%.1f%s",
                request_id,
                path,
                tenant or "-",
                model or adapter or "<base>",
                rid or "-",
                status,
                (self._now() - t0) * 1000.0,
                "" if ttft_s is None else f" ttft_ms={ttft_s * 1000.0:.1f}",
                retries,
                residency,
                routed[1] * 1000.0,
                f" ({_logged_note(note)})" if note else "",
            )

    def _unrouted(
        self,
        request_id: str,
        path: str,
        tenant: str | None,
        body: bytes,
        status: str,
        t0: float,
        note: str = "",
    ) -> None:
        """:meth:`_done` for a request that ended before it was routed (refused by the gateway
        itself, its client gone, cut at shutdown), counted under the adapter its body names if
        the catalog holds it (``""`` for the base model and for names it does not hold: the
        label's values stay bounded), logged with the name it asked for (``<base>`` for the
        base model, or when the body names none; ``-`` when no body was read or it is no JSON
        object; an unknown name quoted, cut at ``_LOGGED_NAME_CHARS``)."""
        model = _model_named(body)
        if model is None:
            self._done(request_id, path, tenant, "", "", status, t0, note=note, model="-")
        elif model in self.catalog.adapters:
            self._done(request_id, path, tenant, model, "", status, t0, note=note)
        elif not model or model == self.catalog.base_model:
            self._done(request_id, path, tenant, "", "", status, t0, note=note)
        else:
            cut = model[:_LOGGED_NAME_CHARS]
            logged = repr(cut) + ("..." if len(cut) < len(model) else "")
            self._done(request_id, path, tenant, "", "", status, t0, note=note, model=logged)

    def _finished(
        self,
        rreq: RoutingRequest,
        path: str,
        rid: ReplicaId,
        status: str,
        t0: float,
        retries: int,
        ttft_s: float | None = None,
        note: str = "",
        *,
        routed: _Routed,
        streamed: bool = False,
        now: float | None = None,
    ) -> None:
        """:meth:`_done` for a routed request."""
        self._done(
            rreq.request_id, path, rreq.tenant, rreq.adapter or "", rid, status, t0, retries,
            ttft_s, note, "", routed, streamed, now,
        )  # fmt: skip

    def _client_left(
        self,
        rreq: RoutingRequest,
        path: str,
        rid: ReplicaId,
        t0: float,
        retries: int,
        stage: str,
        ttft_s: float | None = None,
        outcome: str = "200",
        *,
        routed: _Routed,
        streamed: bool = False,
        stalled: bool = False,
    ) -> None:
        """Count (and log in the access log, at DEBUG: clients leave all the time) a request
        whose client went away before its answer was out. ``outcome``: the stream's so far; a
        stream the replica ended unfinished stays a ``stream_error`` (clients leave on an error
        event: the openai SDK raises at once). ``stalled``: the client did not go away but
        stopped reading, and the gateway closed its connection (``_ClientStalled``)."""
        if stalled:
            stage = (
                f"{stage}: it read nothing for {self._client_write_timeout_s:g} s "
                "(limits.client_write_timeout_s), its connection was closed"
            )
        if outcome == STREAM_ERROR:
            self._finished(
                rreq, path, rid, STREAM_ERROR, t0, retries, ttft_s,
                f"the client went away after the replica's error, while {stage}",
                routed=routed, streamed=streamed,
            )  # fmt: skip
            return
        self._finished(
            rreq, path, rid, CLIENT_CLOSED, t0, retries, ttft_s,
            f"the client went away while {stage}", routed=routed, streamed=streamed,
        )  # fmt: skip

    def _answered_then_left(
        self,
        rreq: RoutingRequest,
        path: str,
        rid: ReplicaId,
        t0: float,
        t_send: float,
        retries: int,
        ttft_s: float | None,
        outcome: str,
        routed: _Routed,
    ) -> None:
        """Count a stream whose client went away after its ``[DONE]`` went out: the client had
        the whole answer, so it counts with the stream's outcome (200, or ``stream_error`` if
        the replica ended it unfinished), its latency observed, as a stream read to its end."""
        self._telemetry.observe_latency(rid, self._now() - t_send)
        self._finished(
            rreq, path, rid, outcome, t0, retries, ttft_s,
            "the client went away after the stream's [DONE]", routed=routed, streamed=True,
        )  # fmt: skip

    def _engine_stopped(
        self, rid: ReplicaId, client: VllmClient, rreq: RoutingRequest, message: str
    ) -> None:
        """The replica answered that it stopped the request (``backends.engine_failures``): out
        of rotation until a poll succeeds (it is stopping, or its engine died; one draining
        under --shutdown-timeout, whose /health says 200 meanwhile, until a poll finds it gone
        or the pool's hold passes: ``ReplicaPool.report_stopping``), and logged."""
        url = client.base_url
        if message == DRAINING_MESSAGE:
            self._pool.report_stopping(rid, f"answering ({url}): {message}", client=client)
        else:
            self._pool.report_failure(rid, f"answering ({url}): {message}", client=client)
        log.warning(
            "request %s (model %s) on replica %s (%s): the replica stopped the request, nothing "
            "of it reached the client (%s): the replica is out of rotation",
            rreq.request_id,
            rreq.adapter or "<base>",
            rid,
            url,
            message,
        )

    async def _drain(
        self, conn: UpstreamConn, rid: ReplicaId, client: VllmClient, rreq: RoutingRequest
    ) -> bytes:
        """The whole body of a streaming request's non-200 answer (vLLM's JSON error)."""
        parts = []
        try:
            while chunk := await conn.read_chunk(self._stream_timeout_s):
                parts.append(chunk)
        except UpstreamError as exc:
            self._upstream_failed(exc, rid, client, rreq, f"sending its {conn.status} answer")
            raise
        return b"".join(parts)

    def _rerouted(self, rid: ReplicaId, rreq: RoutingRequest, exc: ReplicaRetiredError) -> None:
        """A request waiting for an adapter load on ``rid``'s entry, which a config reload
        removed or replaced: counted (``reload``) and logged; the caller routes it again."""
        self._telemetry.count_retry(rid, RELOAD)
        log.info(
            "request %s (model %s): replica %s %s: routed again",
            rreq.request_id,
            rreq.adapter or "<base>",
            rid,
            exc.message,
        )

    def _can_retry(self, failed: ReplicaId, rreq: RoutingRequest) -> bool:
        """Whether another healthy replica could take the request (its adapter's rank within
        that replica's known max_lora_rank; one that serves adapters, for an adapter)."""
        rank, adapter = rreq.adapter_rank, rreq.adapter
        takes = self._pool.takes_adapter if adapter is not None and self._lora_off else None
        return any(
            s.replica_id != failed
            and (rank is None or within_rank_limit(s.settings, rank))
            and (takes is None or adapter is None or takes(s.replica_id, adapter))
            for s in self._pool.healthy_snapshots()
        )

    def _upstream_failed(
        self,
        err: UpstreamError,
        rid: ReplicaId,
        client: VllmClient,
        rreq: RoutingRequest,
        stage: str,
    ) -> None:
        """Log (and, unless it timed out, take out of rotation) a replica that failed; both
        name its URL. ``client``: the replica's client the request used. A failure on the
        entry a reload replaced since (its old URL, key or settings) does not take the new
        entry out (the pool tells them apart by client)."""
        url = client.base_url
        if not isinstance(err, UpstreamTimeoutError):
            self._pool.report_failure(
                rid, f"{stage} ({url}): {err.message}", client=client,
                refused=connection_refused(err),
            )  # fmt: skip
        log.warning(
            "request %s (model %s) on replica %s (%s) failed while %s: %s",
            rreq.request_id,
            rreq.adapter or "<base>",
            rid,
            url,
            stage,
            err.message,
        )

    async def _pipe(
        self,
        request: web.Request,
        conn: UpstreamConn,
        rid: ReplicaId,
        client: VllmClient,
        rreq: RoutingRequest,
        path: str,
        t0: float,
        t_send: float,
        retries: int,
        hold: bool,
        routed: _Chosen,
    ) -> web.StreamResponse | None:
        """Relay a streaming answer chunk by chunk; never buffer it whole. What to relay of
        each read, and when, is the stream's :class:`StreamState` (whole lines only; the
        replica's own error event or abort relayed as is, a ``stream_error``; an unanswered
        stream's error event); this is the I/O around it.

        With ``hold`` (another replica could take the request), the head and the events that
        carry nothing of the output wait for the first one that does, and go out with it: the
        client's first byte comes with its first token, and until then nothing reached it. If
        the stream stops before any output (vLLM stopped: its ``[DONE]``, or an abort chunk
        without text; its engine's error event; the stream broke off or ended without
        ``[DONE]``, but for a read that timed out), the replica is out of rotation, nothing is
        sent and None is returned: the caller sends the request to another replica."""
        out = _RelayResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: conn.content_type or "text/event-stream",
                hdrs.CACHE_CONTROL: "no-cache",
                REPLICA_HEADER: rid,
                REQUEST_ID_HEADER: rreq.request_id,
            },
        )
        telemetry = self._telemetry
        state = StreamState(rid, hold)
        ended = counted = False
        done_out = False  # the stream's [DONE] went out: the client has the whole answer
        ttft_s: float | None = None
        unprepared = hold  # the response is prepared with the first bytes to relay
        # A write to the client may wait only while its socket's buffer holds bytes the
        # client did not take (``_may_wait``, inlined for the chunks): then it is bounded
        # (``_write``); the others (the client keeps up: the buffer is empty) go out with no
        # timer.
        transport = request.transport
        marks = _marks(transport)
        low, high = marks
        write_s = self._client_write_timeout_s
        try:
            if not hold:
                await out.prepare(request)
            head_waits = not hold  # (prepared: it goes out with the first bytes)
            timeout_s = self._stream_timeout_s
            while True:
                if head_waits and not conn.ready:
                    head_waits = False
                    try:
                        await out.write(b"")  # the head alone, unless it went out already
                    except ConnectionError:
                        counted = True
                        self._client_left(
                            rreq, path, rid, t0, retries, "the stream began",
                            routed=routed, streamed=True,
                        )  # fmt: skip
                        return out
                try:
                    chunk = await conn.read_chunk(timeout_s)
                except UpstreamError as exc:
                    if state.stopped_by(exc) and self._can_retry(rid, rreq):
                        # Broke off before it produced anything: nothing reached the client.
                        self._engine_stopped(rid, client, rreq, f"it {state.stopped}")
                        return None
                    # The stream's head (status 200, the replica header) is the client's:
                    # the log line and the metric name the replica, and so does the error event.
                    self._upstream_failed(
                        exc, rid, client, rreq, f"streaming (after {state.relayed} bytes)"
                    )
                    err = _broke_off(exc, rid, timeout_s)
                    if unprepared:  # what was held goes out first
                        unprepared = False
                        await out.prepare(request)
                    with contextlib.suppress(ConnectionError):
                        await _write(out, state.broke_off(err), transport, marks, write_s)
                    break
                last = conn.exhausted  # the answer's last bytes: the end of the body with them
                data = state.read(chunk, last) if chunk else state.end()
                if data is None:  # stopped before it produced anything
                    if self._can_retry(rid, rreq):  # nothing reached the client
                        self._engine_stopped(rid, client, rreq, f"it {state.stopped}")
                        return None
                    data = state.release(last)
                if state.warning:
                    self._stream_warning(rreq, rid, state)
                if not data:
                    if last:
                        break
                    continue
                if unprepared:
                    unprepared = False
                    await out.prepare(request)
                if ttft_s is None:
                    ttft_s = self._now() - t0
                    telemetry.observe_ttft(
                        rid, ttft_s, routed[0], rreq.adapter or "", rreq.tenant or ""
                    )
                try:
                    if last:
                        ended = True
                    if transport is not None and (
                        (size := transport.get_write_buffer_size()) > low or size + len(data) > high
                    ):  # the client is behind: the write may wait for it (bounded)
                        await _write(out, data, transport, marks, write_s, eof=last)
                    elif last:
                        await out.write_eof(data)
                    else:
                        await out.write(data)
                    if last:
                        break
                    done_out = state.done
                except ConnectionError as exc:
                    # The client went away (aiohttp refuses a write on a closing connection),
                    # or stopped reading (``_ClientStalled``: its connection was closed);
                    # releasing the unfinished connection closes it, which aborts the
                    # generation on the replica.
                    counted = True
                    if done_out:  # after the whole answer: bytes after [DONE] went unread
                        self._answered_then_left(
                            rreq, path, rid, t0, t_send, retries, ttft_s, state.outcome, routed
                        )
                        return out
                    self._client_left(
                        rreq, path, rid, t0, retries, f"streaming (after {state.relayed} bytes)",
                        ttft_s, state.outcome, routed=routed, streamed=True,
                        stalled=isinstance(exc, _ClientStalled),
                    )  # fmt: skip
                    return out
            if unprepared:  # nothing to relay at all: the head alone
                unprepared = False
                await out.prepare(request)
            now = self._now()  # (the stream's end: its latency and its whole duration)
            telemetry.observe_latency(rid, now - t_send)
            self._finished(
                rreq, path, rid, state.outcome, t0, retries, ttft_s, routed=routed, streamed=True,
                now=now,
            )  # fmt: skip
            counted = True
            if not ended:  # (else it went out with the last bytes)
                ended = True
                with contextlib.suppress(ConnectionError):
                    await _write(out, b"", transport, marks, write_s, eof=True)
        except asyncio.CancelledError:
            if not self._was_cut(_current_task()):
                # The client went away (aiohttp cancelled the handler).
                if not counted and done_out:
                    # After the whole answer, e.g. a client that stops reading at [DONE] and
                    # closes while the replica's last bytes (the body's end) are on their way.
                    self._answered_then_left(
                        rreq, path, rid, t0, t_send, retries, ttft_s, state.outcome, routed
                    )
                elif not counted:
                    self._client_left(
                        rreq, path, rid, t0, retries, f"streaming (after {state.relayed} bytes)",
                        ttft_s, state.outcome, routed=routed, streamed=True,
                    )  # fmt: skip
                raise
            if unprepared:
                # Cut at the shutdown deadline before anything was sent: 503 (retryable).
                self._finished(rreq, path, rid, "503", t0, retries, routed=routed, streamed=True)
                return error_response(_SHUTTING_DOWN, headers=self._headers(rreq, rid))
            if not ended:
                # Cut at the shutdown deadline: end the stream with an error event, cleanly.
                self._finished(
                    rreq, path, rid, "shutdown", t0, retries, ttft_s, routed=routed, streamed=True
                )
                with contextlib.suppress(ConnectionError):
                    await _write(out, state.closing(_SHUTTING_DOWN), transport, marks, write_s)
                    await _write(out, b"", transport, marks, write_s, eof=True)
            elif not counted:  # the whole answer is out but for its last write
                self._finished(
                    rreq, path, rid, state.outcome, t0, retries, ttft_s, routed=routed,
                    streamed=True,
                )  # fmt: skip
        return out

    @staticmethod
    def _stream_warning(rreq: RoutingRequest, rid: ReplicaId, state: StreamState) -> None:
        """Log what the stream's checks found (the replica ended it unfinished), once."""
        log.warning(
            "request %s (model %s) on replica %s: the replica %s",
            rreq.request_id,
            rreq.adapter or "<base>",
            rid,
            state.warning,
        )
        state.warning = ""


class _ClientStalled(ConnectionResetError):
    """A stream's client took nothing for ``limits.client_write_timeout_s`` while a write
    waited for it: its connection was closed (handled as a client that went away)."""


def _marks(transport: asyncio.Transport | None) -> tuple[int, int]:
    """``transport``'s write buffer water marks for :func:`_may_wait`: (low, high less room
    for a response head, which goes out with a stream's first bytes)."""
    if transport is None:
        return 0, 0
    low, high = transport.get_write_buffer_limits()
    return low, high - _HEAD_ROOM


def _may_wait(transport: asyncio.Transport, n: int, marks: tuple[int, int]) -> bool:
    """Whether writing ``n`` bytes to ``transport`` (:func:`_marks`: its buffer's water
    marks) may wait for the client to read. aiohttp's writes wait (drain) only while the
    transport has paused writing, which it does when its buffer goes above the high-water
    mark, until the buffer drops to the low one: so only if the buffer holds more than the
    low-water mark already, or this write may take it above the high one."""
    size = transport.get_write_buffer_size()
    return size > marks[0] or size + n > marks[1]


async def _write(
    out: web.StreamResponse,
    data: bytes,
    transport: asyncio.Transport | None,
    marks: tuple[int, int],
    timeout_s: float,
    *,
    eof: bool = False,
) -> None:
    """Write ``data`` to a stream's client (and end the body with ``eof``). A write that may
    wait for the client to read (:func:`_may_wait`) waits as long as the client takes some of
    what it owes (:func:`_unsent` goes down) at least once every ``timeout_s``, as nginx's
    send_timeout; else the connection is closed (aborted: its buffered bytes are dropped) and
    :class:`_ClientStalled` raised. (Not the whole wait: it lasts until the transport's buffer
    is down to its low-water mark, for which the socket's send queue, megabytes, must make
    room first; a client that reads slower than the stream, however steadily, may take
    longer than ``timeout_s`` for that, and was cut as one that read nothing.)"""
    if transport is None or not _may_wait(transport, len(data), marks):
        await (out.write_eof(data) if eof else out.write(data))
        return
    await _bounded(out.write_eof(data) if eof else out.write(data), transport, timeout_s)


async def _bounded(write: Awaitable[None], transport: asyncio.Transport, timeout_s: float) -> None:
    """Await ``write`` (a write to ``transport``'s client that may wait for it to read) as
    long as the client takes some of what it owes at least once every ``timeout_s``
    (:func:`_write`)."""
    loop = asyncio.get_running_loop()
    fd = _fileno(transport)
    owed = 0
    timer: asyncio.Handle
    try:
        async with asyncio.timeout(None) as deadline:

            def check() -> None:
                nonlocal owed, timer
                now_owed = _unsent(transport, fd)
                if now_owed < owed:  # the client took some since the last check
                    owed = now_owed
                    timer = loop.call_later(timeout_s, check)
                else:
                    deadline.reschedule(loop.time())  # (times out at once)

            def start() -> None:
                # Run once the write handed its bytes to the transport and waits.
                nonlocal owed, timer
                owed = _unsent(transport, fd)
                timer = loop.call_later(timeout_s, check)

            timer = loop.call_soon(start)
            try:
                await write
            finally:
                timer.cancel()
    except TimeoutError:
        transport.abort()
        raise _ClientStalled("the client took nothing in time") from None


class _Answer(web.Response):
    """A whole (non-streamed) answer whose write to the client is bounded as a stream's
    (:func:`_write`: ``limits.client_write_timeout_s`` without the client taking any of it).
    Before, an answer larger than the socket's buffers to a client that never read held its
    connection and aiohttp's handler task until the client closed (its lease and in-flight
    count were released already). A stalled client's connection is closed (aiohttp then
    handles it as a client that went away)."""

    def __init__(
        self, transport: asyncio.Transport | None, timeout_s: float, body: bytes, **kwargs: Any
    ) -> None:
        super().__init__(body=body, **kwargs)
        self._transport = transport
        self._write_timeout_s = timeout_s
        self._size = len(body)

    async def write_eof(self, data: bytes = b"") -> None:
        transport, size = self._transport, self._size
        if transport is None or not _may_wait(transport, size, _marks(transport)):
            await super().write_eof(data)
            return
        try:
            await _bounded(super().write_eof(data), transport, self._write_timeout_s)
        except _ClientStalled:
            log.debug(
                "request %s: its client took nothing of its answer (%d bytes) for %g s "
                "(limits.client_write_timeout_s): its connection was closed",
                self.headers.get(REQUEST_ID_HEADER, "?"), size, self._write_timeout_s,
            )  # fmt: skip
            raise


def _fileno(transport: asyncio.Transport) -> int | None:
    """The file descriptor of ``transport``'s socket (None: none known)."""
    sock = transport.get_extra_info("socket")
    try:
        return None if sock is None else int(sock.fileno())
    except (OSError, ValueError):
        return None


def _unsent(transport: asyncio.Transport, fd: int | None) -> int:
    """The bytes written to ``transport`` that its client has not taken yet: those in its
    buffer and those in its socket's send queue not acknowledged (``TIOCOUTQ``, Linux; 0
    where the socket does not say). While a write waits, nothing is added: it goes down only
    as the client reads."""
    queued = 0
    if fd is not None:
        with contextlib.suppress(OSError):
            queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return transport.get_write_buffer_size() + queued


def _model_named(body: bytes) -> str | None:
    """The ``model`` a request body names, read again for a request refused before routing:
    ``""`` if it names none (vLLM serves the base model); None if the body is empty, no JSON
    object, or its ``model`` no string."""
    if not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # (nested too deep: refused as vLLM refuses it)
        return None
    if not isinstance(payload, dict):
        return None
    model = payload.get("model")
    if model is None:
        return ""
    return model if isinstance(model, str) else None


def _broke_off(exc: UpstreamError, rid: ReplicaId, timeout_s: float) -> UpstreamError:
    """The error event's error of a stream whose read failed with ``exc``: a silence past
    ``timeout_s`` (``limits.stream_read_timeout_s``) is a timeout (``upstream_timeout``, as a
    non-streaming request's), anything else a break (``upstream_unavailable``)."""
    if isinstance(exc, UpstreamTimeoutError):
        return UpstreamTimeoutError(
            f"replica {rid} {exc.message}: its stream was silent for {timeout_s:g} s"
        )
    return UpstreamConnectError(f"replica {rid} broke off the stream: {exc.message}")


class _RefusedEverywhere(AdapterLoadError):
    """Every candidate replica refused the adapter's load: its message names each one."""


def _for_client(exc: UpstreamError, rid: ReplicaId, loading: str | None) -> UpstreamError:
    """``exc`` as the client sees it: the replica named by its id, not its URL. The words of
    ``backends.upstream`` (the proxied request) and of vLLM's load refusals carry no URL;
    those of a failed admin call do (aiohttp's), so they are left to the log."""
    if isinstance(exc, _RefusedEverywhere):
        return exc  # names every replica already
    if isinstance(exc, AdapterLoadError):
        return AdapterLoadError(f"replica {rid}: {exc.message}", status=exc.status)
    if isinstance(exc, ReplicaStoppingError):  # names the replica already (no URL)
        return exc
    if isinstance(exc, ReplicaStoppedError):  # (its words carry no URL; they name the load)
        return ReplicaStoppedError(f"replica {rid}: {exc.message}")
    if loading is not None:
        if isinstance(exc, UpstreamTimeoutError):  # (the request itself was not sent)
            return AdapterLoadTimeoutError(
                f"replica {rid}: loading adapter {loading!r} did not finish in time"
            )
        return type(exc)(f"replica {rid}: could not be reached to load adapter {loading!r}")
    return type(exc)(f"replica {rid}: {exc.message}")


def _logged_note(note: str) -> str:
    """``note`` for the access log: on one line, control characters escaped (``\\n``,
    ``\\x00``), cut at ``_LOGGED_NOTE_CHARS`` (then ``...``), as ``model=`` is."""
    cut = note[:_LOGGED_NOTE_CHARS]
    escaped = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], cut)
    return escaped + ("..." if len(cut) < len(note) else "")
