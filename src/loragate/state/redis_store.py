"""``RedisStore``: the shared state in Redis (``redis.asyncio``, hiredis parser if installed).

Round trips: ``begin_request`` 1 (one EVALSHA: GC + lease + residency touch + demand),
``end_request`` 1 (ZREM), ``snapshot`` 1 (one EVALSHA returning every replica, the adapter
load refusals and the deleted adapters' tombstones in force, and the drained replicas),
``get_adapter`` 1 (HGET), ``set_drain`` / ``clear_drain`` 1 (HSETNX / HDEL),
``hold_stopping`` / ``release_stopping`` 1 (EVALSHA / HDEL; the holds ride the snapshot),
``reconcile`` 1 (EVALSHA writing only the difference; ``ResilientStore`` sends it only when its
view of the replica's residency differs, so an idle poll costs nothing).
Every multi-key write is one Lua script or one MULTI/EXEC.

This class is the raw store: when Redis is unreachable every method raises
``StateUnavailableError``. The gateway wraps it in ``ResilientStore``, which never does.
It remembers its own in-flight leases so that ``sync_leases`` can renew them (every
``Ttls.lease_renew_s``, from ``maintain``) and re-create them after Redis lost its data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loragate.core.clock import Clock, WallClock
from loragate.core.types import AdapterId, AdapterSpec, ReplicaId, ReplicaSettings, Residency
from loragate.state import lua
from loragate.state.definitions import (
    REGISTERED,
    AdapterDefinition,
    DefinitionClaim,
    DefinitionMap,
    InForce,
)
from loragate.state.keys import KeySpace, Ttls, lease_member, refusal_field
from loragate.state.store import (
    ReplicaRecord,
    SharedRefusal,
    StateTimeoutError,
    StateUnavailableError,
    StateView,
    StoppingHold,
)

log = logging.getLogger("loragate.state")

T = TypeVar("T")

_DEFAULT_SETTINGS = ReplicaSettings()
_SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(ReplicaSettings))


def encode_replica(record: ReplicaRecord) -> dict[str, str]:
    info = {
        "url": record.url,
        "healthy": "1" if record.healthy else "0",
        "updated_s": repr(float(record.updated_s)),
    }
    for name in _SETTINGS_FIELDS:
        info[name] = json.dumps(getattr(record.settings, name))
    return info


def decode_replica(replica_id: ReplicaId, info: Mapping[str, str]) -> ReplicaRecord:
    settings = ReplicaSettings(**{n: json.loads(info[n]) for n in _SETTINGS_FIELDS if n in info})
    return ReplicaRecord(
        replica_id=replica_id,
        url=info.get("url", ""),
        settings=settings,
        healthy=info.get("healthy", "1") == "1",
        updated_s=float(info.get("updated_s", "0")),
    )


def encode_adapter(spec: AdapterSpec) -> str:
    tenants = None if spec.tenants is None else sorted(spec.tenants)
    return json.dumps({"path": spec.path, "rank": spec.rank, "tenants": tenants})


def decode_adapter(name: AdapterId, raw: str) -> AdapterSpec:
    d = json.loads(raw)
    tenants = d.get("tenants")
    return AdapterSpec(
        name=name,
        path=d["path"],
        rank=int(d.get("rank", 8)),
        tenants=None if tenants is None else frozenset(tenants),
    )


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def encode_refusal(path: str, error: str) -> str:
    return json.dumps({"path": path, "error": error})


def decode_refusals(flat: Sequence[Any]) -> dict[AdapterId, dict[ReplicaId, SharedRefusal]]:
    """The snapshot script's ``{field, JSON, ms left, …}``."""
    out: dict[AdapterId, dict[ReplicaId, SharedRefusal]] = {}
    for i in range(0, len(flat) - 2, 3):
        replica_id, adapter = json.loads(flat[i])
        info = json.loads(flat[i + 1])
        out.setdefault(str(adapter), {})[str(replica_id)] = SharedRefusal(
            path=str(info["path"]), error=str(info["error"]), left_s=int(flat[i + 2]) / 1000.0
        )
    return out


def decode_stopping(flat: Sequence[Any]) -> dict[ReplicaId, StoppingHold]:
    """The snapshot script's ``{replica id, what it answered, ms left, …}``."""
    return {
        str(flat[i]): StoppingHold(error=str(flat[i + 1]), left_s=int(flat[i + 2]) / 1000.0)
        for i in range(0, len(flat) - 2, 3)
    }


