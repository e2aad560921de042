"""The admin API's replica endpoints: ``GET /admin/replicas``, ``GET /admin/replicas/R`` and
``POST``/``DELETE /admin/replicas/R/drain`` (what they answer: ``gateway.admin``).

A replica this instance's config has is answered in full. One it does not have but the shared
state knows (another instance's config registered it, this one's did before a reload removed
it, or it is drained) is answered too, from the shared state alone (``configured_here:
false``): a drain is shared, and outlives a replica's removal from a config, so any instance
can show it, set it and end it, and tell the requests still running there."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from loragate.core.errors import NotFoundError
from loragate.core.types import ReplicaSettings, ReplicaSnapshot
from loragate.gateway.admin_common import json_response, log, state_unavailable
from loragate.gateway.request_ids import REQUEST_ID
from loragate.gateway.route_errors import method_not_allowed

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway

_NEVER_SCRAPED = ReplicaSnapshot(replica_id="", url="").scraped_at_s
_REPLICA_PATH = "/admin/replicas/"  # then the id, as GET /admin/replicas/{id:.+} reads it
_DRAIN = "/drain"
# What the path of POST/DELETE /admin/replicas/{id:.+}/drain takes (unless it is a replica's).
DRAIN_METHODS = (hdrs.METH_DELETE, hdrs.METH_POST)


def _is_drain_id(rid: str) -> bool:
    return rid.endswith(_DRAIN) and len(rid) > len(_DRAIN)


def _known(gw: Gateway, rid: str) -> bool:
    """Whether this instance's config has the replica or the shared state knows it."""
    return (
        gw.pool.has_replica(rid)
        or rid in gw.shared.drains()
        or gw.shared.registered_replica(rid) is not None
    )


def drain_path_only(gw: Gateway, path: str) -> bool:
    """Whether ``path`` (decoded) is ``/admin/replicas/R/drain`` for no replica of id
    ``R/drain``: the drain endpoint's path, which takes ``DRAIN_METHODS`` only, although the
    route ``GET /admin/replicas/{id:.+}`` matches it too (and answers 405 there)."""
    if not path.startswith(_REPLICA_PATH):
        return False
    rid = path[len(_REPLICA_PATH) :]
    return _is_drain_id(rid) and not _known(gw, rid)


