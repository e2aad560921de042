"""What the replica pool's modules share: :class:`ReplicaEntry`, the pool's record of one
replica (its client, latest snapshot, registered adapters and their paths, health counters,
shutting-down hold, LoRA-off mark, the future its load waiters wait on); the
:class:`PoolListener` protocol (the gateway's shared state hears the pool through it); the
errors the pool raises of its own (:class:`ReplicaRetiredError`, :class:`ReplicaStoppingError`,
:class:`ReplicaServesNoAdaptersError`); and the constants :data:`POLL_FAILURE_REASONS` and
:data:`STOPPING_HOLD_S`; :class:`LoadOrder`, one adapter load as the pool's load functions pass
it on. The pool itself: ``backends.pool``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Collection
from typing import Protocol

from loragate.backends.client import ModelCard, VllmClient
from loragate.backends.lora_off import (
    LoraOff,
)
from loragate.backends.refusals import RefusalSink
from loragate.core.config import ReplicaConfig
from loragate.core.errors import (
    AdapterLoadError,
    UpstreamConnectError,
)
from loragate.core.types import AdapterSpec, ReplicaId, ReplicaSnapshot

# Why a poll failed (``ReplicaPool.on_poll_failed``; loragate_replica_poll_failures_total).
POLL_FAILURE_REASONS = ("connect", "timeout", "bad_response", "wrong_model")


class ReplicaRetiredError(UpstreamConnectError):
    """A config reload removed or replaced the replica's entry while a request waited for an
    adapter load there: the request is routed again (not a failure of the replica)."""


# How long at most a replica that said it is shutting down stays out of rotation while its polls
# succeed (``backends.pool_health``; a poll that finds it gone ends the hold first). vLLM's
# drain lasts up to its --shutdown-timeout; past the hold a request refused again costs one
# retry and holds it again.
STOPPING_HOLD_S = 30.0


class ReplicaStoppingError(UpstreamConnectError):
    """The replica answered an adapter load that it is shutting down (vLLM's 500 "Server
    shutting down" while it drains, or its engine-dead 500): nothing was loaded, and it takes
    no new work; not a refusal of the adapter."""


class ReplicaServesNoAdaptersError(AdapterLoadError):
    """The replica refused an adapter load for a reason of its own, not the adapter's (no
    ``--enable-lora``; no ``/v1/load_lora_adapter`` route: ``backends.lora_off``): it is
    marked as serving no adapters, and no refusal of the adapter is recorded."""


class PoolListener(RefusalSink, Protocol):
    """Told about what the pool learns (the gateway keeps the shared state with it), and
    where the pool's adapter-load refusals are shared."""

    async def replica_polled(
        self,
        snapshot: ReplicaSnapshot,
        *,
        models_seen: bool,
        loading: frozenset[str] = frozenset(),
    ) -> None:
        """A poll finished. ``models_seen``: ``/v1/models`` answered, and
        ``snapshot.residency.registered`` is the registered set it gave (plus adapters this
        gateway loaded while the poll ran). ``loading``: adapters this gateway's admin loads
        are still registering on the replica (a poll cannot list them yet)."""
        ...

    async def adapter_loaded(self, replica_id: ReplicaId, adapter: str) -> None:
        """A load (``ensure_adapter``: for a request routed there, an admin registration, an
        in-place reload) succeeded: the replica answered 200, so vLLM activated the adapter
        (a GPU slot). Not called when the replica answered that it had the adapter already:
        that load did nothing there (the adapter stays where it was)."""
        ...

    async def adapter_unloaded(self, replica_id: ReplicaId, adapter: str) -> None: ...

    def replica_stopping(self, replica_id: ReplicaId, error: str, hold_s: float) -> None:
        """The replica answered that it is shutting down (``error``; :meth:`ReplicaPool.
        report_stopping`): held out of rotation here for ``hold_s`` at most. Told
        synchronously (the listener queues what it shares)."""
        ...

    def replica_stopping_ended(self, replica_id: ReplicaId) -> None:
        """A poll found the held replica gone: its hold ended here."""
        ...

    def retired_adapters(self) -> Collection[str]:
        """Adapters deleted through the admin API lately (their tombstones): a replica that
        still lists one, and that the catalog does not serve (again), gets it unloaded."""
        ...

    def paths_in_force(self, adapter: str) -> Awaitable[frozenset[str]] | None:
        """Asked before the poller reloads in place an adapter a replica holds from another
        path than the catalog's: the paths it may be held from for every gateway instance on
        the shared state (the shared registry's definition, which this instance's catalog
        takes up to a refresh later, and the new path a ``PUT`` of another instance is
        reloading it from): a replica holding it from one of those is not reloaded back.
        None: nothing is shared (the catalog is the registry)."""
        ...

    async def still_retired(self, adapter: str) -> bool:
        """Asked just before such an unload: whether ``adapter`` is still deleted in the
        shared registry itself, not only in this instance's view of it (which lags by up to
        a refresh: another instance may have registered the name again since, and loaded it
        on the replica). False: registered again (the catalog takes it up): not unloaded."""
        ...


