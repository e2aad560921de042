"""Request ids: one generator per gateway app, and the ids of the gateway's own endpoints.

Every HTTP answer of the gateway carries ``X-Request-Id``: the client's when it is safe (1-128
printable ASCII characters without spaces: anything else could forge or break log lines, and
is replaced), else one this instance generates (``<12 random hex of this instance>-<count>``:
unique across instances and restarts). :class:`RequestIds` is the one generator of an app:
the completion endpoints (``gateway.proxy``, which keep their own inline copy of
:meth:`RequestIds.of` on the hot path, sharing the prefix and the count), the other routes
(:func:`with_request_id`, which wraps each of their handlers: the completion path pays
nothing for it, as it would for an aiohttp middleware or ``on_response_prepare`` hook, which
run for every request), aiohttp's answers to requests it could not parse or whose handler
raised (``gateway.protocol_errors``), and the pool's own admin calls (``backends.pool_loads``,
``backends.pool_unloads``).

Each request also has an *upstream* id, the start of every id the gateway sends a replica on
its behalf: its own id when generated, ``<client id>-<generated>`` for a client's (clients may
reuse theirs; what the gateway sends must not collide). A completion's try ``n`` is sent as
``<upstream id>-<n>``, the adapter load it waits for (when it starts one) as
``<upstream id>-<n>-load``; an admin registration's loads as ``<upstream id>-load-<k>``
(``k``: the replicas asked in turn) and a deletion's unloads as ``<upstream id>-unload-<k>``.
vLLM 0.32 does not read ``X-Request-Id`` on ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (its ``--enable-request-id-headers`` only echoes it in the
answer): these ids are for the gateway's own log lines and for proxies or meshes in front of
the replicas that log the header.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
# A client's id that may be used as is (logged, echoed, sent on): 1-128 printable ASCII
# characters without spaces.
client_id_ok = re.compile(r"[!-~]{1,128}").fullmatch

# The ids of a request the gateway's own endpoints handle (set by :func:`with_request_id`).
REQUEST_ID = web.RequestKey("loragate.request_id", str)
UPSTREAM_ID = web.RequestKey("loragate.upstream_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestIds:
    """This instance's request-id generator: a random prefix and a count."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6) + "-"
        self.count = itertools.count(1)

    def new(self) -> str:
        """A fresh id (``<prefix>-<n>``)."""
        return self.prefix + str(next(self.count))

    def of(self, sent: str | None) -> tuple[str, str]:
        """(the request's id, its upstream id) for a request whose client sent ``sent`` as
        its ``X-Request-Id`` (None: none)."""
        own = self.new()
        if sent is None or not client_id_ok(sent):
            return own, own
        return sent, f"{sent}-{own}"


def request_id_of(request: web.BaseRequest, ids: RequestIds) -> str:
    """``request``'s id: the one :func:`with_request_id` gave it, else the client's if safe,
    else a new one (a request aiohttp answers itself: see ``gateway.protocol_errors``)."""
    given: str | None = request.get(REQUEST_ID)
    if given is not None:
        return given
    sent = request.headers.get(REQUEST_ID_HEADER)
    return sent if sent is not None and client_id_ok(sent) else ids.new()


def with_request_id(ids: RequestIds, handler: Handler) -> Handler:
    """``handler`` with request ids: the request's (``request[REQUEST_ID]``, and
    ``request[UPSTREAM_ID]``) set before it runs, and in its answer's ``X-Request-Id``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id, upstream_id = ids.of(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = request_id
        request[UPSTREAM_ID] = upstream_id
        response = await handler(request)
        if not response.prepared:  # (a streamed answer sets it itself before it starts)
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return handle
