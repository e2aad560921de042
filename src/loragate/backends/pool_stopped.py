"""The replica pool's handling of replicas that went away: one that stopped listening, and the
silence watch of one that stopped answering.

A replica that stopped listening: a poll refused at connect (vLLM closes its listener at once on
SIGTERM; a connect that timed out does not count: the replica may only be slow) wakes the
requests in progress there (``UpstreamPool.replica_stopped``): each fails with
``ReplicaStoppedError`` once it has received nothing for ``stopped_replica_grace_s``
(``limits.stopped_replica_grace_s``), and its connection is closed, so that a vLLM waiting for
its connections to close can exit; the proxy retries the request elsewhere or ends it. The
adapter loads under way there are abandoned at once (their connections closed too), and the
requests waiting for them fail with ``ReplicaStoppedError`` at once (nothing was generated, and
the replica takes no request any more): the proxy retries them elsewhere or answers a 502.
A replica the gateway's own request found refused at connect counts the same
(:meth:`ReplicaPool.report_failure` with ``refused``).

A replica that stopped answering: once its polls timed out ``timeouts_to_unhealthy`` times in
a row (it is out of rotation; a hung process, e.g. SIGSTOPped, or a wedged engine keeps its
sockets open and sends nothing), the requests in progress there are watched
(``UpstreamPool.replica_silent``): if none of them receives a byte for
``stopped_replica_grace_s``, each fails with ``ReplicaHungError`` (a ``ReplicaStoppedError``:
the proxy retries it elsewhere or ends it, as for a replica that stopped listening) and its
connection is closed. The whole replica's silence is the evidence, not one request's: a
replica only slow under load still sends on some connection (a stream producing, an answer
completing), and then none of its requests is failed (one waiting in its queue waits on). Each
later poll that times out watches again; a poll it answers ends a watch under way. A watch that
failed its requests also wakes the requests waiting for adapter loads there: each fails with
``ReplicaHungError`` (nothing was generated: the proxy retries it elsewhere or answers a 502);
the loads themselves run on to ``limits.admin_timeout_s`` (a replica that comes back may finish
them). Without requests in progress there is nothing to judge by: load waits end as before;
so with none left to fail (those watched ended meanwhile, or wait for clients that read slowly).
"""

from __future__ import annotations

import logging

from loragate.backends.client import VllmClient
from loragate.backends.pool_loads import PoolLoads
from loragate.backends.pool_types import ReplicaEntry
from loragate.backends.upstream import ReplicaHungError, ReplicaStoppedError
from loragate.core.types import ReplicaId

# One logger for the whole pool (its modules split one concept): operators' log filters and
# the tests name ``loragate.backends.pool``.
log = logging.getLogger("loragate.backends.pool")


