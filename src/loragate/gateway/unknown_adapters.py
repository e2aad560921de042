"""Adapters the replicas hold registered that this gateway does not serve, and the one WARNING
that names them after start-up.

The usual cause: adapters registered through ``POST /admin/adapters`` with the embedded state
store (``state.backend: memory``, the default), which keeps registrations in the gateway's
process only. After a restart the catalog has the config file's adapters alone, the replicas
still hold the others, and every request for one gets vLLM's 404 ("The model ... does not
exist") that looks like the client's mistake. So once the replicas have answered their first
poll (at start-up, or later for one that was down then) the gateway logs one WARNING listing
them (the first :data:`LISTED` and how many more) with what to do, and ``GET
/admin/adapters`` (top-level ``unknown_registered``) and ``GET /admin/replicas`` (each
replica's ``unknown_registered``) show them.

They are not adopted into the catalog, although each card's ``root`` gives the path: the
tenants allowed to use them are not on the replica, and an adapter without tenants is open to
every tenant, so adopting a customer's adapter would serve it to every other customer; an
adapter an operator loaded by hand (``--lora-modules``) would become served through the
gateway without anyone asking. The operator registers them again (or adds them to the config
file) with the tenants they had.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from loragate.core.types import ReplicaId

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway

log = logging.getLogger(__name__)

# How many adapters the WARNING names (then: "and N more").
LISTED = 10

EMBEDDED_HINT = (
    "registered through POST /admin/adapters before this gateway restarted? The embedded "
    "state store (state.backend: memory) keeps registrations in the gateway's process only: "
    "register them again (POST /admin/adapters, with their tenants), add them to the config "
    "file, or use state.backend: redis"
)
SHARED_HINT = (
    "the shared state store does not have them either: loaded on the replicas outside "
    "loragate (--lora-modules, or by hand), or registered on a Redis that lost its data; "
    "register them (POST /admin/adapters, with their tenants) or add them to the config file "
    "to serve them"
)


def by_adapter(
    unknown: Mapping[ReplicaId, Mapping[str, str | None]],
) -> dict[str, dict[ReplicaId, str | None]]:
    """``ReplicaPool.unknown_adapters``' answer turned around: adapter -> replica -> path."""
    out: dict[str, dict[ReplicaId, str | None]] = {}
    for rid, held in unknown.items():
        for name, root in held.items():
            out.setdefault(name, {})[rid] = root
    return dict(sorted(out.items()))


def unknown_json(unknown: Mapping[ReplicaId, Mapping[str, str | None]]) -> list[dict[str, Any]]:
    """``GET /admin/adapters``' ``unknown_registered``: one entry per adapter."""
    return [
        {"name": name, "registered_on": sorted(where), "paths": dict(sorted(where.items()))}
        for name, where in by_adapter(unknown).items()
    ]


def describe(adapters: Mapping[str, Mapping[ReplicaId, str | None]]) -> str:
    """The first :data:`LISTED` adapters (where, from which path) and how many more."""
    parts = []
    for name, where in list(adapters.items())[:LISTED]:
        paths = sorted({p for p in where.values() if p})
        part = f"{name} (on {', '.join(sorted(where))}"
        part += f", from {', '.join(paths)})" if paths else ")"
        parts.append(part)
    more = len(adapters) - LISTED
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


class UnknownAdapterWarning:
    """Logs the WARNING (see the module docstring) once for the replicas that answered their
    first poll by start-up, then once more for each replica that answers for the first time
    later, naming only adapters not named before. Not before the shared state has been read
    once (started with Redis unreachable: at the first sync), so that adapters registered in
    Redis are not named."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._checked: set[ReplicaId] = set()
        self._named: set[str] = set()
        self._deferred = False

    def check(self) -> None:
        shared = self._gw.shared
        if not shared.synced:
            # Started with Redis unreachable: the catalog lacks the adapters registered there,
            # so they would be named (and "the shared state store does not have them" would be
            # false). Checked at the first sync instead (``watch``), naming only those unknown.
            if not self._deferred:
                self._deferred = True
                log.info(
                    "the shared state store has not been read yet (unreachable): the check for "
                    "adapters the replicas hold but the catalog lacks waits for it"
                )
            return
        shared.check_adapters()  # the catalog as just read (before the maintenance loop does)
        pool = self._gw.pool
        newly = [
            rid for rid in pool.replica_ids if rid not in self._checked and pool.has_answered(rid)
        ]
        if not newly:
            return
        self._checked.update(newly)
        unknown = pool.unknown_adapters()
        fresh = {
            name: where
            for name, where in by_adapter({r: unknown[r] for r in newly if r in unknown}).items()
            if name not in self._named
        }
        if not fresh:
            return
        self._named.update(fresh)
        hint = EMBEDDED_HINT if self._gw.shared.embedded else SHARED_HINT
        log.warning(
            "replicas hold %d adapter(s) registered that this gateway does not serve (requests "
            "for them get a 404: the model does not exist): %s. %s. They are not adopted: their "
            "tenants are unknown, and an adapter without tenants is open to every tenant. GET "
            "/admin/adapters lists them (unknown_registered)",
            len(fresh), describe(fresh), hint,
        )  # fmt: skip

    async def watch(self, interval_s: float) -> None:
        """:meth:`check` every ``interval_s`` (for replicas that answer their first poll after
        start-up, or join through a reload); cancelled at cleanup."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.check()
            except Exception:  # never let it die; nothing here is worth a traceback loop
                log.exception("checking the replicas for unknown adapters failed")
                return
