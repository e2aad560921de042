"""The digital twin of one vLLM V1 engine with LoRA: a pure, deterministic step model.

No asyncio, no I/O, no clock: time is passed in. :meth:`Engine.step` runs exactly one engine step
(the wall-time replica streams its tokens); :meth:`Engine.run_until` advances virtual time fast,
jumping over runs of identical decode steps in closed form. Both share one scheduler, so they
produce the same schedule (and the same records) for the same inputs.

Scheduling follows vLLM V1 (``vllm/v1/core/sched/scheduler.py``), see DIGITAL_TWIN.md:

* running requests first, in admission order: a decode takes 1 token of the budget, the (single)
  partially prefilled request continues its chunked prefill; a request that needs a KV block when
  none is free preempts the tail of the running queue (recompute: blocks freed, request reset and
  put back at the front of the waiting queue); no waiting request is admitted in that step;
* then the FCFS waiting queue under ``max_num_batched_tokens``, ``max_num_seqs``, KV blocks and
  the adapter budget (at most ``max_loras`` distinct adapters among running requests; a request of
  another adapter is skipped -- deferred -- and the walk goes on past it);
* a prompt whose prefill completes in a step yields its first output token in that step; output
  length is exactly ``max_tokens``.

How it stays fast (no per-request Python work per step): time is kept in integer nanoseconds (so
``k`` identical steps add up exactly); every decoding request is described by the global step
index at which it started decoding, so its token count is implicit; finishing requests sit in a
bucket keyed by the step index at which they finish; KV usage is updated from a histogram of the
decoders' block phases (``step index mod block_size``); waiting requests sit in per-adapter queues
(plus a lazily cleaned global FCFS queue), so deferral never rescans the waiting list.
"""

from __future__ import annotations

import bisect
import gc
import heapq
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from operator import le
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike

from loragate.core.errors import InvalidRequestError
from loragate.twin.engine_types import (
    EngineConfig,
    EngineRequest,
    EngineStartupError,
    RequestRecord,
    StepResult,
    TokenEvent,
    validate_request,
)
from loragate.twin.lora_cache import LoraCaches
from loragate.twin.profile import PerformanceProfile
from loragate.twin.request_ids import NumberedIds

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineStartupError",
    "RequestRecord",
    "StepResult",
    "TokenEvent",
    "validate_request",
]

NS = 1_000_000_000
# States of an admitted request; _REQUEUED: waiting again after a preemption.
_PREFILL, _DECODE, _DONE, _REQUEUED = range(2, 6)
_SHIFT = 12  # request rows are stored in blocks of 4096
_BLOCK = 1 << _SHIFT
_MASK = _BLOCK - 1


def _ns(t_s: float) -> int:
    return int(t_s * NS + 0.5)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: the engine allocates many small acyclic objects and no garbage
    cycles, so generation scans over its live requests would only burn CPU."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Adapter:
    """Scheduler state of one adapter (``name`` None = base model)."""

    __slots__ = ("g0", "idx", "n_running", "name", "queue", "r_acc", "rank")

    def __init__(self, name: str | None, rank: int, idx: int) -> None:
        self.name = name
        self.rank = rank
        self.idx = idx  # position in the engine's adapter table (rows store it, not the object)
        # Waiting requests of this adapter, FCFS: row numbers (never admitted) and requeued
        # _Req objects. Its length is the adapter's number of waiting requests.
        self.queue: deque[_Item] = deque()
        self.n_running = 0
        self.r_acc = 0  # ns of "slots full" time during which this adapter was running
        self.g0 = 0  # value of the engine's slots-full clock when the adapter became running


class _Rows:
    """One block of ``_BLOCK`` request rows (columns), for requests never admitted yet.

    A request that has not yet run is only a row number ``g`` (block ``g >> _SHIFT``, index
    ``g & _MASK``): under overload most requests only ever wait, and an int per request (no
    object, nothing for the cyclic GC to track) is the cheapest way to queue them. Its
    :class:`_Req` is created when it is first admitted. ``live``: rows neither admitted nor
    dropped; a full block with no live row is freed. ``wseq`` / ``snap`` are written when the
    row joins the waiting queue (its waiting order and deferred-clock snapshot, see
    :meth:`Engine._enqueue_back`), so a queued row needs no tuple of its own. A row added with
    :class:`NumberedIds` has no id string until it is read (``rid`` None; see :meth:`id`).
    """

    __slots__ = (
        "aid",
        "arr_s",
        "live",
        "max_tokens",
        "ns",
        "prompt",
        "rank",
        "rid",
        "snap",
        "spans",
        "wseq",
    )

    def __init__(self) -> None:
        # Numbers in arrays, not lists: nothing for the cyclic GC to visit.
        self.rid: list[str | None] = []
        self.spans: list[tuple[int, int, str, int]] = []  # unmade ids: (lo, hi, prefix, number)
        self.aid = array("q")  # adapter: index into Engine._alist
        self.rank = array("q")
        self.prompt = array("q")
        self.max_tokens = array("q")
        self.arr_s = array("d")
        self.ns = array("q")  # arrival, integer ns
        self.wseq = array("q", bytes(8 * _BLOCK))
        self.snap = array("q", bytes(8 * _BLOCK))
        self.live = 0

    def id(self, i: int) -> str:
        """The request id of row index ``i`` (made now if it was added unmade)."""
        rid = self.rid[i]
        if rid is not None:
            return rid
        for lo, hi, prefix, number in self.spans:
            if lo <= i < hi:
                return f"{prefix}{number + i - lo}"
        raise AssertionError(f"row {i} has no id")  # pragma: no cover


