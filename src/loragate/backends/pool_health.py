"""The replica pool's health: which replicas may get traffic.

Health: a replica is taken out of rotation after ``failures_to_unhealthy`` failed polls in a
row (a poll that timed out counts only once ``timeouts_to_unhealthy`` polls in a row timed out:
on a busy host a healthy replica may miss the poll timeout now and then), or at once when the
gateway reports a failed connection, or while its ``/v1/models`` does not list the base model
(``base_model``: a replica started without the right ``--served-model-name`` would answer every
base-model request with a 404); one successful poll brings it back.

A replica that says it is shutting down while its ``/health`` still answers 200 (vLLM 0.32's
drain under ``--shutdown-timeout N``: its 500 "cannot schedule new futures after shutdown" to a
new request, "Server shutting down" to a load; ``backends.engine_failures``) is held out of
rotation (:meth:`ReplicaPool.report_stopping`): unhealthy, ``last_error`` saying so, while its
polls succeed, until a poll finds it gone (:func:`poll_found_gone`: refused, reset, an error
status; the next poll that succeeds is the server back, a new process at its URL) or
``stopping_hold_s`` (:data:`STOPPING_HOLD_S`) passes, whichever comes first. A poll that timed
out ends no hold (the replica may only be slow to answer). The bound keeps a replica that
answered so without going away (a URL in front of several servers, one of them draining) from
being lost for good: past it, a successful poll brings it back, and a new request refused the
same way holds it again (one retry elsewhere per hold). The hold is shared by the gateway
instances on one state store: the listener hears of each (``replica_stopping``) and of each end
by a poll that found the replica gone (``replica_stopping_ended``), and hands the shared holds
back (:meth:`ReplicaPool.adopt_stopping`), so another instance holds the replica from its next
refresh on, without a retry of its own, and a poll of any instance that finds the replica gone
ends the hold for all. A load it answers so is not a refusal of the adapter (none is
recorded): the requests waiting for it fail with :class:`ReplicaStoppingError` (the proxy
retries them elsewhere as a load that failed).

Draining (``POST /admin/replicas/{id}/drain``, shared by every gateway instance through the
listener's state): :meth:`ReplicaPool.set_draining` names the replicas that get no new
requests. They are polled as before (health, residency, in-place reloads, tombstone unloads)
and keep their requests and adapter loads under way, but :meth:`ReplicaPool.healthy_snapshots`
(the replicas that may get traffic) leaves them out, so the proxy neither routes nor retries
there, and the admin API loads no newly registered adapter there. A drain outlives the
replica's place in the pool: one a reload removes and adds back under its id is drained still
(until the drain is ended), as other instances sharing the drain may route there meanwhile.
A drained replica whose polls fail goes out of rotation as any other (the same health state
and metrics), but its line is INFO, ``drained replica r0 is down (expected during a restart):
...``, not the WARNING ``replica r0 is unhealthy: ...``: a drain ahead of a restart is how a
rolling restart is planned.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Collection, Mapping

from loragate.backends.client import VllmClient
from loragate.backends.pool_state import PoolState
from loragate.backends.pool_types import ReplicaEntry
from loragate.core.errors import (
    NoReplicaAvailableError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from loragate.core.types import ReplicaId, ReplicaSnapshot

# One logger for the whole pool (its modules split one concept): operators' log filters and
# the tests name ``loragate.backends.pool``.
log = logging.getLogger("loragate.backends.pool")


class PoolHealth(PoolState):
    """Taking replicas out of rotation and bringing them back: failed polls and connections,
    the shutting-down hold, drains."""

    def _record_failure(
        self, rep: ReplicaEntry, error: str, *, immediate: bool, timed_out: bool = False
    ) -> None:
        """``timed_out``: a poll that timed out (weak evidence: the replica may only be slow,
        or the gateway's host busy): out only after ``timeouts_to_unhealthy`` in a row."""
        rep.failures += 1
        rep.last_error = error
        snap = rep.snapshot
        if not rep.answered:  # never answered yet (down at start-up): say so once
            if rep.failures == 1:
                log.warning(
                    "replica %s (%s) gets no traffic until a poll succeeds: %s",
                    rep.config.replica_id,
                    rep.config.url,
                    error,
                )
            return
        if snap is None or not snap.healthy:
            return
        poller = self._poller
        out = immediate or rep.failures >= poller.failures_to_unhealthy
        if out and timed_out and not immediate and rep.timeouts < poller.timeouts_to_unhealthy:
            log.info(
                "replica %s: poll timed out (%d in a row; out of rotation at %d): %s",
                rep.config.replica_id, rep.timeouts, poller.timeouts_to_unhealthy, error,
            )  # fmt: skip
            return
        if out:
            rid = rep.config.replica_id
            if rid in self._draining:  # drained first: a planned restart or removal
                log.info("drained replica %s is down (expected during a restart): %s", rid, error)
            else:
                log.warning("replica %s is unhealthy: %s", rid, error)
            self._take_out(rep)

    def _refuse(self, rep: ReplicaEntry, error: str) -> None:
        """The replica answers but must get no traffic (it serves another model): out at once,
        said once (until its error changes)."""
        if rep.last_error != error:
            rid, url = rep.config.replica_id, rep.config.url
            log.warning("replica %s (%s) gets no traffic: it %s", rid, url, error)
        rep.last_error = error
        self._take_out(rep)

    def _take_out(self, rep: ReplicaEntry) -> None:
        """No traffic to the replica until a poll finds it healthy again (if it has any now)."""
        snap = rep.snapshot
        if snap is not None and snap.healthy:
            rep.snapshot = dataclasses.replace(snap, healthy=False)
            self._rebuild_healthy()

    def _poll_failed(self, rep: ReplicaEntry, reason: str) -> None:
        if self.on_poll_failed is not None:
            self.on_poll_failed(rep.config.replica_id, reason)

    def set_draining(self, replica_ids: Collection[ReplicaId]) -> None:
        """The replicas being drained now (every instance's drains, from the shared state).
        An id not in the pool is kept (another instance drained a replica that a reload may
        add here later) and ignored until then. Each change is logged once."""
        new = frozenset(replica_ids)
        old = self._draining
        if new == old:
            return
        self._draining = new
        for rid in sorted(new - old):
            if rid in self._replicas:
                log.info(
                    "replica %s (%s) is draining: no new requests are routed there; those "
                    "under way finish",
                    rid, self._replicas[rid].config.url,
                )  # fmt: skip
        for rid in sorted(old - new):
            if rid in self._replicas:
                log.info("replica %s is no longer draining: it gets requests again", rid)
        self._rebuild_healthy()

    def is_draining(self, replica_id: ReplicaId) -> bool:
        return replica_id in self._draining and replica_id in self._replicas

    def no_replica_error(self) -> NoReplicaAvailableError:
        """The 503 for a request no replica may take: says which replicas are healthy but
        draining, if any (an operator's doing, not a fault)."""
        draining = [
            rid
            for rid, r in self._replicas.items()
            if rid in self._draining and r.snapshot is not None and r.snapshot.healthy
        ]
        if not draining:
            return NoReplicaAvailableError("no healthy replica is available", param="model")
        which = ", ".join(draining)
        if len(draining) == len(self._replicas):
            what = f"every replica is draining ({which})"
        else:
            verb = "is" if len(draining) == 1 else "are"
            what = f"{which} {verb} draining and the others are unhealthy"
        return NoReplicaAvailableError(
            f"no replica is available: {what}; DELETE /admin/replicas/{{id}}/drain puts one back",
            param="model",
        )

    def require_healthy(self) -> tuple[ReplicaSnapshot, ...]:
        healthy = self._healthy
        if not healthy:
            raise self.no_replica_error()
        return healthy

    def report_stopping(
        self, replica_id: ReplicaId, error: str, *, client: VllmClient | None = None
    ) -> None:
        """The replica answered that it is shutting down although its ``/health`` may still
        answer 200 (vLLM's drain, see the module docstring): out of rotation until a poll
        finds it gone, for ``stopping_hold_s`` at most. ``client``: as for
        :meth:`report_failure`."""
        rep = self._replicas.get(replica_id)
        if rep is None or (client is not None and rep.client is not client):
            return
        self._hold_stopping(rep, error)

    def _hold_stopping(self, rep: ReplicaEntry, error: str) -> None:
        self._hold(rep, error, self.stopping_hold_s)
        if self.listener is not None:  # (it queues the write: no I/O here)
            self.listener.replica_stopping(rep.config.replica_id, error, self.stopping_hold_s)

    def _hold(self, rep: ReplicaEntry, error: str, hold_s: float, *, where: str = "") -> None:
        """Hold ``rep`` out of rotation for ``hold_s`` (or until a poll finds it gone); ``where``:
        who found it shutting down, if not this instance (for the log line)."""
        now = self._clock.now()
        held = rep.stopping_until is not None and rep.stopping_until > now
        rep.stopping_until = now + hold_s
        message = (
            f"shutting down: {error}; no new requests until a poll finds it gone, for "
            f"{self.stopping_hold_s:g} s at most"
        )
        if not held:
            log.warning(
                "replica %s (%s) is %s%s", rep.config.replica_id, rep.config.url, message, where
            )
        rep.failures += 1
        rep.last_error = message
        self._take_out(rep)

    def adopt_stopping(self, holds: Mapping[ReplicaId, tuple[str, float]]) -> None:
        """The holds of replicas shutting down that every gateway instance sharing the state
        keeps (the listener's, at each refresh): replica -> (what it answered, seconds left).
        A replica held there and not here is held here too, as long (another instance's
        request found it shutting down: this instance pays no retry to learn it); one held
        here follows the shared time; one held here and not there any more is released (a
        poll of some instance found it gone, or the hold lapsed): back in rotation at its
        next successful poll. Ids not in the pool are ignored."""
        now = self._clock.now()
        for rid, rep in self._replicas.items():
            shared = holds.get(rid)
            until = rep.stopping_until
            if shared is not None:
                error, left_s = shared
                if until is None or until <= now:
                    self._hold(rep, error, left_s, where=" (another gateway instance found so)")
                else:
                    rep.stopping_until = now + left_s
            elif until is not None:
                rep.stopping_until = None
                log.info(
                    "replica %s (%s): its shutting-down hold ended for every gateway instance "
                    "(a poll found it gone, or the hold lapsed): back in rotation at its next "
                    "successful poll",
                    rid, rep.config.url,
                )  # fmt: skip

    def stopping_for_s(self, replica_id: ReplicaId) -> float | None:
        """How long the replica's hold (:meth:`report_stopping`) may last yet, None if it is
        not held. For the admin API."""
        rep = self._replicas.get(replica_id)
        until = rep.stopping_until if rep is not None else None
        if until is None:
            return None
        left_s = until - self._clock.now()
        return left_s if left_s > 0 else None

    def _still_stopping(self, rep: ReplicaEntry) -> bool:
        """Whether ``rep``'s hold (:meth:`report_stopping`) is in force; a hold past its time
        ends here (logged)."""
        until = rep.stopping_until
        if until is None:
            return False
        if self._clock.now() < until:
            return True
        rep.stopping_until = None
        log.info(
            "replica %s (%s) still answers its polls %g s after it said it was shutting down: "
            "back in rotation (a request it refuses so again takes it out again)",
            rep.config.replica_id, rep.config.url, self.stopping_hold_s,
        )  # fmt: skip
        return False


def poll_failure_reason(exc: BaseException) -> str:
    """The reason (one of ``POLL_FAILURE_REASONS``) a poll failed with ``exc``."""
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    return "bad_response"


def poll_found_gone(exc: BaseException) -> bool:
    """Whether a poll that failed with ``exc`` found the replica gone (refused, reset, an
    error status such as the 503 of a vLLM whose drain ran out): what ends a shutting-down
    hold. A poll that timed out, reading or connecting, did not: the replica may only be slow
    (a draining vLLM still answers, late)."""
    if isinstance(exc, UpstreamTimeoutError):
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError):  # (aiohttp's connect timeout among them)
            return False
        seen = seen.__cause__
    return True


def connection_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a refused connection: nothing
    listens on the replica's port (not a connect that timed out: it may only be slow)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ECONNREFUSED:
            return True
        seen = seen.__cause__
    # asyncio's "Multiple exceptions: [Errno 111] Connect call failed (...), ..." (every
    # address of the host refused) has no errno of its own.
    text = str(exc)
    return "Multiple exceptions" in text and text.count("[Errno") == text.count(
        f"[Errno {errno.ECONNREFUSED}]"
    )