class ReplicaAdmin:
    """Handlers of ``/admin/replicas*`` for one gateway (bound methods, behind the guard)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def replicas(self, _: web.Request) -> web.Response:
        gw = self._gw
        pool = gw.pool
        unknown = pool.unknown_adapters()
        out = [self._replica_json(snap, unknown) for snap in pool.snapshots()]
        elsewhere = [
            self._unconfigured_json(rid)
            for rid in sorted(gw.shared.drains())
            if not pool.has_replica(rid)
        ]
        return json_response(
            {
                "replicas": out,
                "drained_not_configured": elsewhere,
                "policy": gw.policy.name,
                "state": gw.shared.status(),
            }
        )

    async def replica(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        if _is_drain_id(rid) and not _known(self._gw, rid):
            # The path of POST/DELETE .../drain, asked with GET (or HEAD), for no replica of
            # that whole id (which may hold a slash): the drain endpoint, whose 405 it gets.
            return method_not_allowed(request, DRAIN_METHODS)
        return json_response(self._json(rid))

    async def drain(self, request: web.Request) -> web.Response:
        return await self._drain(request, request.match_info["id"], on=True)

    async def undrain(self, request: web.Request) -> web.Response:
        return await self._drain(request, request.match_info["id"], on=False)

    async def _drain(self, request: web.Request, rid: str, *, on: bool) -> web.Response:
        """Drain (``on``) or undrain a replica of this instance's config, in the state store
        (shared; refused while it is degraded, as the adapter writes are)."""
        gw = self._gw
        what = f"{'drain' if on else 'undrain'} replica {rid!r}"
        async with gw.lock:  # no reload removes the replica meanwhile
            self._check_known(rid)
            if gw.shared.degraded:
                return state_unavailable(request, what, check="GET /admin/replicas")
            changed = await (gw.shared.drain(rid) if on else gw.shared.undrain(rid))
            if gw.shared.degraded:  # Redis went away during the write
                return state_unavailable(request, what, during=True, check="GET /admin/replicas")
            if changed:
                log.info(
                    "admin: request %s: replica %s %s", request[REQUEST_ID], rid,
                    "drained: no new requests are routed there (every instance)" if on
                    else "undrained: it gets requests again (every instance)",
                )  # fmt: skip
            return json_response(self._json(rid))

    def _check_known(self, rid: str) -> None:
        """404 unless this instance's config has the replica or the shared state knows it."""
        if not _known(self._gw, rid):
            raise NotFoundError(
                f"replica {rid!r} does not exist (GET /admin/replicas lists them)", param="id"
            )

    def _json(self, rid: str) -> dict[str, Any]:
        self._check_known(rid)
        pool = self._gw.pool
        if pool.has_replica(rid):
            return self._replica_json(pool.snapshot(rid))
        return self._unconfigured_json(rid)

    def _unconfigured_json(self, rid: str) -> dict[str, Any]:
        """A replica this instance's config does not have, as the shared state shows it."""
        gw = self._gw
        record = gw.shared.registered_replica(rid)
        since = gw.shared.drains().get(rid)
        return {
            "id": rid,
            "configured_here": False,
            "url": record.url if record is not None else None,
            "draining": since is not None,
            "draining_for_s": _draining_for_s(since),
            "in_flight": gw.shared.in_flight_of(rid),
            "in_flight_here": gw.inflight.count(rid),
            "drain_not_seen_by": gw.shared.drain_not_seen_by(rid),
        }

    def _replica_json(
        self, snap: ReplicaSnapshot, unknown: Mapping[str, Mapping[str, str | None]] | None = None
    ) -> dict[str, Any]:
        """``unknown``: ``ReplicaPool.unknown_adapters()`` (None: asked here)."""
        gw = self._gw
        pool, shared = gw.pool, gw.shared
        rid = snap.replica_id
        res = shared.residency_of(rid)
        since = shared.drains().get(rid)
        draining = pool.is_draining(rid)
        configured = pool.configured_settings(rid) if pool.has_replica(rid) else None
        now = pool.clock.now()
        return {
            "id": rid,
            "configured_here": True,
            "url": snap.url,
            "healthy": snap.healthy,
            "last_error": pool.last_error(rid) if pool.has_replica(rid) else None,
            # Polls in a row that timed out; poller.timeouts_to_unhealthy of them take it out.
            "poll_timeouts_in_a_row": pool.poll_timeouts_in_a_row(rid),
            # Said it is shutting down while /health says 200 (vLLM's drain): how long it may
            # stay out yet (a failed poll ends it first); None: not held.
            "stopping_hold_left_s": _rounded(pool.stopping_for_s(rid))
            if pool.has_replica(rid)
            else None,
            # What routing and the shadow residency use: the config's settings, with vLLM's
            # reported max_lora in place of the configured max_loras (the running server's).
            "settings": _settings_json(snap.settings),
            # The config's ``settings:`` (None: not given: vLLM's defaults are assumed).
            "settings_configured": _settings_json(configured) if configured else None,
            # What vLLM reports (vllm:lora_requests_info's max_lora; None: not reported, as
            # before the server ran its first request, or without --enable-lora).
            "settings_reported": {"max_loras": pool.reported_max_loras(rid)}
            if pool.has_replica(rid)
            else {"max_loras": None},
            # Found serving no adapters (no --enable-lora, no runtime loading): why, and when
            # it is checked again; None: it serves adapters.
            "lora_off": _lora_off_json(pool.lora_off_of(rid)) if pool.has_replica(rid) else None,
            "num_running": snap.num_running,
            "num_waiting": snap.num_waiting,
            "num_deferred": snap.num_deferred,
            "kv_usage": snap.kv_usage,
            "active_adapters": sorted(snap.active_adapters),
            "draining": draining,
            "draining_for_s": _draining_for_s(since) if draining else None,
            "in_flight": shared.in_flight_of(rid),
            "in_flight_here": gw.inflight.count(rid),
            "drain_not_seen_by": shared.drain_not_seen_by(rid) if draining else [],
            "adapter_loads_here": pool.adapter_loads().get(rid, 0),
            "adapter_loads_under_way_here": sorted(pool.loading(rid)),
            "refused_adapters": {
                name: {"error": error, "expires_in_s": round(left_s, 1)}
                for name, (error, left_s) in sorted(pool.refused_adapters(rid).items())
            }
            if pool.has_replica(rid)
            else {},
            # Registered there, not served by this gateway (gateway.unknown_adapters).
            "unknown_registered": sorted(
                (pool.unknown_adapters() if unknown is None else unknown).get(rid, {})
            ),
            "residency": {
                "registered": sorted(res.registered),
                "gpu": list(res.gpu),
                "cpu": list(res.cpu),
            },
            "seconds_since_scrape": _seconds_since_scrape(now, snap),
        }


def _settings_json(settings: ReplicaSettings) -> dict[str, Any]:
    return {
        "max_loras": settings.max_loras,
        "max_cpu_loras": settings.max_cpu_loras,
        "max_lora_rank": settings.max_lora_rank,
        # Said in its config (routing keeps higher ranks off it), or vLLM's default.
        "max_lora_rank_known": settings.max_lora_rank_known,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
    }


def _lora_off_json(off: tuple[str, str, float] | None) -> dict[str, Any] | None:
    if off is None:
        return None
    cause, answer, check_in_s = off
    return {"cause": cause, "answer": answer, "checked_again_in_s": round(check_in_s, 1)}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _draining_for_s(since: float | None) -> float | None:
    """How long ago the drain began (the draining instance's clock), or None."""
    return None if since is None else round(max(0.0, time.time() - since), 1)


def _seconds_since_scrape(now: float, snap: ReplicaSnapshot) -> float | None:
    """How old the replica's engine figures are; None if it was never scraped (its snapshot
    keeps ``ReplicaSnapshot``'s default time, 0.0, until a poll succeeds: ``now`` minus that
    would be the machine's uptime)."""
    if snap.scraped_at_s == _NEVER_SCRAPED:
        return None
    return round(now - snap.scraped_at_s, 3)