class _Req:
    """Engine-side state of one admitted request (copied from its row on first admission)."""

    __slots__ = (
        "arr_s",
        "aseq",
        "ast",
        "b",
        "c0",
        "computed",
        "deferred_ns",
        "epoch",
        "first_ns",
        "fstep",
        "max_tokens",
        "o0",
        "out",
        "preemptions",
        "prompt",
        "rank",
        "res",
        "rid",
        "snap",
        "state",
        "target",
        "wseq",
    )
    # Set on admission / first decode step (declared for the type checker):
    # computed: KV tokens while prefilling; b/c0/o0: step index, KV tokens and outputs at the
    # first decode step; res: step residue needing a new block; fstep: last decode step;
    # aseq: admission order; wseq/snap: waiting order and deferred-clock snapshot when requeued.
    computed: int
    b: int
    c0: int
    o0: int
    res: int
    fstep: int
    aseq: int
    wseq: int
    snap: int

    def __init__(
        self,
        rid: str,
        ast: _Adapter,
        rank: int,
        prompt: int,
        max_tokens: int,
        arr_s: float,
        deferred_ns: int,
    ) -> None:
        self.rid = rid
        self.ast = ast
        self.rank = rank
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.arr_s = arr_s
        self.target = prompt  # tokens to (re)compute: prompt (+ outputs if preempted)
        self.state = _PREFILL
        self.out = 0  # output tokens so far (decoders: o0 + steps since b)
        self.epoch = 0  # invalidates stale finish entries (Engine._fin)
        self.preemptions = 0
        self.first_ns = -1
        self.deferred_ns = deferred_ns


# A waiting-queue item: a row number (never admitted yet: its waiting order and snapshot are in
# its block) or a preempted, requeued _Req (they are its attributes). The waiting order ``wseq``
# counts up from 0 at the back and down from -1 at the front (requeued after a preemption).
_Item: TypeAlias = "int | _Req"
# A queue-head heap entry: (wseq of the head, tiebreak, adapter, head item). It is stale once
# the item is no longer the head of the adapter's queue.
_Head = tuple[int, int, _Adapter, "int | _Req"]


