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
(plus a lazily cleaned global FCFS queue of their heads), so deferral never rescans the waiting
list.

And no Python work per arrival that only joins a queue: a request never admitted is a row of
columns; each adapter keeps its rows, waiting or still to arrive, in waiting order (a "stream",
filled in bulk when requests are added), so an arrival check only counts the rows that arrived
and records the slots-full clock in them (one value for all, see :class:`_Adapter` for how the
deferred time follows from it); only an adapter whose queue was empty ("sleeping") is woken.
Under overload, where most requests only ever wait, that is most arrivals.
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

import numpy as np
from numpy.typing import ArrayLike

from loragate.core.errors import InvalidRequestError
from loragate.twin.engine_state import (
    _BLOCK,
    _DECODE,
    _DONE,
    _FRONT,
    _MASK,
    _PREFILL,
    _REQUEUED,
    _ROW_BITS,
    _SHIFT,
    _Adapter,
    _Head,
    _Item,
    _Req,
    _Rows,
)
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
_NEVER = 1 << 62  # ns: later than any time


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


class Engine:
    """One simulated vLLM V1 engine. See the module docstring."""

    # Slots: attribute access is the engine's bread and butter, and an instance of this many
    # attributes would otherwise keep them in an unshared dict (slower to read and write).
    __slots__ = (
        "_adapters",
        "_alist",
        "_aseq",
        "_base",
        "_blocks",
        "_bs",
        "_caches",
        "_cnt",
        "_columns",
        "_dropped",
        "_due",
        "_elig",
        "_extra_s",
        "_fin",
        "_front",
        "_fsteps",
        "_gfull",
        "_heads",
        "_heads_limit",
        "_heads_stale",
        "_load_s",
        "_lora",
        "_max_len",
        "_max_loras",
        "_max_rank",
        "_max_seqs",
        "_max_tokens",
        "_n_decode",
        "_n_live",
        "_n_waiting",
        "_next_row",
        "_nheads",
        "_pend",
        "_pend_heap",
        "_pend_last",
        "_prefiller",
        "_rank_max",
        "_rank_n",
        "_reqs",
        "_run_ad",
        "_running",
        "_si",
        "_sleep",
        "_t_check",
        "_tn",
        "_total_blocks",
        "_unindexed",
        "_used",
        "config",
        "kv_capacity_tokens",
        "loads_from_disk",
        "loads_from_memory",
        "num_preemptions_total",
        "profile",
        "steps_total",
    )

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
        self._load_s = 0.0  # adapter load time of the admissions of the current step
        self._blocks: dict[int, _Rows] = {}  # rows of requests never admitted, by block
        self._next_row = 0
        # Rows of future arrivals in arrival order, as runs of consecutive row numbers, and
        # (ns, row) of those added out of order; _due: the earliest of their arrivals.
        self._pend: deque[range] = deque()
        self._pend_heap: list[tuple[int, int]] = []
        self._pend_last = -_NEVER
        self._due = _NEVER
        self._dropped: set[int] = set()  # rows aborted while still in the future
        self._reqs: dict[str, int | _Req] = {}  # unfinished requests by id (see _index_all)
        self._unindexed = False  # some unfinished bulk-added requests are not in _reqs
        self._n_live = 0  # unfinished requests
        self._adapters: dict[str | None, _Adapter] = {}
        self._alist: list[_Adapter] = []  # the same, by _Adapter.idx
        # Arrivals: rows with ns <= _t_check have joined the waiting queue (an arrival check:
        # _admit_arrivals); _sleep: (ns, row, adapter idx) of the adapters' sleepers.
        self._t_check = -_NEVER
        self._sleep: list[tuple[int, int, int]] = []
        self._base: _Adapter | None = None  # the base model's (name None)
        # Global FCFS order = the smallest head of the per-adapter queues: a lazy heap of
        # queue heads (see _Head).
        self._heads: list[_Head] = []
        self._elig: list[_Head] = []  # same, adapters holding a slot
        self._heads_stale = False  # _heads misses heads queued while all slots were taken
        self._heads_limit = 64  # prune stale heap entries past this size (64 + 4 per adapter)
        # add_arrays' adapter table and its columns (see _adapter_columns)
        self._columns: (
            tuple[tuple[tuple[str | None, int], ...], np.ndarray, np.ndarray, np.ndarray] | None
        ) = None
        self._nheads = 0
        self._front = _FRONT
        self._n_waiting = 0
        self._running: dict[_Req, None] = {}  # running queue in admission order
        self._run_ad: dict[str, _Adapter] = {}  # adapters with running requests
        # Running requests by LoRA rank (0: base model), and the largest rank among them.
        self._rank_n = [0] * (max(config.max_lora_rank, 0) + 1)
        self._rank_max = 0
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
        n = self._n_waiting
        if self._base is not None:
            n -= self._waiting(self._base)
        for a in self._run_ad.values():
            n -= self._waiting(a)
        return n

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
                    blk.add_span(len(blk.rid), end - pos, rid.prefix, rid.start + pos)
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
                # appended to the pending queue and to their adapters' streams at once (as
                # _place would, row by row).
                k = bisect.bisect_right(ns, self._tn)
                for i in range(k):
                    self._place(g0 + i, ns[i])
                if k < n and ns[k] >= self._pend_last:
                    self._pend_rows(g0 + k, g, ns[k], ns[-1])
                    self._stream_rows(g0 + k, aid[k:])
                    return
            else:
                k = 0
            for i in range(k, n):
                self._place(g0 + i, ns[i])

    def _place(self, g: int, ns: int) -> None:
        """Queue row ``g`` arriving at ``ns``: in the future, or at the back of the waiting
        queue (after the earlier arrivals still pending) when it is already due."""
        tn = self._tn
        blk = self._blocks[g >> _SHIFT]
        if ns > tn:
            if ns >= self._pend_last:
                self._pend_rows(g, g + 1, ns, ns)
            else:
                heapq.heappush(self._pend_heap, (ns, g))
                if ns < self._due:
                    self._due = ns
        else:
            if self._due <= tn:
                self._admit_arrivals(tn)  # earlier arrivals first: FCFS by arrival
            elif self._t_check < tn:
                self._t_check = tn  # (no pending arrival is due: this check moves nothing)
            # It joins the queue now, behind everything already there: its waiting order is
            # that of an arrival at ``tn`` (the arrival time itself stays in ``arr_s``).
            blk.ns[g & _MASK] = tn
            blk.snap[g & _MASK] = self._gfull
            self._n_waiting += 1
        self._stream_add(self._alist[blk.aid[g & _MASK]], g)

    def _stream_add(self, ast: _Adapter, g: int) -> None:
        """Put row ``g`` into ``ast``'s stream at its waiting order (at the end, usually)."""
        st = ast.stream
        ri = ast.ri
        wseq = self._wseq
        if ri == len(st) or wseq(st[-1]) < wseq(g):
            pos = len(st)
            st.append(g)
        else:  # it arrives before rows added earlier (out of order, or added already due)
            pos = bisect.bisect_right(st, wseq(g), ri, len(st), key=wseq)
            st.insert(pos, g)
            if pos < ast.due_end:
                ast.due_end += 1
        if pos == ri and not ast.front:
            self._refresh_head(ast)  # a new head, or a new sleeper

    def _stream_rows(self, g0: int, aid: Sequence[int]) -> None:
        """Rows ``g0, g0 + 1, ...`` of adapters ``aid`` (engine indices), all in the future and
        after every row added before, join the end of their adapters' streams."""
        alist = self._alist
        if len(aid) < 64:
            for g, a in enumerate(aid, g0):
                self._stream_add(alist[a], g)
            return
        # In bulk: the rows grouped by adapter (a stable sort keeps each group in row order).
        col = np.asarray(aid, dtype=np.int64)
        order = np.argsort(col, kind="stable")
        by_adapter = col[order]
        cuts = (np.flatnonzero(by_adapter[1:] != by_adapter[:-1]) + 1).tolist()
        rows = (order + g0).tobytes()
        lo = 0
        for a_idx, hi in zip(by_adapter[[0, *cuts]].tolist(), [*cuts, len(col)], strict=True):
            ast = alist[a_idx]
            st = ast.stream
            empty = ast.ri == len(st)
            st.frombytes(rows[8 * lo : 8 * hi])
            if empty and not ast.front:
                self._refresh_head(ast)  # its first row is still to arrive: a sleeper
            lo = hi

    def _pend_rows(self, lo: int, hi: int, first_ns: int, last_ns: int) -> None:
        """Rows ``lo..hi-1`` arrive in the future, in this order, at ``first_ns..last_ns``, not
        before any arrival already pending in order."""
        pend = self._pend
        if pend and pend[-1].stop == lo:
            pend[-1] = range(pend[-1].start, hi)
        else:
            pend.append(range(lo, hi))
        self._pend_last = last_ns
        if first_ns < self._due:
            self._due = first_ns

    def _set_due(self) -> None:
        """Recompute ``_due`` from the heads of the pending queues."""
        pend = self._pend
        heap = self._pend_heap
        due = heap[0][0] if heap else _NEVER
        if pend:
            g = pend[0].start
            a = self._blocks[g >> _SHIFT].ns[g & _MASK]
            if a < due:
                due = a
        self._due = due

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
            self._unqueue(ast, r)
            if self._row_ns(r) > self._t_check:
                self._dropped.add(r)  # skipped (and its row released) when it comes due
            else:
                self._n_waiting -= 1
                self._release_row(r)
            return True
        st = r.state
        ast = r.ast
        if st == _REQUEUED:
            self._unqueue(ast, r)
            self._n_waiting -= 1
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

    def _unqueue(self, ast: _Adapter, item: _Item) -> None:
        """Remove ``item`` (there) from ``ast``'s front or stream."""
        if isinstance(item, _Req):
            k = ast.front.index(item)
            del ast.front[k]
            at_head = k == 0
        else:
            st = ast.stream
            k = bisect.bisect_left(st, self._wseq(item), ast.ri, len(st), key=self._wseq)
            del st[k]
            if k < ast.due_end:
                ast.due_end -= 1
            at_head = k == ast.ri and not ast.front
        if at_head:
            self._refresh_head(ast)

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
        elif to_gpu and not self._caches.on_gpu(name):
            # Every slot is held by running requests. vLLM activates the adapter anyway
            # (``LRUCacheLoRAModelManager.activate_adapter`` evicts the least recently used
            # active one, which the batch uses): its next step copies that one back, evicting
            # this one. Charged: both copies (the order of the batch's activations can make it
            # two copies back; one is counted).
            displaced = self._adapters[self._caches.gpu()[0]]
            self.loads_from_memory += 2
            cost += self.profile.cpu_to_gpu_load_s(ast.rank)
            cost += self.profile.cpu_to_gpu_load_s(displaced.rank)
        if self._running or self._n_waiting:
            self._extra_s += cost
        return cost

    def unload_adapter(self, name: str) -> bool:
        """Drop an idle adapter from the caches (False if absent or in use)."""
        return self._caches.remove(name)

    def retire_adapter(self, name: str, as_name: str) -> bool:
        """Keep ``name``'s cached copy, idle, under ``as_name``, where it is in the LRUs.

        vLLM 0.32's unload only forgets the name: the engine keeps the copy under its old
        ``lora_int_id``, and a name loaded again gets a new id, so the old copy takes a CPU
        cache entry (and its GPU slot) until the LRUs evict it, and evicts another adapter
        one load sooner. False if ``name`` is not cached or running requests use it (then a
        load replaces it, as ``reload_adapter`` says).
        """
        return self._caches.rename(name, as_name)

    def reload_adapter(self, name: str, rank: int) -> float:
        """vLLM's runtime ``add_lora``: the folder is read from disk whatever the caches hold.

        A runtime registration always reaches vLLM's worker as a load (a new name gets a new
        ``lora_int_id``; ``load_inplace`` forces a reload of a cached one), and the fresh copy
        replaces the cached one (``LRUCacheWorkerLoRAManager.add_adapter``): so the disk->CPU
        cost is charged as for a first load, in-place reloads and names registered again after
        an unload included. ``add_adapter`` then activates it (``activate_adapter``): the
        adapter takes a GPU slot at once, evicting the least recently used idle one when none
        is free, and its first request pays no CPU->GPU load (a first load too). An idle adapter
        leaves both caches first; one that running requests use keeps its slot, which vLLM fills
        with the new weights at once: CPU->GPU too. Returns the load time, added to the next
        step when the engine is busy, as ``load_adapter``'s.

        With every slot held by running requests vLLM still activates the new adapter,
        evicting one the batch uses, which its next step loads back, evicting the new one:
        ``load_adapter`` charges both copies and leaves the new adapter in the CPU cache.
        """
        if self._caches.remove(name) or not self._caches.in_cpu(name):
            return self.load_adapter(name, rank, to_gpu=True)
        ast = self._adapter(name, rank)  # running requests use it: it stays in its slot
        self.loads_from_disk += 1
        self.loads_from_memory += 1
        cost = self.profile.disk_to_cpu_load_s(ast.rank) + self.profile.cpu_to_gpu_load_s(ast.rank)
        if self._running or self._n_waiting:
            self._extra_s += cost
        return cost

    # --- driving the engine -------------------------------------------------------------------

    def step(self, now_s: float) -> StepResult:
        """Run exactly one engine step starting at ``max(now_s, time_s)``.

        With nothing to do, returns a zero-length result and does not move time.
        """
        start = max(self._tn, _ns(now_s))
        if self._due <= start:
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
        t_end = _ns(t_s)
        if self._tn >= t_end:  # (a simulator calls this at every arrival: often nothing to do)
            return []
        if not gc.isenabled():
            return self._run_until(t_end)
        gc.disable()  # as _gc_paused, without a context manager's cost per call
        try:
            return self._run_until(t_end)
        finally:
            gc.enable()

    def _run_until(self, t_end: int) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        fsteps = self._fsteps
        while (tn := self._tn) < t_end:
            if self._due <= tn:
                self._admit_arrivals(tn)
            if not self._running and not self._n_waiting:
                nxt = self._next_arrival_ns()
                if nxt is not None and nxt < t_end:
                    self._tn = nxt
                    continue
                break
            # (_fast_forward's first test inlined: a decoder finishing now needs a real step)
            if (fsteps and fsteps[0] <= self._si) or not self._fast_forward(t_end):
                self._step(None, records)
        return records

    # --- internals ----------------------------------------------------------------------------

    def _index_all(self) -> None:
        """Index every unfinished request by id (bulk adds skip it: it costs per request)."""
        blocks = self._blocks
        index: dict[str, int | _Req] = {}
        for ast in self._alist:  # (rows still to arrive are in the streams too)
            for r in ast.front:
                index[r.rid] = r
            st = ast.stream
            for k in range(ast.ri, len(st)):
                g = st[k]
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
            self._heads_limit += 4
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
        if self._dropped:
            pend = self._pend
            heap = self._pend_heap
            while pend and self._drop_due(pend[0].start):
                self._pop_pend()
            while heap and self._drop_due(heap[0][1]):
                heapq.heappop(heap)
            self._set_due()
        return None if self._due == _NEVER else self._due

    def _pop_pend(self) -> None:
        """Drop the first row of the in-order pending queue."""
        run = self._pend[0]
        if len(run) == 1:
            self._pend.popleft()
        else:
            self._pend[0] = range(run.start + 1, run.stop)

    def _admit_arrivals(self, t_ns: int) -> None:
        """The arrival check at ``t_ns``: arrivals up to then join the waiting queue.

        They sit in their adapters' streams already; joining is counting them and recording
        the slots-full clock in their rows, then waking the adapters whose first row arrived.
        """
        if self._pend_heap or self._dropped:
            self._admit_arrivals_general(t_ns)
            return
        # The usual case (the hottest loop under heavy load): all pending rows are in order,
        # none aborted.
        pend = self._pend
        blocks = self._blocks
        gfull = self._gfull
        n_in = 0
        due = _NEVER
        while pend:
            run = pend[0]
            g0 = run.start
            blk = blocks[g0 >> _SHIFT]
            ns, snap = blk.ns, blk.snap
            i = i0 = g0 & _MASK
            hi = i + len(run)  # the run's end within this block
            if hi > _BLOCK:
                hi = _BLOCK
            # Rows i, i + 1, ... of the block are due while ns[i] <= t_ns. Under heavy load
            # (dozens a step) bisect for the last one; else row by row (cheaper per call).
            if ns[hi - 1 if hi < i + 12 else i + 11] <= t_ns:
                i = hi if ns[hi - 1] <= t_ns else bisect.bisect_right(ns, t_ns, i, hi)
                snap[i0:i] = array("q", (gfull,)) * (i - i0)
            else:
                while ns[i] <= t_ns:  # (not past hi: ns[hi - 1] > t_ns)
                    snap[i] = gfull
                    i += 1
            n = i - i0
            n_in += n
            if n == len(run):
                pend.popleft()
                continue
            if n:
                pend[0] = range(g0 + n, run.stop)
            if i < hi:
                due = ns[i]
                break
        self._n_waiting += n_in
        self._due = due
        self._t_check = t_ns
        if self._sleep and self._sleep[0][0] <= t_ns:
            self._wake(t_ns)

    def _admit_arrivals_general(self, t_ns: int) -> None:
        """_admit_arrivals with out-of-order arrivals or aborted future rows."""
        blocks = self._blocks
        pend = self._pend
        heap = self._pend_heap
        gfull = self._gfull
        while True:
            a = None
            if pend:
                g = pend[0].start
                a = blocks[g >> _SHIFT].ns[g & _MASK]
            if heap and (a is None or heap[0][0] < a):  # ties: in-order first
                if heap[0][0] > t_ns:
                    break
                g = heapq.heappop(heap)[1]
            elif a is not None and a <= t_ns:
                self._pop_pend()
            else:
                break
            if not (self._dropped and self._drop_due(g)):
                blocks[g >> _SHIFT].snap[g & _MASK] = gfull
                self._n_waiting += 1
        self._set_due()
        self._t_check = t_ns
        if self._sleep and self._sleep[0][0] <= t_ns:
            self._wake(t_ns)

    def _wake(self, t_ns: int) -> None:
        """Adapters whose sleeper arrived by ``t_ns`` have a head again."""
        sleep = self._sleep
        alist = self._alist
        while sleep and sleep[0][0] <= t_ns:
            ns, g, a = heapq.heappop(sleep)
            ast = alist[a]
            if ast.sleeper == g:  # (else stale: the adapter's first row changed meanwhile)
                ast.sleeper = -1
                if not ast.front:  # (else a requeued request heads the queue)
                    self._push_head((ns << _ROW_BITS) | g, ast, g)

    def _enqueue_front(self, r: _Req) -> None:
        r.state = _REQUEUED
        r.wseq = wseq = self._front
        self._front -= 1
        ast = r.ast
        r.snap = self._deferred_clock(ast)
        ast.front.appendleft(r)
        self._push_head(wseq, ast, r)
        self._n_waiting += 1

    def _row_ns(self, g: int) -> int:
        return self._blocks[g >> _SHIFT].ns[g & _MASK]

    def _find_head(self, ast: _Adapter) -> _Item | None:
        """The head of ``ast``'s waiting queue (None: empty), found from its items."""
        if ast.front:
            return ast.front[0]
        st = ast.stream
        if ast.ri < len(st):
            g = st[ast.ri]
            if self._blocks[g >> _SHIFT].ns[g & _MASK] <= self._t_check:
                return g
        return None

    def _refresh_head(self, ast: _Adapter) -> None:
        """``ast``'s first item changed: record its head, or its sleeper if none has arrived."""
        h = self._find_head(ast)
        if h is not None:
            self._push_head(self._wseq(h), ast, h)
            return
        ast.head = None
        if ast.ri == len(ast.stream):
            ast.sleeper = -1
            return
        g = ast.stream[ast.ri]
        if ast.sleeper != g:
            ast.sleeper = g
            heapq.heappush(self._sleep, (self._row_ns(g), g, ast.idx))

    def _has_waiting_row(self, ast: _Adapter) -> bool:
        st = ast.stream
        return ast.ri < len(st) and self._row_ns(st[ast.ri]) <= self._t_check

    def _waiting(self, ast: _Adapter) -> int:
        """Waiting requests of ``ast`` (rows that arrived are counted once, see due_end)."""
        st = ast.stream
        j = ast.due_end
        if j < ast.ri:
            j = ast.ri
        n = len(st)
        if j < n:
            t = self._t_check
            blocks = self._blocks
            while j < n and blocks[st[j] >> _SHIFT].ns[st[j] & _MASK] <= t:
                j += 1
            ast.due_end = j
        return len(ast.front) + j - ast.ri

    def _wseq(self, item: _Item) -> int:
        """Waiting order of a queued item.

        Rows join the waiting queue in the order (ns, row): the arrivals due at a step start
        join by arrival time, ties by insertion (rows are numbered in insertion order; an
        out-of-order row never ties with a later in-order one, which would have been out of
        order too); a row added when it is already due joins behind them, with ``ns`` set to
        that moment; any later joiner arrives later, or is added later with a larger number.
        So ``(ns << _ROW_BITS) | row`` ranks rows in the order in which they joined.
        """
        if isinstance(item, _Req):
            return item.wseq
        return (self._blocks[item >> _SHIFT].ns[item & _MASK] << _ROW_BITS) | item

    def _tokens(self, item: _Item) -> int:
        """Tokens a queued item needs to compute when admitted (prompt, + outputs if requeued)."""
        if isinstance(item, _Req):
            return item.target
        return self._blocks[item >> _SHIFT].prompt[item & _MASK]

    def _push_head(self, wseq: int, ast: _Adapter, item: _Item) -> None:
        """``item`` (waiting order ``wseq``) is the new head of ``ast``'s queue: record it in the
        global-order heap, and in the heap of eligible heads (adapters holding a slot) when
        ``ast`` has running requests."""
        ast.head = item
        ast.sleeper = -1  # (the queue has a head: no row to wake)
        self._nheads += 1
        entry = (wseq, self._nheads, ast, item)
        limit = self._heads_limit
        # An entry is live while its item heads its queue (equals ``ast.head``: the same row
        # number or the same request object; == rather than ``is``, so that a compiled build,
        # whose ints need not keep their identity, reads it alike). A row is queued once. A
        # request requeued again after a new preemption makes its older entries look live once
        # more, but they carry larger (later) wseqs than its current entry, which therefore
        # always surfaces first: the order is unchanged.
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
                live = [h for h in heads if h[2].head == h[3]]
                heapq.heapify(live)
                self._heads = live
        if ast.n_running and ast.name is not None:
            elig = self._elig
            if elig and elig[0][2] is ast:
                heapq.heapreplace(elig, entry)
            else:
                heapq.heappush(elig, entry)
            if len(self._elig) > limit:
                live = [h for h in self._elig if h[2].n_running and h[2].head == h[3]]
                heapq.heapify(live)
                self._elig = live

    def _rebuild_heads(self) -> None:
        """The global-order heap from scratch: one entry per non-empty queue."""
        heads: list[_Head] = []
        for ast in self._alist:
            h = ast.head
            if h is not None:
                self._nheads += 1
                heads.append((self._wseq(h), self._nheads, ast, h))
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
                if ast.head == item:
                    return item
                heapq.heappop(heads)
        # All slots taken: only base-model requests and adapters holding a slot are eligible.
        base = self._base
        elig = self._elig
        while elig:
            wseq, _, ast, item = elig[0]
            if ast.head == item and ast.n_running:
                if base is not None:
                    b = base.head
                    if b is not None and self._wseq(b) < wseq:
                        return b
                return item
            heapq.heappop(elig)
        return None if base is None else base.head

    def _admit_row(self, g: int, blk: _Rows, i: int) -> _Req:
        """Move row ``g`` (index ``i`` of ``blk``), the head of its adapter's queue, from waiting
        to running; returns its new request (the adapter load time it causes: ``_load_s``)."""
        ast = self._alist[blk.aid[i]]
        rid = blk.rid[i]
        if rid is None:
            spans = blk.spans
            if len(spans) == 1:  # the usual single numbering span (inlined _Rows.id)
                lo, _, prefix, number = spans[0]
                rid = f"{prefix}{number + i - lo}"
            else:
                rid = blk.id(i)
        deferred = 0
        if ast.name is not None:  # D now (inlined _deferred_clock) minus D when it joined
            deferred = (
                (ast.g0 if ast.n_running else self._gfull)
                - ast.r_acc
                - ast.deferred_at(blk.snap[i])
            )
        self._aseq = aseq = self._aseq + 1
        r = _Req(
            rid, ast, blk.rank[i], blk.prompt[i], blk.max_tokens[i], blk.arr_s[i], deferred, aseq
        )
        blk.live -= 1  # inlined _release_row
        if not blk.live and len(blk.ns) == _BLOCK:
            del self._blocks[g >> _SHIFT]
        if self._reqs and rid in self._reqs:
            self._reqs[rid] = r
        ast.ri = ri = ast.ri + 1  # it was stream[ri]
        if ri > 1024 and 2 * ri > len(ast.stream):  # drop the admitted rows now and then
            del ast.stream[:ri]
            ast.due_end = max(0, ast.due_end - ri)
            ast.ri = 0
        self._enter_running(r, ast)
        return r

    def _readmit(self, r: _Req) -> _Req:
        """_admit_row for a requeued request (the head of its adapter's queue)."""
        ast = r.ast
        ast.front.popleft()
        if ast.name is not None:
            r.deferred_ns += self._deferred_clock(ast) - r.snap
        r.state = _PREFILL
        self._aseq = r.aseq = self._aseq + 1
        self._enter_running(r, ast)
        return r

    def _enter_running(self, r: _Req, ast: _Adapter) -> None:
        """``r``, just taken off the head of ``ast``'s queue, runs; record the next head."""
        self._n_waiting -= 1
        self._running[r] = None
        k = r.rank
        self._rank_n[k] += 1
        if k > self._rank_max:
            self._rank_max = k
        if not ast.n_running and ast.name is not None:
            self._adapter_running(ast)
        ast.n_running += 1
        # The new head (inlined _refresh_head).
        if ast.front:
            h = ast.front[0]
            self._push_head(h.wseq, ast, h)
            return
        st = ast.stream
        if ast.ri < len(st):
            g = st[ast.ri]
            ns = self._blocks[g >> _SHIFT].ns[g & _MASK]
            if ns <= self._t_check:
                self._push_head((ns << _ROW_BITS) | g, ast, g)
                return
            if ast.sleeper != g:
                ast.sleeper = g
                heapq.heappush(self._sleep, (ns, g, ast.idx))
        else:
            ast.sleeper = -1
        ast.head = None

    def _adapter_running(self, ast: _Adapter) -> None:
        """Adapter ``ast`` gets its first running request: it takes a slot (loaded if needed)."""
        assert ast.name is not None
        ast.g0 = g = self._gfull
        ast.breakpoint(g, g - ast.r_acc, True, self._has_waiting_row(ast))
        self._run_ad[ast.name] = ast
        from_disk, from_mem = self._caches.acquire(ast.name)
        if from_disk:
            self.loads_from_disk += 1
            self._load_s += self.profile.disk_to_cpu_load_s(ast.rank)
        if from_mem:
            self.loads_from_memory += 1
            self._load_s += self.profile.cpu_to_gpu_load_s(ast.rank)

    def _leave_running(self, r: _Req) -> None:
        del self._running[r]
        self._rank_leaves(r.rank)
        ast = r.ast
        ast.n_running -= 1
        if ast.n_running == 0 and ast.name is not None:
            self._adapter_idle(ast)

    def _rank_leaves(self, k: int) -> None:
        """A running request of rank ``k`` left."""
        self._rank_n[k] -= 1
        if not self._rank_n[k] and k == self._rank_max:
            self._lower_rank_max()

    def _lower_rank_max(self) -> None:
        """The last running request of the largest rank left: find the next largest."""
        rank_n = self._rank_n
        k = self._rank_max
        while k and not rank_n[k]:
            k -= 1
        self._rank_max = k

    def _adapter_idle(self, ast: _Adapter) -> None:
        """The last running request of adapter ``ast`` left: its slot is free for eviction."""
        assert ast.name is not None
        del self._run_ad[ast.name]
        g = self._gfull
        ast.r_acc += g - ast.g0
        ast.breakpoint(g, g - ast.r_acc, False, self._has_waiting_row(ast))
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
        self._load_s = 0.0
        # Waiting queue (skipped entirely in a step that preempted, as vLLM does).
        if not preempted and budget > 0 and self._n_waiting:
            max_seqs = self._max_seqs
            blocks = self._blocks
            while budget > 0 and self._n_waiting and len(running) < max_seqs:
                e = self._candidate()
                if e is None:
                    break
                if isinstance(e, _Req):
                    n = e.target
                    if n > budget:
                        n = budget
                    nb = -(-n // bs)
                    if nb > total - self._used:
                        break
                    r = self._readmit(e)
                else:
                    blk = blocks[e >> _SHIFT]
                    i = e & _MASK
                    n = blk.prompt[i]
                    if n > budget:
                        n = budget
                    nb = -(-n // bs)
                    if nb > total - self._used:
                        break
                    r = self._admit_row(e, blk, i)
                self._used += nb
                budget -= n
                prefill_tokens += n
                r.computed = n
                if n == r.target:
                    pdone.append(r)
                else:
                    self._prefiller = r
        n_adapters = len(self._run_ad)
        dur_s = self.profile.step_time_s(
            batch_size=len(running),
            distinct_adapters=n_adapters,
            prefill_tokens=prefill_tokens,
            decode_tokens=self._n_decode,
            max_rank_in_batch=self._rank_max,
            num_waiting=self._n_waiting,
            lora_enabled=self._lora,
        )
        dur_s += self._load_s + self._extra_s
        self._extra_s = 0.0
        dur = round(dur_s * NS) or 1  # (dur_s > 0)
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
        if fsteps and fsteps[0] <= s:
            end_s = end / NS
            freed = 0
            n_done = 0
            rank_n = self._rank_n
            while fsteps and fsteps[0] <= s:
                bucket = fin.pop(heapq.heappop(fsteps))
                if len(bucket) > 1:
                    bucket.sort()  # by aseq: unique per admission, so requests are never compared
                for _, epoch, r in bucket:
                    if r.epoch != epoch or r.state != _DECODE:
                        continue
                    # The decoder's KV blocks, its block phase; then _finish inlined (hot).
                    freed += -(-(r.c0 + s - r.b + 1) // bs)
                    cnt[r.res] -= 1
                    n_done += 1
                    r.out = m = r.max_tokens
                    r.state = _DONE
                    del running[r]
                    k = r.rank
                    rank_n[k] -= 1
                    if not rank_n[k] and k == self._rank_max:
                        self._lower_rank_max()
                    ast = r.ast
                    ast.n_running -= 1
                    if not ast.n_running and ast.name is not None:
                        self._adapter_idle(ast)
                    if self._reqs:
                        self._reqs.pop(r.rid, None)
                    records.append(
                        RequestRecord(
                            r.rid,
                            ast.name,
                            r.arr_s,
                            r.first_ns / NS,
                            end_s,
                            r.prompt,
                            m,
                            r.deferred_ns / NS,
                            r.preemptions,
                        )
                    )
            self._used -= freed
            self._n_decode -= n_done
            self._n_live -= n_done
        # Prefills completed in this step: first (or next, after preemption) output token.
        nxt = s + 1
        for r in pdone:
            r.out = out = r.out + 1
            if r.first_ns < 0:
                r.first_ns = end
            m = r.max_tokens
            if out >= m:
                self._used -= -(-r.target // bs)
                self._finish(r, end, records)
                continue
            # It decodes from step nxt on: KV tokens c0 then, one more each step; it needs a
            # new block at the steps of residue res (mod bs); its last token at step fstep.
            r.state = _DECODE
            r.b = nxt
            r.c0 = c0 = r.target
            r.o0 = out
            r.res = res = (nxt - c0) % bs
            r.fstep = fs = nxt + m - 1 - out
            cnt[res] += 1
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
        s = self._si
        fsteps = self._fsteps
        if fsteps[0] <= s:  # a decoder finishes in this step (or _step drops stale entries)
            return False
        while not self._has_live(fsteps[0]):  # entries left by preemptions and aborts
            del self._fin[heapq.heappop(fsteps)]
        k = fsteps[0] - s  # steps before the first finishing step
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
        n_adapters = len(self._run_ad)
        dur_s = self.profile.step_time_s(
            batch_size=n_dec,
            distinct_adapters=n_adapters,
            prefill_tokens=0,
            decode_tokens=n_dec,
            max_rank_in_batch=self._rank_max,
            num_waiting=self._n_waiting,
            lora_enabled=self._lora,
        )
        dur = round(dur_s * NS) or 1  # (dur_s > 0)
        t0 = self._tn
        k = min(k, (t_end - t0 + dur - 1) // dur)
        nxt = self._next_arrival_ns()
        if nxt is not None:
            k = min(k, (nxt - t0 + dur - 1) // dur)
        # KV: the longest run whose block allocations all fit. Every ``bs`` steps each decoder
        # takes one block, so ``cycles`` whole cycles fit, then the steps of the next cycle
        # while the decoders of its phases (in order from ``phase``) fit in what is left.
        cycles, rem = divmod(free, n_dec)
        if k > cycles * bs:
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
        # Blocks taken by the k steps: n_dec per whole cycle, plus the decoders of the phases
        # of the last partial cycle (phase, phase + 1, ..., wrapping around at bs).
        full, part = divmod(k, bs)
        used = full * n_dec
        if part:
            end = phase + part
            used += sum(cnt[phase:end]) if end <= bs else sum(cnt[phase:]) + sum(cnt[: end - bs])
        self._used += used
        self._tn = t0 + k * dur
        self._si = s + k
        if n_adapters >= self._max_loras:
            self._gfull += k * dur
        self.steps_total += k
        return True
