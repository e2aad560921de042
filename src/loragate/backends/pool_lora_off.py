"""The replica pool's LoRA-off detection (what a replica's answers mean: ``backends.lora_off``).

A replica that serves no adapters (``backends.lora_off``: vLLM's 500 "LoRA is not enabled" to
a load, without ``--enable-lora``; its 404 ``{"detail":"Not Found"}`` for the load route,
without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) is marked as such, not as refusing that one
adapter: :attr:`ReplicaPool.lora_off` (the proxy routes no adapter request there, base-model
requests still go; without runtime loading, only the adapters it lists go there), one WARNING
naming the cause, ``last_error`` saying it while nothing else is wrong. It is checked again
with a load that changes nothing (:data:`~loragate.backends.lora_off.CHECK_PATH` does not
exist) every ``poller.adapter_refusal_ttl_s`` and at its first answered poll after a failed one
(it may have restarted with other flags); a ``/metrics`` with ``vllm:lora_requests_info`` lets
a replica marked for no ``--enable-lora`` go at once. A replica whose ``/metrics`` shows
generated tokens without that gauge is checked so before any request finds out.

Shared by the gateway instances on one state store (``backends.lora_off``): a replica this
instance finds serving no adapters is told to the others (for twice
``poller.adapter_refusal_ttl_s``, renewed by each check that finds it so again), who mark it
at their next state refresh (:meth:`PoolLoraOff._adopt_lora_off`, logged at INFO) without a
request of theirs paying a failed load; a check of any instance that finds it serving
adapters again ends the finding for all, and a finding no longer shared (ended, or lapsed:
its finder is gone) lets the replica go here too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping

from loragate.backends.lora_off import (
    CHECK_NAME,
    CHECK_PATH,
    LORA_DISABLED,
    LoraOff,
    cause_of,
    cause_of_shared,
    explain,
    looks_lora_off,
    shared_path,
)
from loragate.backends.metrics import VllmMetrics
from loragate.backends.pool_state import PoolState
from loragate.backends.pool_types import ReplicaEntry
from loragate.core.errors import (
    AdapterLoadError,
    LoragateError,
)
from loragate.core.types import ReplicaId

# One logger for the whole pool (its modules split one concept): operators' log filters and
# the tests name ``loragate.backends.pool``.
log = logging.getLogger("loragate.backends.pool")


class PoolLoraOff(PoolState):
    """Marking replicas that serve no adapters, checking them again, letting them go."""

    def _check_lora(self, rep: ReplicaEntry, m: VllmMetrics) -> None:
        """After a successful poll: a replica marked as serving no adapters is checked again
        once its time comes (``poller.adapter_refusal_ttl_s`` after the last check, at once
        after a failed poll: it may have restarted), or let go when its ``/metrics`` shows the
        LoRA gauge (vLLM has it only with --enable-lora); one whose ``/metrics`` hints at no
        --enable-lora is checked before any request finds out."""
        off = rep.lora_off
        if off is not None:
            if off.cause == LORA_DISABLED and m.max_loras is not None:
                self._lora_back(rep, "its /metrics has vllm:lora_requests_info (--enable-lora)")
            elif self._clock.now() >= off.check_at_s:
                self._start_lora_check(rep)
        elif not rep.lora_hint_checked and looks_lora_off(m):
            rep.lora_hint_checked = True
            self._start_lora_check(rep)

    def _start_lora_check(self, rep: ReplicaEntry) -> None:
        rid = rep.config.replica_id
        if self._session is None or rid in self._lora_checks:
            return
        task = asyncio.create_task(self._lora_check(rep), name=f"lora check {rid}")
        self._lora_checks[rid] = task
        task.add_done_callback(functools.partial(self._lora_check_done, rid))

    def _lora_check_done(self, rid: ReplicaId, task: asyncio.Task[None]) -> None:
        if self._lora_checks.get(rid) is task:
            del self._lora_checks[rid]
        if not task.cancelled():
            task.exception()

    async def _lora_check(self, rep: ReplicaEntry) -> None:
        """Ask the replica to load an adapter from a path that does not exist: a replica that
        serves adapters answers 404 "No adapter found" (nothing registered), one that does
        not answers as it does every load (``backends.lora_off``)."""
        off = rep.lora_off
        if off is not None:  # (until this check's answer, or the next time)
            off.check_at_s = self._clock.now() + self._poller.adapter_refusal_ttl_s
        try:
            await self._client(rep).load_adapter(CHECK_NAME, CHECK_PATH)
        except AdapterLoadError as exc:
            cause = cause_of(exc.status, exc.message)
            if cause is not None:
                self._mark_lora_off(rep, cause, exc.message)
                return
        except LoragateError as exc:  # unreachable: the polls say so; checked again later
            log.debug("replica %s: LoRA check failed: %s", rep.config.replica_id, exc)
            return
        if off is not None:
            self._lora_back(rep, "a check load was answered as by a server that loads adapters")

    def _mark_lora_off(
        self, rep: ReplicaEntry, cause: str, answer: str, *, found_here: bool = True
    ) -> None:
        """``rep`` serves no adapters (``cause``, the replica's ``answer``): said once (until the
        cause changes), checked again in ``poller.adapter_refusal_ttl_s``. ``found_here``: by
        this instance's load or check (told to the other instances), else by another's."""
        rid = rep.config.replica_id
        ttl_s = self._poller.adapter_refusal_ttl_s
        if found_here:
            self.refusals.share_finding(rid, shared_path(cause), answer, 2 * ttl_s)
        check_at_s = self._clock.now() + ttl_s
        old = rep.lora_off
        off = LoraOff(cause=cause, answer=answer, check_at_s=check_at_s)
        for entry in self._entries_of(rep):
            entry.lora_off = off
        current = self._replicas.get(rid)
        if current is not None and current.lora_off is off:  # (not a retired entry's)
            self.lora_off[rid] = off
        if not found_here:
            if old is None or old.cause != cause:
                log.info(
                    "replica %s (%s) serves no adapters (another gateway instance on this "
                    "state store found so): %s (it answered: %s)",
                    rid, rep.config.url, explain(cause), answer,
                )  # fmt: skip
        elif old is None or old.cause != cause:
            log.warning(
                "replica %s (%s) serves no adapters: %s (it answered an adapter load: %s); "
                "checked again every %g s and when it restarts",
                rid, rep.config.url, explain(cause), answer,
                self._poller.adapter_refusal_ttl_s,
            )  # fmt: skip
        else:
            log.debug("replica %s still serves no adapters: %s", rid, answer)

    def _lora_back(self, rep: ReplicaEntry, why: str, *, found_here: bool = True) -> None:
        """``rep`` serves adapters again; ``found_here``: this instance found so (the finding
        ends for every instance), else the shared finding ended."""
        rid = rep.config.replica_id
        if found_here:
            self.refusals.clear_finding(rid)
        for entry in self._entries_of(rep):
            entry.lora_off = None
        current = self._replicas.get(rid)
        if current is None or current.lora_off is None:
            self.lora_off.pop(rid, None)
        log.info("replica %s (%s) serves adapters again: %s", rid, rep.config.url, why)

    def _adopt_lora_off(self, findings: Mapping[ReplicaId, tuple[str, str, float]]) -> None:
        """The replicas the instances on the state store hold as serving no adapters
        (replica -> (the finding's path, the replica's answer, seconds left); each refresh
        while any is, and once after the last ends): marked here too, and a replica marked
        here that is not among them any more let go (another instance found it serving
        adapters again, or the finding lapsed). This instance's own findings are among them
        (written before the shared refusals are handed over)."""
        for rep in list(self._replicas.values()):
            found = findings.get(rep.config.replica_id)
            cause = None if found is None else cause_of_shared(found[0])
            if found is not None and cause is not None:
                if rep.lora_off is None or rep.lora_off.cause != cause:
                    self._mark_lora_off(rep, cause, found[1], found_here=False)
            elif rep.lora_off is not None:
                self._lora_back(
                    rep,
                    "no gateway instance on the state store holds it as serving none any more",
                    found_here=False,
                )

    def takes_adapter(self, replica_id: ReplicaId, adapter: str) -> bool:
        """Whether a request for ``adapter`` may go to the replica: it serves adapters, or it
        only cannot load them (no runtime loading) and has ``adapter`` registered."""
        off = self.lora_off.get(replica_id)
        if off is None:
            return True
        rep = self._replicas.get(replica_id)
        return off.serves_listed and rep is not None and adapter in rep.registered

    def lora_checking(self, replica_id: ReplicaId) -> bool:
        """Whether a check of the replica's LoRA support (:meth:`_lora_check`) is under way.
        Not read by the gateway itself (nothing it does depends on it): the tests wait on it,
        bounded, for a check's end (``tests/gateway/test_replica_lora_off.py``)."""
        return replica_id in self._lora_checks

    def lora_off_of(self, replica_id: ReplicaId) -> tuple[str, str, float] | None:
        """Why the replica serves no adapters: (cause, its answer, seconds until it is checked
        again), None if it does. For the admin API."""
        off = self.lora_off.get(replica_id)
        if off is None:
            return None
        return off.cause, off.answer, max(0.0, off.check_at_s - self._clock.now())