class PoolStopped(PoolLoads):
    """Replicas that stopped listening or answering: their requests in progress and load
    waits end."""

    def report_failure(
        self,
        replica_id: ReplicaId,
        error: str,
        *,
        client: VllmClient | None = None,
        refused: bool = False,
    ) -> None:
        """Passive health: the gateway could not talk to this replica. It gets no traffic until
        a poll succeeds again. ``client``: the one the failed call used (``client(id)`` when
        it began); if a reload replaced the replica since, the failure was the old entry's
        (its old URL, key or settings) and says nothing of the new one: it is ignored.
        ``refused``: the connection was refused (:func:`connection_refused`: nothing listens
        there): what a poll refused at connect does follows (the requests in progress there
        are woken, the adapter loads under way abandoned) without waiting for the next poll."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            return
        if client is not None and rep.client is not client:
            log.debug(
                "replica %s: a failure on its entry from before a reload replaced it, ignored: %s",
                replica_id,
                error,
            )
            return
        self._record_failure(rep, error, immediate=True)
        if refused:
            self._stopped_listening(rep, self._client(rep), error)

    def _stopped_listening(self, rep: ReplicaEntry, client: VllmClient, error: str) -> None:
        """A poll found ``rep``'s listener closed (vLLM closes it at once on SIGTERM): the
        requests in progress there fail once nothing arrives for the grace
        (``stopped_replica_grace_s``): the proxy retries them elsewhere or ends them. The
        adapter loads under way there are abandoned at once (their connections closed: vLLM
        may wait for them before it exits), and the requests waiting for them fail now with
        :class:`ReplicaStoppedError` (nothing was generated; the replica takes no request)."""
        rid = rep.config.replica_id
        grace_s = self.stopped_replica_grace_s
        waiting = client.upstream.replica_stopped(grace_s)
        if waiting:
            log.warning(
                "replica %s (%s) stopped listening (%s): %d request(s) in progress there end "
                "if nothing arrives for %g s",
                rid, rep.config.url, error, waiting, grace_s,
            )  # fmt: skip
        self._wake_load_waiters(rep, ReplicaStoppedError, _STOPPED_LOADING)
        abandoned = sorted(name for name, r in self._loads if r == rid)
        for name in abandoned:
            self._loads.pop((name, rid)).cancel()
        if abandoned:
            log.warning(
                "replica %s (%s) stopped listening (%s): adapter load(s) under way there "
                "abandoned (%s); the requests waiting for them are retried on another replica "
                "or answered with a 502",
                rid, rep.config.url, error, ", ".join(abandoned),
            )  # fmt: skip

    @staticmethod
    def _answered(rep: ReplicaEntry, client: VllmClient) -> None:
        """``rep`` answered a poll: alive; a watch of its silence ends (``_stopped_answering``)."""
        client.upstream.replica_answered()
        rep.watch_said = rep.spared_said = False

    def _stopped_answering(self, rep: ReplicaEntry, client: VllmClient, error: str) -> None:
        """``rep``'s polls timed out ``timeouts_to_unhealthy`` times in a row (it is out of
        rotation): a hung replica (its process stopped, its engine wedged) keeps its sockets
        open and sends nothing. Its requests in progress are watched for
        ``stopped_replica_grace_s``: if none of them receives a byte meanwhile, each fails
        (``ReplicaHungError``; the proxy retries it elsewhere or ends it) and its connection
        is closed; a byte on any of them (it is only slow) leaves them all alone. Called at
        each poll that times out from then on (a watch under way goes on; the next one starts
        when it ended with the replica alive); a poll it answers ends the watch. A watch that
        failed requests wakes the requests waiting for adapter loads there too
        (``ReplicaHungError``: the proxy retries them elsewhere or answers a 502; the loads run
        on). Until then
        the start of a watch is logged once, so is a watch that spared the requests (at
        DEBUG after that); every watch that failed requests is."""
        rid = rep.config.replica_id
        url = rep.config.url
        grace_s = self.stopped_replica_grace_s
        reason = f"its polls timed out {rep.timeouts} times in a row"

        def done(alive: bool, failed: int) -> None:
            if failed:  # (nothing arrived on any connection it had in progress)
                self._wake_load_waiters(
                    rep,
                    ReplicaHungError,
                    f"stopped answering ({reason}) and sent nothing on any connection for "
                    f"{grace_s:g} s",
                )
                log.warning(
                    "replica %s (%s) stopped answering: nothing arrived on any of its "
                    "connections for %g s: %d request(s) in progress there failed "
                    "(retried on another replica, or ended with an error)",
                    rid, url, grace_s, failed,
                )  # fmt: skip
            elif alive:
                log.log(
                    logging.DEBUG if rep.spared_said else logging.INFO,
                    "replica %s (%s) does not answer its polls but still sends on its "
                    "connections: its request(s) in progress there go on",
                    rid, url,
                )  # fmt: skip
                rep.spared_said = True
            else:
                log.debug(
                    "replica %s (%s) sent nothing for %g s, but none of the requests watched "
                    "there was left to fail (they ended, or wait for clients that read "
                    "slowly): nothing judged; the requests waiting for adapter loads there "
                    "wait on",
                    rid, url, grace_s,
                )  # fmt: skip

        watched = client.upstream.replica_silent(grace_s, reason, done)
        if watched:
            log.log(
                logging.DEBUG if rep.watch_said else logging.WARNING,
                "replica %s (%s) stopped answering (%s: %s): %d request(s) in progress "
                "there fail if none of them receives anything for %g s",
                rid, url, reason, error, watched, grace_s,
            )  # fmt: skip
            rep.watch_said = True


# Why the requests waiting for a load on a replica that stopped listening stop waiting.
_STOPPED_LOADING = "stopped listening (its poll could not connect)"