def decode_drains(flat: Sequence[Any]) -> dict[ReplicaId, float]:
    """The drains hash as the snapshot script returns it (flat HGETALL: id, since, …); a
    since that does not read as a number (written by hand) counts as 0."""
    out: dict[ReplicaId, float] = {}
    for replica_id, since in zip(flat[::2], flat[1::2], strict=True):
        try:
            out[str(replica_id)] = float(since)
        except ValueError:
            out[str(replica_id)] = 0.0
    return out


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so an abandoned call's error is not logged as unhandled


async def bounded(
    aw: Awaitable[T],
    timeout_s: float,
    *,
    left: dict[str, asyncio.Future[Any]] | None = None,
    key: str = "",
) -> T:
    """Await ``aw`` for at most ``timeout_s``, raising ``TimeoutError`` after that.

    Unlike ``asyncio.timeout`` around the call, this does not depend on the awaited code
    honouring cancellation: redis-py's asyncio client has had paths that swallow a
    ``CancelledError`` (redis/redis-py#2551), which turns a timeout into a hang. The call runs
    as its own task; on timeout it is cancelled and abandoned, and the caller goes on.

    A stalled event loop is not a slow server: when the timer fires late (the loop was held up
    past the deadline, e.g. on a saturated host, and the answer may be waiting unread on the
    socket), the call gets as long again as the loop overran, at most ``timeout_s`` more, before
    it counts as timed out. The timer runs before the socket is read in the iteration that
    ends a stall, so without this a stall longer than ``timeout_s`` failed every call in flight.

    With ``left``: a caller cancelled meanwhile (its client went away) does not cancel the
    call, whose command may be on its way to Redis already: the call goes on until it ends or
    its deadline passes (then it is cancelled), and sits in ``left`` under ``key`` meanwhile,
    so that a command that must not overtake it can wait for it (``RedisStore.end_request``).
    """
    task = asyncio.ensure_future(aw)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
        late = loop.time() - deadline
        if not done and late > 0:
            done, _ = await asyncio.wait((task,), timeout=min(late, timeout_s))
    except asyncio.CancelledError:
        if left is None:
            task.cancel()
        else:
            _leave(task, left, key, loop.call_at(deadline, task.cancel))
        task.add_done_callback(_consume)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError(f"no answer within {timeout_s} s")
    return task.result()


def _leave(
    task: asyncio.Future[Any],
    left: dict[str, asyncio.Future[Any]],
    key: str,
    deadline: asyncio.TimerHandle,
) -> None:
    """``task`` goes on after its caller was cancelled: in ``left`` under ``key`` until it
    ends (by ``deadline`` at the latest: then it is cancelled)."""
    left[key] = task

    def ended(_: asyncio.Future[Any]) -> None:
        deadline.cancel()
        if left.get(key) is task:
            del left[key]

    task.add_done_callback(ended)


def backstop_timeout_s(op_timeout_s: float) -> float:
    """redis-py's own socket, connect and pool timeouts: far above ``op_timeout_s`` (which
    ``bounded`` enforces), there only to free a connection whose abandoned call ignored its
    cancellation."""
    return max(30.0, 10.0 * op_timeout_s)


class EpochChangedError(StateUnavailableError):
    """Redis's dataset is not the one the caller knows (Redis lost its data since): the
    registry write was not made."""


def _registry_answer(answer: int, epoch: str | None) -> bool:
    if answer < 0:
        raise EpochChangedError(f"redis: the dataset changed (epoch {epoch} is gone)")
    return answer == 1


def redacted_url(url: str) -> str:
    """``url`` with its password, in the user part or the query (``?password=``), as ``***``:
    what a log may show of a Redis URL."""
    parts = urlsplit(url)
    out = url
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        out = out.replace(parts.netloc, f"{user.partition(':')[0]}:***@{host}", 1)
    if "password" in parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
        out = out.replace(parts.query, query, 1)
    return out