@dataclasses.dataclass(slots=True)
class ReplicaEntry:
    config: ReplicaConfig
    client: VllmClient | None = None
    snapshot: ReplicaSnapshot | None = None
    registered: set[str] = dataclasses.field(default_factory=set)
    loaded_at_s: dict[str, float] = dataclasses.field(default_factory=dict)
    failures: int = 0
    timeouts: int = 0  # polls in a row that timed out (poller.timeouts_to_unhealthy)
    last_error: str | None = None
    answered: bool = False  # a poll has succeeded at least once
    # Said it is shutting down (:meth:`ReplicaPool.report_stopping`): out of rotation until a
    # poll fails or this time (the pool's clock) passes; None: not held.
    stopping_until: float | None = None
    # Its polls time out (``_stopped_answering``): what was said of the watches of its requests
    # since its last answer (each said once a run: a slow replica is watched at every poll).
    watch_said: bool = False
    spared_said: bool = False
    # Adapter -> the path the replica registered it from (its /v1/models card's ``root``, or
    # the path of this gateway's load since the poll that listed it began).
    roots: dict[str, str] = dataclasses.field(default_factory=dict)
    # Adapter -> the other path the replica holds it from (not the configured one): these are
    # left out of ``registered`` until an in-place reload succeeds.
    stale: dict[str, str] = dataclasses.field(default_factory=dict)
    # Adapter -> the configured path whose in-place reload failed (polls do not retry it).
    inplace_failed: dict[str, str] = dataclasses.field(default_factory=dict)
    # The base model's card in the replica's last /v1/models that listed it (root, max_model_len).
    base_card: ModelCard | None = None
    # Found serving no adapters (``backends.lora_off``): why, and when it is checked again.
    lora_off: LoraOff | None = None
    # Its /metrics hinted at no --enable-lora and the check load said otherwise: not checked
    # again for the hint until a poll fails (it may restart with other flags).
    lora_hint_checked: bool = False
    # vLLM's max_lora (vllm:lora_requests_info) at its last successful poll (None: not
    # reported), and the one that differed from the config, as last said.
    reported_max_loras: int | None = None
    said_max_loras: int | None = None
    # The requests waiting for adapter loads here wait on this too (made by the first of them):
    # set, they stop waiting (:meth:`ReplicaPool._wake_load_waiters`: the replica stopped
    # listening, or a reload retired this entry), with the error class and the reason.
    wake: asyncio.Future[tuple[type[UpstreamConnectError], str]] | None = None


@dataclasses.dataclass(frozen=True, slots=True, eq=False, kw_only=True)
class LoadOrder:
    """One adapter load, as ``backends.pool_loads`` starts it, times it and sends it: what to
    load (``spec``, from ``spec.path``), where (``rep``), how (``inplace``: with
    ``load_inplace: true`` even if the replica holds it from ``spec.path`` already) and for
    whom, for its log lines: ``request_id`` the gateway request it is for (None: ``by``, e.g.
    the poller), ``load_id`` the ``X-Request-Id`` the load call carries, ``refusal_outlook``
    what a refusal means for the adapter's requests (None: what it means for requests routed
    there)."""

    rep: ReplicaEntry
    spec: AdapterSpec
    load_id: str | None = None
    request_id: str | None = None
    refusal_outlook: str | None = None
    by: str = "the gateway"
    inplace: bool = False

    @property
    def key(self) -> tuple[str, ReplicaId]:
        """The single-flight key of the load: (adapter, replica)."""
        return self.spec.name, self.rep.config.replica_id