class Engine:
    """One simulated vLLM V1 engine. See the module docstring."""

    def __init__(self, config: EngineConfig, profile: PerformanceProfile) -> None:
        config.check()
        self.config = config
        # Bind the profile's slot-dependent terms to this engine's LoRA settings (the fitted
        # profiles price per-slot LoRA cost and padding by max_loras / max_lora_rank);
        # a profile already specialised by the caller (validate adds the workload's context
        # length) keeps its other settings.
        self.profile = profile = profile.specialize(
            max_loras=config.max_loras, max_lora_rank=config.max_lora_rank
        )
        cap = config.kv_capacity_tokens
        if cap is None:
            cap = profile.kv_capacity_tokens(
                max_loras=config.max_loras,
                max_lora_rank=config.max_lora_rank,
                lora_enabled=config.enable_lora,
            )
        self._bs = bs = config.block_size
        self._total_blocks = cap // bs
        if self._total_blocks * bs < config.max_model_len:
            raise EngineStartupError(
                f"The model's max seq len ({config.max_model_len}) is larger than the maximum "
                f"number of tokens that can be stored in KV cache ({self._total_blocks * bs}). "
                "Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
                "initializing the engine.",
                key="max_model_len",
            )
        self.kv_capacity_tokens = self._total_blocks * bs
        self._lora = config.enable_lora
        self._max_loras = config.max_loras if config.enable_lora else 1 << 30
        self._max_seqs = config.max_num_seqs
        self._max_tokens = config.max_num_batched_tokens
        self._max_len = config.max_model_len
        self._max_rank = config.max_lora_rank
        self._caches = LoraCaches(
            max_gpu=max(1, config.max_loras), max_cpu=max(config.max_loras, config.max_cpu_loras)
        )
        self._si = 0  # index of the next step
        self._tn = 0  # ns: end of the last step (earliest start of the next one)
        self._gfull = 0  # ns of step time during which all adapter slots were taken
        self._extra_s = 0.0  # adapter registration time charged to the next step
        self._blocks: dict[int, _Rows] = {}  # rows of requests never admitted, by block
        self._next_row = 0
        self._pend: deque[int] = deque()  # rows of future arrivals, in arrival order
        self._pend_heap: list[tuple[int, int]] = []  # ... and (ns, row) of those out of order
        self._pend_last = -(1 << 62)
        self._dropped: set[int] = set()  # rows aborted while still in the future
        self._reqs: dict[str, int | _Req] = {}  # unfinished requests by id (see _index_all)
        self._unindexed = False  # some unfinished bulk-added requests are not in _reqs
        self._n_live = 0  # unfinished requests
        self._adapters: dict[str | None, _Adapter] = {}
        self._alist: list[_Adapter] = []  # the same, by _Adapter.idx
        self._base: _Adapter | None = None  # the base model's (name None)
        # Global FCFS order = the smallest head of the per-adapter queues: a lazy heap of
        # queue heads (see _Head).
        self._heads: list[_Head] = []
        self._elig: list[_Head] = []  # same, adapters holding a slot
        self._heads_stale = False  # _heads misses heads queued while all slots were taken
        # add_arrays' adapter table and its columns (see _adapter_columns)
        self._columns: (
            tuple[tuple[tuple[str | None, int], ...], np.ndarray, np.ndarray, np.ndarray] | None
        ) = None
        self._nheads = 0
        self._front = -1
        self._back = 0
        self._n_waiting = 0
        self._running: dict[_Req, None] = {}  # running queue in admission order
        self._run_ad: dict[str, _Adapter] = {}  # adapters with running requests
        self._ranks: dict[int, int] = {}  # rank -> running requests of that rank
        self._prefiller: _Req | None = None  # the partially prefilled request (tail of running)
        # Decoders by the step they finish in: step -> [(aseq, epoch, req)], and a heap of those
        # steps (ints: cheaper to sift than one heap of per-request tuples).
        self._fin: dict[int, list[tuple[int, int, _Req]]] = {}
        self._fsteps: list[int] = []
        self._cnt = [0] * bs  # decoders by block phase
        self._n_decode = 0
        self._used = 0  # KV blocks in use
        self._aseq = 0
        self.num_preemptions_total = 0
        self.loads_from_disk = 0
        self.loads_from_memory = 0
        self.steps_total = 0

    # --- observable state ---------------------------------------------------------------------

    @property
    def time_s(self) -> float:
        """End of the last step (engine seconds)."""
        return self._tn / NS

    @property
    def next_step_start_s(self) -> float | None:
        """When the next step would start, or None when there is nothing to do."""
        if self._running or self._n_waiting:
            return self._tn / NS
        nxt = self._next_arrival_ns()
        return None if nxt is None else max(self._tn, nxt) / NS

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def num_deferred(self) -> int:
        """Waiting requests whose adapter is locked out because all adapter slots are taken."""
        if not self._lora or len(self._run_ad) < self._max_loras:
            return 0
        base = self._adapters.get(None)
        n = self._n_waiting - (len(base.queue) if base is not None else 0)
        return n - sum(len(a.queue) for a in self._run_ad.values())

    @property
    def kv_usage(self) -> float:
        return self._used / self._total_blocks

    @property
    def running_adapters(self) -> list[str]:
        return list(self._run_ad)

    def gpu_adapters(self) -> list[str]:
        return self._caches.gpu()

    def cpu_adapters(self) -> list[str]:
        return self._caches.cpu()

    def has_unfinished(self) -> bool:
        return self._n_live > 0

    # --- requests and adapters ----------------------------------------------------------------

    def add_request(self, req: EngineRequest) -> None:
        """Queue ``req``; it joins the waiting queue at ``req.arrival_s`` (validated first).

        Raises :class:`InvalidRequestError` as vLLM would (context length, LoRA rank, ...).
        """
        if self._unindexed:
            self._index_all()
        rid = req.request_id
        if rid in self._reqs:
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
        validate_request(req, self.config)
        adapter, rank = req.adapter, req.adapter_rank
        ast = self._adapter(adapter, rank)
        ns = int(req.arrival_s * NS + 0.5)
        g = self._next_row
        with _gc_paused():
            blk = self._blocks.get(g >> _SHIFT)
            if blk is None:
                blk = self._blocks[g >> _SHIFT] = _Rows()
            blk.rid.append(rid)
            blk.aid.append(ast.idx)
            blk.rank.append(rank if adapter is not None else 0)
            blk.prompt.append(req.prompt_tokens)
            blk.max_tokens.append(req.max_tokens)
            blk.arr_s.append(req.arrival_s)
            blk.ns.append(ns)
            blk.live += 1
            self._next_row = g + 1
            self._reqs[rid] = g
            self._n_live += 1
            self._place(g, ns)

    def add_requests(self, reqs: Iterable[EngineRequest]) -> None:
        """``add_request`` for many requests at once: the fast path for simulations.

        Request ids must be unique (not checked here); they are indexed only when needed
        (by :meth:`abort` or :meth:`add_request`). If a request is invalid, the ones before it
        are queued and :class:`InvalidRequestError` is raised for it.
        """
        rid: list[str] = []
        adapter: list[str | None] = []
        rank: list[int] = []
        prompt: list[int] = []
        max_tokens: list[int] = []
        arr_s: list[float] = []
        max_len, max_rank, lora = self._max_len, self._max_rank, self._lora
        bad: EngineRequest | None = None
        for req in reqs:
            p, m, a, k = req.prompt_tokens, req.max_tokens, req.adapter, req.adapter_rank
            if not (
                p > 0 and m > 0 and p + m <= max_len and (a is None or (lora and k <= max_rank))
            ):
                bad = req
                break
            rid.append(req.request_id)
            adapter.append(a)
            rank.append(k)
            prompt.append(p)
            max_tokens.append(m)
            arr_s.append(req.arrival_s)
        names: dict[str | None, int] = {}
        for a, k in zip(adapter, rank, strict=True):  # the adapter's rank: the largest seen
            if names.get(a, -1) < k:
                names[a] = k
        asts = {a: self._adapter(a, k) for a, k in names.items()}
        self._add_rows(
            rid,
            [asts[a].idx for a in adapter],
            [k if a is not None else 0 for a, k in zip(adapter, rank, strict=True)],
            prompt,
            max_tokens,
            arr_s,
            [int(t * NS + 0.5) for t in arr_s],
        )
        if bad is not None:
            validate_request(bad, self.config)
            raise AssertionError(
                "unreachable: the request failed the fast check"
            )  # pragma: no cover

    def add_arrays(
        self,
        request_ids: Sequence[str],
        arrival_s: ArrayLike,
        adapter: ArrayLike,
        prompt_tokens: ArrayLike,
        max_tokens: ArrayLike,
        *,
        adapters: Sequence[tuple[str | None, int]],
    ) -> None:
        """``add_requests`` from columns: request ``i`` arrives at ``arrival_s[i]`` for adapter
        ``adapters[adapter[i]]`` (a ``(name, rank)`` pair, name None = base model).

        The cheapest way to feed a simulation (no request objects). All or nothing: if a request
        is invalid, none is queued and :class:`InvalidRequestError` is raised for the first one.
        ``request_ids`` may be :class:`NumberedIds`: the id strings are then made only for the
        requests whose id is read (admitted, or looked up by :meth:`abort`).
        """
        t = np.asarray(arrival_s, dtype=np.float64)
        idx = np.asarray(adapter, dtype=np.int64)
        p = np.asarray(prompt_tokens, dtype=np.int64)
        m = np.asarray(max_tokens, dtype=np.int64)
        n = len(request_ids)
        if not t.shape == idx.shape == p.shape == m.shape == (n,):
            raise ValueError("add_arrays: the columns must be 1-D and of the same length")
        if n and (idx.min() < 0 or idx.max() >= len(adapters)):
            raise ValueError("add_arrays: an adapter index is out of range")
        ranks, named, table = self._adapter_columns(adapters)
        bad = (p < 1) | (m < 1) | (p + m > self._max_len)
        if self._lora:
            bad |= named[idx] & (ranks[idx] > self._max_rank)
        else:
            bad |= named[idx]
        if bad.any():
            i = int(np.argmax(bad))
            name, rank = adapters[int(idx[i])]
            req = EngineRequest(
                request_id=request_ids[i],
                adapter=name,
                adapter_rank=rank,
                prompt_tokens=int(p[i]),
                max_tokens=int(m[i]),
                arrival_s=float(t[i]),
            )
            validate_request(req, self.config)
            raise AssertionError(
                "unreachable: the request failed the vector check"
            )  # pragma: no cover
        new = np.zeros(len(adapters), dtype=bool)
        new[idx] = True
        new &= table < 0
        for j in np.flatnonzero(new).tolist():  # the adapter's rank: the largest seen
            name, rank = adapters[j]
            table[j] = self._adapter(name, rank).idx
        ns = (t * NS + 0.5).astype(np.int64)  # int(t * NS + 0.5)
        self._add_rows(
            request_ids,
            array("q", table[idx].tobytes()),
            array("q", ranks[idx].tobytes()),
            array("q", p.tobytes()),
            array("q", m.tobytes()),
            array("d", t.tobytes()),
            array("q", ns.tobytes()),
            in_order=bool(np.all(ns[1:] >= ns[:-1])),
        )

    def _adapter_columns(
        self, adapters: Sequence[tuple[str | None, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``add_arrays``' adapter columns: ranks (0 = base model), named, and the engine's
        adapter index (-1: not registered by this table yet; the caller fills it in).

        Cached for the last table seen (a simulator passes the same one with every slice): an
        adapter registered once through a ``(name, rank)`` pair needs no new registration for
        that pair, as registration only raises the adapter's rank to the largest seen.
        """
        key = tuple(adapters)
        cached = self._columns
        if cached is not None and cached[0] == key:
            return cached[1], cached[2], cached[3]
        ranks = np.array([k if a is not None else 0 for a, k in key], dtype=np.int64)
        named = np.array([a is not None for a, _ in key], dtype=bool)
        table = np.full(len(key), -1, dtype=np.int64)
        self._columns = (key, ranks, named, table)
        return ranks, named, table

    def _add_rows(
        self,
        rid: Sequence[str],
        aid: Sequence[int],
        rank: Sequence[int],
        prompt: Sequence[int],
        max_tokens: Sequence[int],
        arr_s: Sequence[float],
        ns: Sequence[int],
        *,
        in_order: bool | None = None,
    ) -> None:
        """Store validated requests as rows and queue them (future ones by arrival).

        ``in_order``: whether ``ns`` is non-decreasing (None: check here)."""
        n = len(rid)
        if not n:
            return
        g0 = g = self._next_row
        blocks = self._blocks
        with _gc_paused():
            pos = 0
            while pos < n:
                blk = blocks.get(g >> _SHIFT)
                if blk is None:
                    blk = blocks[g >> _SHIFT] = _Rows()
                end = pos + min(n - pos, _BLOCK - (g & _MASK))
                if isinstance(rid, NumberedIds):  # ids made when read (see _Rows.id)
                    lo = len(blk.rid)
                    blk.spans.append((lo, lo + end - pos, rid.prefix, rid.start + pos))
                    blk.rid += [None] * (end - pos)
                else:
                    blk.rid += rid[pos:end]
                blk.aid.extend(aid[pos:end])
                blk.rank.extend(rank[pos:end])
                blk.prompt.extend(prompt[pos:end])
                blk.max_tokens.extend(max_tokens[pos:end])
                blk.arr_s.extend(arr_s[pos:end])
                blk.ns.extend(ns[pos:end])
                blk.live += end - pos
                g += end - pos
                pos = end
            self._next_row = g
            self._unindexed = True
            self._n_live += n
            if in_order is None:
                in_order = all(map(le, ns, ns[1:]))
            if in_order:  # in arrival order: the usual case
                # The rows already due join the waiting queue one by one; the others are all
                # in the future and, if none is earlier than the last pending arrival, are
                # appended to the pending queue at once (as _place would, row by row).
                k = bisect.bisect_right(ns, self._tn)
                for i in range(k):
                    self._place(g0 + i, ns[i])
                if k < n and ns[k] >= self._pend_last:
                    self._pend.extend(range(g0 + k, g))
                    self._pend_last = ns[-1]
                    return
            else:
                k = 0
            for i in range(k, n):
                self._place(g0 + i, ns[i])

    def _place(self, g: int, ns: int) -> None:
        """Queue row ``g`` arriving at ``ns``: in the future, or at the back of the waiting
        queue (after the earlier arrivals still pending) when it is already due."""
        tn = self._tn
        if ns > tn:
            if ns >= self._pend_last:
                self._pend.append(g)
                self._pend_last = ns
            else:
                heapq.heappush(self._pend_heap, (ns, g))
        else:
            if self._pend or self._pend_heap:
                self._admit_arrivals(tn)  # earlier arrivals first: FCFS by arrival
            self._enqueue_back(g)

    def abort(self, request_id: str) -> bool:
        """Drop an unfinished request wherever it is (between steps). False if unknown."""
        r = self._reqs.pop(request_id, None)
        if r is None and self._unindexed:
            self._index_all()
            r = self._reqs.pop(request_id, None)
        if r is None:
            return False
        self._n_live -= 1
        if not isinstance(r, _Req):  # never admitted: waiting, or still in the future
            ast = self._alist[self._blocks[r >> _SHIFT].aid[r & _MASK]]
            if not self._unqueue(ast, r):
                self._dropped.add(r)  # skipped (and its row released) when it comes due
                return True
            self._release_row(r)
            return True
        st = r.state
        ast = r.ast
        if st == _REQUEUED:
            self._unqueue(ast, r)
        elif st == _PREFILL:
            self._used -= -(-r.computed // self._bs)
            self._prefiller = None
            self._leave_running(r)
        elif st == _DECODE:
            self._used -= -(-(r.c0 + self._si - r.b) // self._bs)
            self._cnt[r.res] -= 1
            self._n_decode -= 1
            r.epoch += 1
            self._leave_running(r)
        r.state = _DONE
        return True

    def _unqueue(self, ast: _Adapter, req: int | _Req) -> bool:
        """Remove ``req`` from ``ast``'s waiting queue; False if it is not there."""
        q = ast.queue
        for k, e in enumerate(q):
            if e == req:  # rows: the same number; requests: the same object
                del q[k]
                if k == 0 and q:
                    self._push_head(self._wseq(q[0]), ast, q[0])
                self._n_waiting -= 1
                return True
        return False

    def load_adapter(self, name: str, rank: int, *, to_gpu: bool = False) -> float:
        """Register ``name`` in the CPU cache (and a GPU slot if ``to_gpu`` and one is free).

        Models vLLM's start-up (``--lora-modules``) and runtime (``/v1/load_lora_adapter``)
        loads. Returns the load time; when the engine is busy it is added to the next step.
        """
        ast = self._adapter(name, rank)
        from_disk, gpu = self._caches.preload(name, to_gpu=to_gpu)
        cost = 0.0
        if from_disk:
            self.loads_from_disk += 1
            cost += self.profile.disk_to_cpu_load_s(ast.rank)
        if gpu:
            self.loads_from_memory += 1
            cost += self.profile.cpu_to_gpu_load_s(ast.rank)
        if self._running or self._n_waiting:
            self._extra_s += cost
        return cost

    def unload_adapter(self, name: str) -> bool:
        """Drop an idle adapter from the caches (False if absent or in use)."""
        return self._caches.remove(name)

    # --- driving the engine -------------------------------------------------------------------

    def step(self, now_s: float) -> StepResult:
        """Run exactly one engine step starting at ``max(now_s, time_s)``.

        With nothing to do, returns a zero-length result and does not move time.
        """
        start = max(self._tn, _ns(now_s))
        self._admit_arrivals(start)
        if not self._running and not self._n_waiting:
            return StepResult(start / NS, 0.0)
        self._tn = start
        res = StepResult(start / NS, 0.0)
        dur = self._step(res.events, res.finished)
        res.duration_s = dur / NS
        return res

    def run_until(self, t_s: float) -> list[RequestRecord]:
        """Run every step that starts before ``t_s``; return the requests finished meanwhile."""
        with _gc_paused():
            return self._run_until(_ns(t_s))

    def _run_until(self, t_end: int) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        while self._tn < t_end:
            self._admit_arrivals(self._tn)
            if not self._running and not self._n_waiting:
                nxt = self._next_arrival_ns()
                if nxt is not None and nxt < t_end:
                    self._tn = nxt
                    continue
                break
            if not self._fast_forward(t_end):
                self._step(None, records)
        return records

    # --- internals ----------------------------------------------------------------------------

    def _index_all(self) -> None:
        """Index every unfinished request by id (bulk adds skip it: it costs per request)."""
        blocks = self._blocks
        dropped = self._dropped
        index: dict[str, int | _Req] = {}
        rows = [*self._pend, *(g for _, g in self._pend_heap)]
        for ast in self._adapters.values():
            for r in ast.queue:
                if isinstance(r, _Req):
                    index[r.rid] = r
                else:
                    rows.append(r)
        for g in rows:
            if g not in dropped:
                index[blocks[g >> _SHIFT].id(g & _MASK)] = g
        for r in self._running:
            index[r.rid] = r
        self._reqs = index
        self._unindexed = False

    def _release_row(self, g: int) -> None:
        """Row ``g`` is no longer needed (admitted or aborted); free its block when done."""
        k = g >> _SHIFT
        blk = self._blocks[k]
        blk.live -= 1
        if not blk.live and len(blk.ns) == _BLOCK:
            del self._blocks[k]

    def _adapter(self, name: str | None, rank: int) -> _Adapter:
        ast = self._adapters.get(name)
        if ast is None:
            ast = self._adapters[name] = _Adapter(name, rank, len(self._alist))
            self._alist.append(ast)
            if name is None:
                self._base = ast
        elif rank > ast.rank:
            ast.rank = rank
        return ast

    def _deferred_clock(self, ast: _Adapter) -> int:
        """ns so far during which all slots were taken and ``ast`` was not among them."""
        if ast.n_running:
            return ast.g0 - ast.r_acc
        return self._gfull - ast.r_acc

    def _drop_due(self, g: int) -> bool:
        """True (and the row released) if future row ``g`` was aborted."""
        if g in self._dropped:
            self._dropped.discard(g)
            self._release_row(g)
            return True
        return False

    def _next_arrival_ns(self) -> int | None:
        pend = self._pend
        heap = self._pend_heap
        if self._dropped:
            while pend and self._drop_due(pend[0]):
                pend.popleft()
            while heap and self._drop_due(heap[0][1]):
                heapq.heappop(heap)
        if pend:
            g = pend[0]
            first = self._blocks[g >> _SHIFT].ns[g & _MASK]
            return min(first, heap[0][0]) if heap else first
        return heap[0][0] if heap else None

    def _admit_arrivals(self, t_ns: int) -> None:
        """Move arrivals up to ``t_ns`` into the waiting queue, by (arrival, insertion)."""
        pend = self._pend
        heap = self._pend_heap
        if not heap and not self._dropped:
            # Fast path (the hottest loop under heavy load): arrivals only from the in-order
            # queue, none aborted; _enqueue_back inlined.
            if not pend:
                return
            g = pend[0]
            k = g >> _SHIFT
            blk = self._blocks[k]
            ns = blk.ns
            if ns[g & _MASK] > t_ns:
                return
            aid, wsq, snp = blk.aid, blk.wseq, blk.snap
            alist = self._alist
            back0 = back = self._back
            gfull = self._gfull
            while pend:
                g = pend.popleft()
                if g >> _SHIFT != k:
                    k = g >> _SHIFT
                    blk = self._blocks[k]
                    ns, aid, wsq, snp = blk.ns, blk.aid, blk.wseq, blk.snap
                i = g & _MASK
                if ns[i] > t_ns:
                    pend.appendleft(g)
                    break
                ast = alist[aid[i]]
                wsq[i] = back
                snp[i] = (ast.g0 if ast.n_running else gfull) - ast.r_acc
                q = ast.queue
                if q:
                    q.append(g)
                else:
                    q.append(g)  # before _push_head, whose pruning drops entries of empty queues
                    self._push_head(back, ast, g)
                back += 1
            self._back = back
            self._n_waiting += back - back0
            return
        blocks = self._blocks  # general case: out-of-order arrivals, aborted future rows
        while True:
            a = blocks[pend[0] >> _SHIFT].ns[pend[0] & _MASK] if pend else None
            if heap and (a is None or heap[0][0] < a):  # ties: in-order first
                if heap[0][0] > t_ns:
                    return
                g = heapq.heappop(heap)[1]
            elif a is not None and a <= t_ns:
                g = pend.popleft()
            else:
                return
            if not (self._dropped and self._drop_due(g)):
                self._enqueue_back(g)

    def _enqueue_back(self, g: int) -> None:
        blk = self._blocks[g >> _SHIFT]
        i = g & _MASK
        ast = self._alist[blk.aid[i]]
        wseq = self._back
        self._back += 1
        blk.wseq[i] = wseq
        blk.snap[i] = self._deferred_clock(ast)
        q = ast.queue
        q.append(g)  # before _push_head
        if len(q) == 1:
            self._push_head(wseq, ast, g)
        self._n_waiting += 1

    def _enqueue_front(self, r: _Req) -> None:
        r.state = _REQUEUED
        r.wseq = wseq = self._front
        self._front -= 1
        ast = r.ast
        r.snap = self._deferred_clock(ast)
        ast.queue.appendleft(r)
        self._push_head(wseq, ast, r)
        self._n_waiting += 1

    def _wseq(self, item: _Item) -> int:
        """Waiting order of a queued item."""
        if isinstance(item, _Req):
            return item.wseq
        return self._blocks[item >> _SHIFT].wseq[item & _MASK]

    def _tokens(self, item: _Item) -> int:
        """Tokens a queued item needs to compute when admitted (prompt, + outputs if requeued)."""
        if isinstance(item, _Req):
            return item.target
        return self._blocks[item >> _SHIFT].prompt[item & _MASK]

    def _push_head(self, wseq: int, ast: _Adapter, item: _Item) -> None:
        """``item`` (waiting order ``wseq``) is the new head of ``ast``'s queue: record it in the
        global-order heap, and in the heap of eligible heads (adapters holding a slot) when
        ``ast`` has running requests."""
        self._nheads += 1
        entry = (wseq, self._nheads, ast, item)
        limit = 64 + 4 * len(self._adapters)
        # An entry is live while its item heads its queue (the heap holds the very object the
        # queue holds). A row is queued once. A request requeued again after a new preemption
        # makes its older entries look live once more, but they carry larger (later) wseqs than
        # its current entry, which therefore always surfaces first: the order is unchanged.
        # ``item`` heads ``ast``'s queue now, so an entry of ``ast`` on top of a heap is stale
        # (or an older entry of the same requeued item): replacing it saves its later pop (the
        # usual case: the head just admitted was the top).
        if len(self._run_ad) >= self._max_loras:
            # All slots taken: _candidate reads only base-model and eligible heads until a slot
            # frees up; it rebuilds the global heap then (rare, and saves a push per admission
            # under overload).
            self._heads_stale = True
        else:
            heads = self._heads
            if heads and heads[0][2] is ast:
                heapq.heapreplace(heads, entry)
            else:
                heapq.heappush(heads, entry)
            if len(heads) > limit:  # drop stale entries now and then
                live = [h for h in heads if h[2].queue and h[2].queue[0] is h[3]]
                heapq.heapify(live)
                self._heads = live
        if ast.n_running and ast.name is not None:
            elig = self._elig
            if elig and elig[0][2] is ast:
                heapq.heapreplace(elig, entry)
            else:
                heapq.heappush(elig, entry)
            if len(self._elig) > limit:
                live = [
                    h for h in self._elig if h[2].n_running and h[2].queue and h[2].queue[0] is h[3]
                ]
                heapq.heapify(live)
                self._elig = live

    def _rebuild_heads(self) -> None:
        """The global-order heap from scratch: one entry per non-empty queue."""
        heads: list[_Head] = []
        for ast in self._alist:
            q = ast.queue
            if q:
                self._nheads += 1
                heads.append((self._wseq(q[0]), self._nheads, ast, q[0]))
        heapq.heapify(heads)
        self._heads = heads
        self._heads_stale = False

    def _candidate(self) -> _Item | None:
        """The first waiting request the scheduler's walk would not skip (None: all deferred)."""
        if len(self._run_ad) < self._max_loras:
            if self._heads_stale:
                self._rebuild_heads()
            heads = self._heads
            while True:
                _, _, ast, item = heads[0]
                q = ast.queue
                if q and q[0] is item:
                    return item
                heapq.heappop(heads)
        # All slots taken: only base-model requests and adapters holding a slot are eligible.
        best: _Item | None = None
        base = self._base
        if base is not None and base.queue:
            best = base.queue[0]
        elig = self._elig
        while elig:
            wseq, _, ast, item = elig[0]
            q = ast.queue
            if ast.n_running and q and q[0] is item:
                if best is None or wseq < self._wseq(best):
                    best = item
                break
            heapq.heappop(elig)
        return best

    def _admit(self, item: _Item) -> tuple[_Req, float]:
        """Move ``item``, the head of its adapter's queue, from waiting to running; returns its
        request and the adapter load time it causes."""
        if isinstance(item, _Req):
            r = item
            ast = r.ast
            if ast.name is not None:
                r.deferred_ns += self._deferred_clock(ast) - r.snap
        else:  # first admission
            g = item
            k = g >> _SHIFT
            blk = self._blocks[k]
            i = g & _MASK
            ast = self._alist[blk.aid[i]]
            deferred = 0
            if ast.name is not None:  # inlined _deferred_clock (hot under heavy load)
                deferred = (ast.g0 if ast.n_running else self._gfull) - ast.r_acc - blk.snap[i]
            rid = blk.rid[i]
            r = _Req(
                blk.id(i) if rid is None else rid,
                ast,
                blk.rank[i],
                blk.prompt[i],
                blk.max_tokens[i],
                blk.arr_s[i],
                deferred,
            )
            blk.live -= 1  # inlined _release_row
            if not blk.live and len(blk.ns) == _BLOCK:
                del self._blocks[k]
            if self._reqs and r.rid in self._reqs:
                self._reqs[r.rid] = r
        q = ast.queue
        q.popleft()
        self._n_waiting -= 1
        r.state = _PREFILL
        self._aseq += 1
        r.aseq = self._aseq
        self._running[r] = None
        self._ranks[r.rank] = self._ranks.get(r.rank, 0) + 1
        load = 0.0
        if ast.n_running == 0 and ast.name is not None:
            ast.g0 = self._gfull
            self._run_ad[ast.name] = ast
            from_disk, from_mem = self._caches.acquire(ast.name)
            if from_disk:
                self.loads_from_disk += 1
                load += self.profile.disk_to_cpu_load_s(ast.rank)
            if from_mem:
                self.loads_from_memory += 1
                load += self.profile.cpu_to_gpu_load_s(ast.rank)
        ast.n_running += 1
        if q:
            h = q[0]  # the new head; inlined _wseq
            if isinstance(h, _Req):
                self._push_head(h.wseq, ast, h)
            else:
                self._push_head(self._blocks[h >> _SHIFT].wseq[h & _MASK], ast, h)
        return r, load

    def _leave_running(self, r: _Req) -> None:
        del self._running[r]
        n = self._ranks[r.rank] - 1
        if n:
            self._ranks[r.rank] = n
        else:
            del self._ranks[r.rank]
        ast = r.ast
        ast.n_running -= 1
        if ast.n_running == 0 and ast.name is not None:
            del self._run_ad[ast.name]
            ast.r_acc += self._gfull - ast.g0
            self._caches.release(ast.name)

    def _preempt(self, v: _Req, s: int) -> None:
        bs = self._bs
        if v.state == _DECODE:
            v.out = v.o0 + s - v.b
            self._used -= -(-(v.c0 + s - v.b) // bs)
            self._cnt[v.res] -= 1
            self._n_decode -= 1
            v.epoch += 1
        else:
            self._used -= -(-v.computed // bs)
            self._prefiller = None
        self._leave_running(v)
        v.computed = 0
        v.target = v.prompt + v.out
        v.preemptions += 1
        self.num_preemptions_total += 1
        self._enqueue_front(v)

    def _preempt_for(self, s: int, need: int, pf_need: int) -> None:
        """Running loop when the step's KV needs exceed the free blocks: preempt from the tail.

        vLLM walks the running queue in order and, whenever a request cannot get its blocks,
        preempts the tail until it can (or the request itself was the tail). The requests left
        are the longest prefix whose needs fit in the free blocks plus the blocks freed by the
        preempted suffix, so the suffix is found from the tail without walking the prefix.
        """
        running = self._running
        phase = s % self._bs
        total = self._total_blocks
        while need > total - self._used:
            v = next(reversed(running))
            if v.state == _DECODE:
                if v.res == phase:
                    need -= 1
            else:
                need -= pf_need
            self._preempt(v, s)
        self._used += need

    def _step(self, events: list[TokenEvent] | None, records: list[RequestRecord]) -> int:
        """One engine step starting at ``self._tn``; returns its duration in ns."""
        s = self._si
        bs = self._bs
        total = self._total_blocks
        running = self._running
        cnt = self._cnt
        pf = self._prefiller
        budget = self._max_tokens - self._n_decode
        need = cnt[s % bs]
        pf_chunk = 0
        if pf is not None:
            pf_chunk = min(pf.target - pf.computed, budget)
            need += -(-(pf.computed + pf_chunk) // bs) + (pf.computed // -bs)
        preempted = need > total - self._used
        if preempted:
            pf_need = need - cnt[s % bs]
            self._preempt_for(s, need, pf_need)
            if pf is not None and self._prefiller is None:
                pf = None
                pf_chunk = 0
            budget = self._max_tokens - self._n_decode - pf_chunk
        else:
            self._used += need
            budget -= pf_chunk
        pdone: list[_Req] = []
        if pf is not None:
            pf.computed += pf_chunk
            if pf.computed == pf.target:
                pdone.append(pf)
                self._prefiller = None
        prefill_tokens = pf_chunk
        load_s = 0.0
        # Waiting queue (skipped entirely in a step that preempted, as vLLM does).
        if not preempted and budget > 0 and self._n_waiting:
            max_seqs = self._max_seqs
            blocks = self._blocks
            while budget > 0 and self._n_waiting and len(running) < max_seqs:
                e = self._candidate()
                if e is None:
                    break
                # inlined _tokens
                n = e.target if isinstance(e, _Req) else blocks[e >> _SHIFT].prompt[e & _MASK]
                if n > budget:
                    n = budget
                nb = -(-n // bs)
                if nb > total - self._used:
                    break
                r, load = self._admit(e)
                load_s += load
                self._used += nb
                budget -= n
                prefill_tokens += n
                r.computed = n
                if n == r.target:
                    pdone.append(r)
                else:
                    self._prefiller = r
        ranks = self._ranks
        n_adapters = len(self._run_ad)
        dur_s = self.profile.step_time_s(
            batch_size=len(running),
            distinct_adapters=n_adapters,
            prefill_tokens=prefill_tokens,
            decode_tokens=self._n_decode,
            max_rank_in_batch=max(ranks) if ranks else 0,
            num_waiting=self._n_waiting,
            lora_enabled=self._lora,
        )
        dur_s += load_s + self._extra_s
        self._extra_s = 0.0
        dur = max(1, round(dur_s * NS))
        if n_adapters >= self._max_loras:
            self._gfull += dur
        end = self._tn + dur
        if events is not None:
            t = end / NS
            for r in running:
                if r.state == _DECODE:
                    events.append(TokenEvent(r.rid, t, 1, r.fstep == s, False))
            for r in pdone:
                done = r.out + 1 >= r.max_tokens
                events.append(TokenEvent(r.rid, t, 1, done, r.out == 0))
        # Decoders finishing in this step, in admission order. (Live entries finish exactly at
        # their step; buckets of earlier steps hold only stale ones.)
        fin = self._fin
        fsteps = self._fsteps
        while fsteps and fsteps[0] <= s:
            bucket = fin.pop(heapq.heappop(fsteps))
            if len(bucket) > 1:
                bucket.sort()  # by aseq: unique per admission, so requests are never compared
            for _, epoch, r in bucket:
                if r.epoch != epoch or r.state != _DECODE:
                    continue
                self._used -= -(-(r.c0 + s - r.b + 1) // bs)
                cnt[r.res] -= 1
                self._n_decode -= 1
                r.out = r.max_tokens
                self._finish(r, end, records)
        # Prefills completed in this step: first (or next, after preemption) output token.
        nxt = s + 1
        for r in pdone:
            r.out += 1
            if r.first_ns < 0:
                r.first_ns = end
            m = r.max_tokens
            if r.out >= m:
                self._used -= -(-r.target // bs)
                self._finish(r, end, records)
                continue
            r.state = _DECODE
            r.b = nxt
            r.c0 = r.target
            r.o0 = r.out
            r.res = (nxt - r.target) % bs
            r.fstep = fs = nxt + m - 1 - r.out
            cnt[r.res] += 1
            self._n_decode += 1
            same = fin.get(fs)
            if same is None:
                fin[fs] = [(r.aseq, r.epoch, r)]
                heapq.heappush(fsteps, fs)
            else:
                same.append((r.aseq, r.epoch, r))
        self._tn = end
        self._si = nxt
        self.steps_total += 1
        return dur

    def _finish(self, r: _Req, end: int, records: list[RequestRecord]) -> None:
        self._leave_running(r)
        r.state = _DONE
        self._n_live -= 1
        if self._reqs:
            self._reqs.pop(r.rid, None)
        records.append(
            RequestRecord(
                r.rid,
                r.ast.name,
                r.arr_s,
                r.first_ns / NS,
                end / NS,
                r.prompt,
                r.out,
                r.deferred_ns / NS,
                r.preemptions,
            )
        )

    def _has_live(self, fstep: int) -> bool:
        """Whether a decoder still finishes at step ``fstep`` (its bucket has a live entry)."""
        return any(r.epoch == e and r.state == _DECODE for _, e, r in self._fin[fstep])

    def _fast_forward(self, t_end: int) -> bool:
        """Advance a run of identical pure-decode steps in closed form; False if none."""
        n_dec = self._n_decode
        if self._prefiller is not None or self._extra_s or n_dec == 0:
            return False
        fsteps = self._fsteps
        while not self._has_live(fsteps[0]):
            del self._fin[heapq.heappop(fsteps)]
        s = self._si
        k = fsteps[0] - s  # steps before the first finishing step
        if k <= 0:
            return False
        bs = self._bs
        cnt = self._cnt
        phase = s % bs
        free = self._total_blocks - self._used
        if cnt[phase] > free:
            return False
        if self._n_waiting and len(self._running) < self._max_seqs:
            c = self._candidate()
            if c is not None:
                n = min(self._tokens(c), self._max_tokens - n_dec)
                if -(-n // bs) <= free - cnt[phase]:
                    return False  # an admission would happen in this step
        ranks = self._ranks
        n_adapters = len(self._run_ad)
        dur_s = self.profile.step_time_s(
            batch_size=n_dec,
            distinct_adapters=n_adapters,
            prefill_tokens=0,
            decode_tokens=n_dec,
            max_rank_in_batch=max(ranks) if ranks else 0,
            num_waiting=self._n_waiting,
            lora_enabled=self._lora,
        )
        dur = max(1, round(dur_s * NS))
        t0 = self._tn
        k = min(k, (t_end - t0 + dur - 1) // dur)
        nxt = self._next_arrival_ns()
        if nxt is not None:
            k = min(k, (nxt - t0 + dur - 1) // dur)
        # KV: the longest run whose block allocations all fit.
        cycles, rem = divmod(free, n_dec)
        j = 0
        acc = 0
        while j < bs:
            acc += cnt[(phase + j) % bs]
            if acc > rem:
                break
            j += 1
        k = min(k, cycles * bs + j)
        if k <= 0:
            return False
        full, part = divmod(k, bs)
        used = full * n_dec
        for i in range(part):
            used += cnt[(phase + i) % bs]
        self._used += used
        self._tn = t0 + k * dur
        self._si = s + k
        if n_adapters >= self._max_loras:
            self._gfull += k * dur
        self.steps_total += k
        return True