class RedisStore:
    """``StateStore`` on one Redis. Build with ``RedisStore.from_url``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        keys: KeySpace | None = None,
        ttls: Ttls | None = None,
        instance_id: str | None = None,
        op_timeout_s: float = 0.5,
        clock: Clock | None = None,
        url: str | None = None,
    ) -> None:
        self._r = client
        # Where this Redis is, for logs: the URL with its password left out (``from_url``).
        self.url = "redis" if url is None else redacted_url(url)
        self.keys = keys or KeySpace()
        self.ttls = ttls or Ttls()
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._op_timeout_s = op_timeout_s
        self._clock: Clock = clock or WallClock()
        self._begin = client.register_script(lua.BEGIN)
        self._residency = client.register_script(lua.RESIDENCY)
        self._snapshot = client.register_script(lua.SNAPSHOT)
        self._sync_leases = client.register_script(lua.SYNC_LEASES)
        self._set_health = client.register_script(lua.SET_HEALTH)
        self._set_drain = client.register_script(lua.SET_DRAIN)
        self._put_adapter = client.register_script(lua.PUT_ADAPTER)
        self._delete_adapter = client.register_script(lua.DELETE_ADAPTER)
        self._replace_adapter = client.register_script(lua.REPLACE_ADAPTER)
        self._leader_acquire = client.register_script(lua.LEADER_ACQUIRE)
        self._leader_release = client.register_script(lua.LEADER_RELEASE)
        self._ensure_epoch = client.register_script(lua.ENSURE_EPOCH)
        self._push_missing = client.register_script(lua.PUSH_MISSING)
        self._record_refusal = client.register_script(lua.RECORD_REFUSAL)
        self._forget_refusals = client.register_script(lua.FORGET_REFUSALS)
        self._hold_stopping = client.register_script(lua.HOLD_STOPPING)
        self._claim_definitions = client.register_script(lua.CLAIM_DEFINITIONS)
        self._renew_definitions = client.register_script(lua.RENEW_DEFINITIONS)
        # Generation of this instance's definition claims (0: none yet): its lease
        # (``P deflease:I|G``) holds the definitions they agreed with. A new one only when a
        # claim leaves out a name the last one made (a reload dropped it: its entry must lapse
        # lease_ttl_s after the old lease's last renewal); else the entries that hold it
        # already are not written again.
        self._claim_generation = 0
        self._claimed_names: frozenset[AdapterId] = frozenset()
        # request id -> (replica id, lease member) of this instance's in-flight requests
        self._own: dict[str, tuple[ReplicaId, str]] = {}
        # replicas whose in-flight ZSET may still hold a lease of ours
        self._lease_replicas: set[ReplicaId] = set()
        # lease member -> the begin (ZADD) of a request that went away while it was in flight,
        # until it ends: the lease's ZREM waits for it (``end_request``)
        self._begins: dict[str, asyncio.Future[Any]] = {}
        self.lease_changes = 0  # bumped on every note_begin / note_end
        self._last_lease_sync_s = -math.inf
        self._adapters_cache: tuple[str, int, dict[AdapterId, AdapterSpec]] | None = None
        self.epoch: str | None = None
        # Each replica's change number (``P rep:R:stamps``) at this instance's last recorded
        # read (``snapshot(as_reader=True)``): what its view of the shared state includes, for
        # ``reconcile``'s since (``read_change``).
        self._read_changes: dict[ReplicaId, int] = {}
        self._errors = 0
        self._failing = False
        self._demand_ttl_s = math.ceil(self.ttls.demand_retention_s + self.ttls.demand_bucket_s)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        op_timeout_s: float = 0.5,
        max_connections: int = 64,
        keys: KeySpace | None = None,
        ttls: Ttls | None = None,
        instance_id: str | None = None,
        clock: Clock | None = None,
    ) -> RedisStore:
        """A client that fails fast (no client-side retries: the caller decides what to do).

        Bursts beyond ``max_connections`` concurrent calls wait for a free connection instead of
        failing. Every call is bounded by ``op_timeout_s`` (``bounded``, which does not count a
        stall of our own event loop against Redis); redis-py's own timeouts are only a backstop
        (``backstop_timeout_s``): at ``op_timeout_s`` they failed calls whose answer had come
        in time but sat unread while the loop was held up.
        """
        backstop_s = backstop_timeout_s(op_timeout_s)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=backstop_s,
            decode_responses=True,
            socket_timeout=backstop_s,
            socket_connect_timeout=backstop_s,
            retry=Retry(NoBackoff(), 0),
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(
            client,
            keys=keys,
            ttls=ttls,
            instance_id=instance_id,
            op_timeout_s=op_timeout_s,
            clock=clock,
            url=url,
        )

    # --- plumbing ---------------------------------------------------------------------------
    async def _io(self, aw: Awaitable[T], left: str | None = None) -> T:
        """``aw`` within the op timeout, its failures as ``StateUnavailableError``s. With
        ``left`` (a lease member): a caller cancelled meanwhile leaves the call going on, in
        ``_begins`` (see :func:`bounded`)."""
        try:
            if left is None:
                result = await bounded(aw, self._op_timeout_s)
            else:
                result = await bounded(aw, self._op_timeout_s, left=self._begins, key=left)
        except (RedisError, OSError, TimeoutError) as exc:
            self._errors += 1
            self._failing = True
            what = f"redis: {type(exc).__name__}: {exc}"
            if isinstance(exc, (TimeoutError, RedisTimeoutError)):
                raise StateTimeoutError(what) from exc
            raise StateUnavailableError(what) from exc
        self._failing = False
        return result

    def _settings_args(self) -> list[int]:
        return [_DEFAULT_SETTINGS.max_loras, _DEFAULT_SETTINGS.max_cpu_loras]

    # --- leases (no I/O) ------------------------------------------------------------------------
    def note_begin(self, replica_id: ReplicaId, request_id: str) -> str:
        """Remember a lease of ours (``begin_request`` does this; ``ResilientStore`` calls it
        directly while Redis is down so that ``sync_leases`` re-creates the lease later)."""
        member = lease_member(self.instance_id, request_id)
        self._own[request_id] = (replica_id, member)
        self._lease_replicas.add(replica_id)
        self.lease_changes += 1
        return member

    def note_end(self, request_id: str) -> tuple[ReplicaId, str] | None:
        self.lease_changes += 1
        return self._own.pop(request_id, None)

    def own_in_flight(self) -> dict[ReplicaId, int]:
        counts: dict[ReplicaId, int] = {}
        for replica_id, _ in self._own.values():
            counts[replica_id] = counts.get(replica_id, 0) + 1
        return counts

    # --- hot path -------------------------------------------------------------------------------
    async def begin_request(
        self, replica_id: ReplicaId, adapter: AdapterId | None, request_id: str, now_s: float
    ) -> None:
        member = self.note_begin(replica_id, request_id)
        await self._run_begin(replica_id, adapter, member, now_s)

    async def replay_touch(self, replica_id: ReplicaId, adapter: AdapterId, now_s: float) -> None:
        """Residency touch and demand count of a request routed while Redis was down."""
        await self.replay_touches([(replica_id, adapter, now_s)])

    async def replay_touches(self, touches: Sequence[tuple[ReplicaId, AdapterId, float]]) -> None:
        """``replay_touch`` for each of ``touches`` (replica, adapter, time), in order, in one
        pipelined round trip (plus one to check that the script is loaded): a resync's cost
        must not grow with the number of requests routed during the outage."""
        pipe = self._r.pipeline(transaction=False)
        for replica_id, adapter, now_s in touches:
            keys, args = self._begin_args(replica_id, adapter, "", now_s)
            await self._begin(keys=keys, args=args, client=pipe)  # queued: no I/O
        await self._io(pipe.execute())

    async def _run_begin(
        self, replica_id: ReplicaId, adapter: AdapterId | None, member: str, now_s: float
    ) -> None:
        keys, args = self._begin_args(replica_id, adapter, member, now_s)
        await self._io(self._begin(keys=keys, args=args), left=member)

    def _begin_args(
        self, replica_id: ReplicaId, adapter: AdapterId | None, member: str, now_s: float
    ) -> tuple[list[str], list[str | int]]:
        k = self.keys
        bucket = self.ttls.demand_bucket(now_s)
        keys = [k.in_flight(replica_id), *k.residency_keys(replica_id), k.demand(bucket)]
        args: list[str | int] = [
            member,
            self.ttls.lease_ttl_ms,
            adapter or "",
            *self._settings_args(),
            self._demand_ttl_s,
            self.instance_id,
        ]
        return keys, args

    async def end_request(self, replica_id: ReplicaId, request_id: str) -> None:
        own = self.note_end(request_id)
        member = own[1] if own is not None else lease_member(self.instance_id, request_id)
        if self._begins and (begin := self._begins.get(member)) is not None:
            # The request went away while its begin was in flight (its EVALSHA may be on its
            # way on another connection): the ZREM must not reach Redis before its ZADD, which
            # would leave an orphan lease that every instance counts until our next lease
            # sync. (The begin ends within the op timeout: its deadline cancels it.)
            await asyncio.wait((begin,), timeout=self._op_timeout_s)
        await self._io(self._r.zrem(self.keys.in_flight(replica_id), member))

    async def snapshot(self, *, as_reader: bool = False) -> StateView:
        """The shared view (one round trip). ``as_reader``: record this read as this
        instance's latest (``P readers``; the gateway's refreshes do, probes do not)."""
        k = self.keys
        cache = self._adapters_cache
        known = str(cache[1]) if cache is not None and cache[0] == self.epoch else ""
        raw: list[Any] = await self._io(
            self._snapshot(
                keys=[
                    k.replicas,
                    k.version,
                    k.adapters,
                    k.epoch,
                    k.refusals,
                    k.tombstones,
                    k.drains,
                    k.readers,
                    k.stopping,
                ],
                args=[
                    k.replica_base,
                    known,
                    self.instance_id if as_reader else "",
                    self.ttls.reader_ttl_ms,
                ],
            )
        )
        version = int(raw[0])
        epoch = str(raw[1])
        self.epoch = epoch or None
        readers = {str(i): int(ms) for i, ms in zip(raw[6][::2], raw[6][1::2], strict=True)}
        if as_reader:
            self._read_changes = {str(row[0]): int(row[6]) for row in raw[8:]}
        if isinstance(raw[2], list):
            adapters = {n: decode_adapter(n, v) for n, v in _pairs(raw[2]).items()}
        elif cache is not None and cache[0] == epoch:
            adapters = cache[2]
        else:  # Redis was replaced under us and the version matches by chance
            adapters = await self._load_adapters()
        self._adapters_cache = (epoch, version, adapters)
        replicas: dict[ReplicaId, ReplicaRecord] = {}
        residency: dict[ReplicaId, Residency] = {}
        in_flight: dict[ReplicaId, int] = {}
        for row in raw[8:]:
            replica_id = str(row[0])
            replicas[replica_id] = decode_replica(replica_id, _pairs(row[1]))
            residency[replica_id] = Residency(
                registered=frozenset(row[2]), gpu=tuple(row[3]), cpu=tuple(row[4])
            )
            in_flight[replica_id] = int(row[5])
        return StateView(
            version=version,
            replicas=replicas,
            residency=residency,
            in_flight=in_flight,
            adapters=adapters,
            refusals=decode_refusals(raw[3]),
            tombstones={
                str(n): int(ms) / 1000.0 for n, ms in zip(raw[4][::2], raw[4][1::2], strict=True)
            },
            drains=decode_drains(raw[5]),
            readers={i: ms / 1000.0 for i, ms in readers.items()},
            stopping=decode_stopping(raw[7]),
            degraded=False,
        )

    # --- replica registry -----------------------------------------------------------------------
    async def upsert_replica(self, record: ReplicaRecord) -> None:
        k = self.keys
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(k.replica(record.replica_id))
        info: dict[Any, Any] = dict(encode_replica(record))
        pipe.hset(k.replica(record.replica_id), mapping=info)
        pipe.sadd(k.replicas, record.replica_id)
        pipe.incr(k.version)
        await self._io(pipe.execute())

    async def remove_replica(self, replica_id: ReplicaId) -> None:
        k = self.keys
        pipe = self._r.pipeline(transaction=True)
        pipe.srem(k.replicas, replica_id)
        pipe.delete(*k.residency_keys(replica_id), k.in_flight(replica_id))
        pipe.hdel(k.drains, replica_id)
        pipe.incr(k.version)
        await self._io(pipe.execute())

    async def set_replica_health(self, replica_id: ReplicaId, healthy: bool, now_s: float) -> None:
        await self._io(
            self._set_health(
                keys=[self.keys.replica(replica_id)],
                args=["1" if healthy else "0", repr(float(now_s))],
            )
        )

    # --- residency ----------------------------------------------------------------------------
    def read_change(self, replica_id: ReplicaId) -> int | None:
        """The change number of ``replica_id``'s registered set at this instance's last
        recorded read (None: not read yet), for ``reconcile``'s ``since``."""
        return self._read_changes.get(replica_id)

    async def _residency_op(
        self, replica_id: ReplicaId, op: str, adapters: list[str], since: int | None = None
    ) -> None:
        await self._io(
            self._residency(
                keys=self.keys.residency_keys(replica_id),
                args=[
                    op,
                    *self._settings_args(),
                    self.instance_id,
                    "" if since is None else since,
                    *adapters,
                ],
            )
        )

    async def record_load(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        await self._residency_op(replica_id, "load", [adapter])

    async def record_unload(self, replica_id: ReplicaId, adapter: AdapterId) -> None:
        await self._residency_op(replica_id, "unload", [adapter])

    async def reconcile(
        self, replica_id: ReplicaId, seen: frozenset[AdapterId], *, since: int | None = None
    ) -> None:
        """``seen`` becomes the registered set, except for the adapters another instance added
        or removed after change number ``since`` of the replica's registered set (the caller's
        last read of it, ``read_change``), which keep their state: the caller did not know of
        that write, and its poll may predate it (one journaled during an outage and replayed
        after a newer load). Change numbers, not the server's clock: a write and a read in the
        same millisecond were not ordered. None: ``seen`` as it is."""
        await self._residency_op(replica_id, "reconcile", sorted(seen), since)

    # --- adapter registry ---------------------------------------------------------------------
    async def put_adapter(self, spec: AdapterSpec, *, epoch: str | None = None) -> bool:
        """Register ``spec`` if the name is free (not registered, not defined by an instance's
        config file). ``epoch``: only in that dataset, else ``EpochChangedError`` (nothing
        done)."""
        k = self.keys
        added = await self._io(
            self._put_adapter(
                keys=[k.adapters, k.version, k.tombstones, k.restored, k.epoch, k.definitions],
                args=[spec.name, encode_adapter(spec), epoch or "", k.definition_lease_base],
            )
        )
        return _registry_answer(int(added), epoch)

    async def replace_adapter(
        self,
        spec: AdapterSpec,
        *,
        expected: AdapterSpec | None = None,
        epoch: str | None = None,
    ) -> AdapterSpec | None:
        """Replace the registered ``spec.name`` (if registered, and as ``expected`` if given):
        the definition replaced, or None; ``epoch`` as in ``put_adapter``."""
        k = self.keys
        answer = await self._io(
            self._replace_adapter(
                keys=[k.adapters, k.version, k.epoch],
                args=[
                    spec.name,
                    encode_adapter(spec),
                    "" if expected is None else encode_adapter(expected),
                    epoch or "",
                ],
            )
        )
        if not isinstance(answer, list):
            _registry_answer(int(answer), epoch)  # (-1: raises)
            return None
        if int(answer[0]) != 1:
            return None
        raw = answer[1]
        return decode_adapter(spec.name, raw.decode() if isinstance(raw, bytes) else str(raw))

    async def delete_adapter(self, name: AdapterId, *, epoch: str | None = None) -> bool:
        """Delete ``name`` leaving its tombstone; ``epoch`` as in ``put_adapter``."""
        k = self.keys
        deleted = await self._io(
            self._delete_adapter(
                keys=[k.adapters, k.version, k.tombstones, k.epoch],
                args=[name, self.ttls.tombstone_ttl_ms, epoch or ""],
            )
        )
        return _registry_answer(int(deleted), epoch)

    async def get_adapter(self, name: AdapterId) -> AdapterSpec | None:
        raw = await self._io(self._r.hget(self.keys.adapters, name))
        return None if raw is None else decode_adapter(name, str(raw))

    async def begin_replacing(self, name: AdapterId, path: str, ttl_s: float) -> None:
        key = self.keys.replacing(name)
        await self._io(self._r.set(key, path, px=max(1, math.ceil(ttl_s * 1000))))

    async def end_replacing(self, name: AdapterId) -> None:
        await self._io(self._r.delete(self.keys.replacing(name)))

    async def paths_in_force(self, name: AdapterId) -> frozenset[str]:
        """One pipelined round trip: the registered definition's path and the replacement's."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self.keys.adapters, name)
        pipe.get(self.keys.replacing(name))
        raw, replacing = await self._io(pipe.execute())
        paths = set()
        if raw is not None:
            paths.add(decode_adapter(name, str(raw)).path)
        if replacing is not None:
            paths.add(str(replacing))
        return frozenset(paths)

    async def _load_adapters(self) -> dict[AdapterId, AdapterSpec]:
        raw = await self._io(self._r.hgetall(self.keys.adapters))
        return {str(n): decode_adapter(str(n), str(v)) for n, v in raw.items()}

    async def list_adapters(self) -> list[AdapterSpec]:
        adapters = await self._load_adapters()
        return [adapters[n] for n in sorted(adapters)]

    # --- adapters defined in config files (``state.definitions``) -----------------------------
    async def claim_definitions(self, claims: Sequence[DefinitionClaim]) -> DefinitionMap:
        """Claim each definition in one script (the rule: ``definitions.decide``; claims live
        ``Ttls.lease_ttl_s``; a name registered through the admin API is the registration's).
        Returns the definitions in force for the claimed names. The claims are held by a new
        lease of this instance (``P deflease:I|G``): :meth:`renew_definitions` renews them."""
        if not claims:
            return {}
        names = frozenset(c.name for c in claims)
        if self._claim_generation == 0 or not names >= self._claimed_names:
            self._claim_generation += 1
        self._claimed_names = names
        payload = []
        for c in claims:
            item: dict[str, Any] = {"name": c.name, "path": c.ours.path, "rank": c.ours.rank}
            if c.previous is not None:
                item["prev"] = [c.previous.path, c.previous.rank]
            if c.known is not None:
                k = c.known.definition
                item["known"] = [k.path, k.rank, k.instance, max(1, round(c.known.left_s * 1000))]
            payload.append(item)
        raw: list[str] = await self._io(
            self._claim_definitions(
                keys=[self.keys.definitions, self.keys.version, self.keys.adapters],
                args=[
                    self.ttls.lease_ttl_ms,
                    self.instance_id,
                    json.dumps(payload),
                    REGISTERED,
                    self.keys.definition_lease_base,
                    self._claim_generation,
                ],
            )
        )
        out: dict[AdapterId, InForce] = {}
        for name, value in _pairs(raw).items():
            path, rank, instance, left_ms = json.loads(value)
            definition = AdapterDefinition(path=path, rank=int(rank), instance=str(instance))
            out[name] = InForce(definition, int(left_ms) / 1000.0)
        return out

    async def renew_definitions(self) -> bool:
        """Renew the definitions the last :meth:`claim_definitions` holds (every one in force
        that agreed with it) for ``Ttls.lease_ttl_s``: one small script, whatever their
        number. False (nothing renewed) if there was no claim or its lease is gone (Redis lost
        its data, or this instance was away longer than ``lease_ttl_s``): claim in full."""
        if self._claim_generation == 0:
            return False
        k = self.keys
        renewed = await self._io(
            self._renew_definitions(
                keys=[k.definition_lease(self.instance_id, self._claim_generation), k.definitions],
                args=[self.ttls.lease_ttl_ms],
            )
        )
        return int(renewed) == 1

    # --- adapter-load refusals ------------------------------------------------------------------
    async def record_refusal(
        self, replica_id: ReplicaId, adapter: AdapterId, *, path: str, error: str, ttl_s: float
    ) -> None:
        k = self.keys
        await self._io(
            self._record_refusal(
                keys=[
                    k.refusals,
                    k.registered(replica_id),
                    k.gpu(replica_id),
                    k.cpu(replica_id),
                    k.stamps(replica_id),
                ],
                args=[
                    refusal_field(replica_id, adapter),
                    max(1, math.ceil(ttl_s * 1000)) if ttl_s > 0 else 0,
                    encode_refusal(path, error),
                    adapter,
                    self.instance_id,
                ],
            )
        )

    async def forget_refusals(
        self, adapter: AdapterId, replica_id: ReplicaId | None = None
    ) -> None:
        field = "" if replica_id is None else refusal_field(replica_id, adapter)
        await self._io(self._forget_refusals(keys=[self.keys.refusals], args=[adapter, field]))

    # --- replicas shutting down ---------------------------------------------------------------
    async def hold_stopping(self, replica_id: ReplicaId, *, error: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            await self.release_stopping(replica_id)
            return
        await self._io(
            self._hold_stopping(
                keys=[self.keys.stopping],
                args=[replica_id, max(1, math.ceil(ttl_s * 1000)), error],
            )
        )

    async def release_stopping(self, replica_id: ReplicaId) -> None:
        await self._io(self._r.hdel(self.keys.stopping, replica_id))

    # --- drained replicas ---------------------------------------------------------------------
    async def set_drain(self, replica_id: ReplicaId, since_s: float | None = None) -> bool:
        return (await self.drain(replica_id, since_s))[0]

    async def drain(self, replica_id: ReplicaId, since_s: float | None) -> tuple[bool, float]:
        """:meth:`set_drain`, also returning the since in force (None: the server's time)."""
        added, since = await self._io(
            self._set_drain(
                keys=[self.keys.drains],
                args=[replica_id, "" if since_s is None else repr(float(since_s))],
            )
        )
        return int(added) == 1, float(since)

    async def clear_drain(self, replica_id: ReplicaId) -> bool:
        removed = await self._io(self._r.hdel(self.keys.drains, replica_id))
        return bool(removed)

    # --- demand -------------------------------------------------------------------------------
    async def demand(self, since_s: float, until_s: float) -> dict[float, dict[AdapterId, int]]:
        buckets = self.ttls.demand_buckets(since_s, until_s)
        if not buckets:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for b in buckets:
            pipe.hgetall(self.keys.demand(b))
        rows: list[dict[str, str]] = await self._io(pipe.execute())
        width = self.ttls.demand_bucket_s
        return {
            b * width: {a: int(n) for a, n in row.items()}
            for b, row in zip(buckets, rows, strict=True)
            if row
        }

    # --- leader and version -------------------------------------------------------------------
    async def acquire_leader(self, name: str, holder: str, ttl_s: float) -> bool:
        ok = await self._io(
            self._leader_acquire(
                keys=[self.keys.leader(name)], args=[holder, max(1, round(ttl_s * 1000))]
            )
        )
        return int(ok) == 1

    async def release_leader(self, name: str, holder: str) -> bool:
        ok = await self._io(self._leader_release(keys=[self.keys.leader(name)], args=[holder]))
        return int(ok) == 1

    async def leader(self, name: str) -> str | None:
        holder = await self._io(self._r.get(self.keys.leader(name)))
        return None if holder is None else str(holder)

    async def bump_version(self) -> int:
        version: int = await self._io(self._r.incr(self.keys.version))
        return version

    # --- resynchronisation (used by ResilientStore) -----------------------------------------------
    async def ensure_epoch(self) -> tuple[str, bool]:
        """The dataset's epoch token, creating it if missing. Returns (epoch, created)."""
        raw: list[Any] = await self._io(
            self._ensure_epoch(keys=[self.keys.epoch], args=[uuid.uuid4().hex])
        )
        return str(raw[0]), int(raw[1]) == 1

    async def push_missing(self, view: StateView) -> list[ReplicaId]:
        """Write ``view`` where Redis has nothing (after Redis lost its data), tombstones
        included; an adapter with a tombstone in force (this view's or one already written
        back) is not written back (see ``lua.PUSH_MISSING``). Returns the drained replicas
        it wrote back."""
        payload = {
            "version": view.version,
            "adapters": {n: encode_adapter(s) for n, s in view.adapters.items()},
            "replicas": [
                {
                    "id": r,
                    "info": [x for kv in encode_replica(rec).items() for x in kv],
                    "reg": sorted(view.residency_of(r).registered),
                    "gpu": list(view.residency_of(r).gpu),
                    "cpu": list(view.residency_of(r).cpu),
                }
                for r, rec in view.replicas.items()
            ],
            "refusals": [
                [
                    refusal_field(rid, name),
                    encode_refusal(x.path, x.error),
                    math.ceil(x.left_s * 1000),
                ]
                for name, by_replica in view.refusals.items()
                for rid, x in by_replica.items()
                if x.left_s > 0
            ],
            # Deletions it knows of, with the time they have left: without them an instance
            # whose view predates a deletion would write the adapter back.
            "tombstones": [
                [name, math.ceil(left_s * 1000)]
                for name, left_s in view.tombstones.items()
                if left_s > 0
            ],
            # Drains it knows of: an operator's drain must not end with Redis's data.
            "drains": [[r, repr(float(since))] for r, since in view.drains.items()],
            # Replicas it holds as shutting down, with the time the holds have left.
            "stopping": [
                [r, x.error, math.ceil(x.left_s * 1000)]
                for r, x in view.stopping.items()
                if x.left_s > 0
            ],
        }
        k = self.keys
        written: list[Any] = await self._io(
            self._push_missing(
                keys=[
                    k.replicas,
                    k.adapters,
                    k.version,
                    k.refusals,
                    k.tombstones,
                    k.restored,
                    k.drains,
                    k.stopping,
                ],
                args=[k.replica_base, json.dumps(payload), self.ttls.tombstone_ttl_ms],
            )
        )
        return [str(r) for r in written or ()]

    async def sync_leases(self) -> None:
        """Make Redis hold exactly this instance's live leases, all renewed to a full TTL."""
        by_replica: dict[ReplicaId, list[str]] = {r: [] for r in self._lease_replicas}
        for replica_id, member in self._own.values():
            by_replica.setdefault(replica_id, []).append(member)
        if not by_replica:
            return
        keys: list[str] = []
        args: list[str | int] = [f"{self.instance_id}|", self.ttls.lease_ttl_ms]
        for replica_id, members in by_replica.items():
            keys.append(self.keys.in_flight(replica_id))
            args.append(len(members))
            args.extend(members)
        await self._io(self._sync_leases(keys=keys, args=args))
        self._lease_replicas = {r for r, m in by_replica.items() if m}
        self._last_lease_sync_s = self._clock.now()

    # --- lifecycle --------------------------------------------------------------------------------
    async def maintain(self) -> None:
        """Renew our leases when due."""
        if self._clock.now() - self._last_lease_sync_s >= self.ttls.lease_renew_s:
            await self.sync_leases()

    @property
    def degraded(self) -> bool:
        return self._failing

    @property
    def error_count(self) -> int:
        return self._errors

    async def drop_idle_connections(self) -> None:
        """Close the pooled idle connections (after an outage they point at a dead server;
        a restarted Redis would fail each of them once)."""
        try:
            await bounded(
                self._r.connection_pool.disconnect(inuse_connections=False), self._op_timeout_s
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("state: closing idle Redis connections: %r", exc)

    async def ping(self) -> None:
        await self._io(self._r.ping())

    async def forget_reader(self) -> None:
        """This instance stops reading the shared state (it closes): no longer listed as an
        instance that may not have seen a drain."""
        await self._io(self._r.hdel(self.keys.readers, self.instance_id))

    async def close(self) -> None:
        await self._r.aclose(close_connection_pool=True)
