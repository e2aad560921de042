"""The state the twin engine keeps per adapter, per request row and per admitted request.

Private to :mod:`loragate.twin.engine`, which documents how they are used (and why they are
shaped so: under overload most requests only ever wait, so a waiting request must cost no
object and no work of its own).
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque
from typing import TypeAlias

# States of an admitted request; _REQUEUED: waiting again after a preemption.
_PREFILL, _DECODE, _DONE, _REQUEUED = range(2, 6)
_SHIFT = 12  # request rows are stored in blocks of 4096
_BLOCK = 1 << _SHIFT
_MASK = _BLOCK - 1
_ROW_BITS = 40  # row numbers stay below 2**40 (a trillion requests per engine)
_FRONT = -(1 << 110)  # below (ns << _ROW_BITS) for any ns > -2**62


class _Adapter:
    """Scheduler state of one adapter (``name`` None = base model).

    Deferred time: the engine's slots-full clock G (``Engine._gfull``) counts the step time
    during which all adapter slots were taken; the adapter's deferred clock D counts the part of
    it during which the adapter was not among them: D follows G while the adapter is not
    running and stands still while it is. So D is a continuous, piecewise linear function of G
    with slope 1 or 0, breaking where the adapter starts or stops running. A waiting row
    records G when it joins the queue (one value for all the rows joining at a step start,
    whatever their adapter); its deferred time, D now minus D when it joined, is then computed
    on admission from the breakpoints (:meth:`deferred_at`).
    """

    __slots__ = (
        "due_end",
        "front",
        "g0",
        "head",
        "hist_d",
        "hist_g",
        "hist_run",
        "idx",
        "n_running",
        "name",
        "r_acc",
        "rank",
        "ri",
        "sleeper",
        "stream",
    )

    def __init__(self, name: str | None, rank: int, idx: int) -> None:
        self.name = name
        self.rank = rank
        self.idx = idx  # position in the engine's adapter table (rows store it, not the object)
        # Its waiting queue, FCFS: the requests requeued after a preemption (``front``), then
        # the rows of ``stream[ri:]`` that have arrived (see Engine._waiting): ``stream`` holds
        # its rows never admitted, waiting or still to arrive, in waiting order, so an arrival
        # needs no work of its own. ``due_end``: stream rows before it are known to have
        # arrived (a cache for counting them); ``sleeper``: the first row still to arrive when
        # the queue is empty (-1: none), woken by Engine._wake when it arrives.
        self.front: deque[_Req] = deque()
        self.head: _Item | None = None  # the head of the queue (see Engine._push_head)
        self.stream = array("q")
        self.ri = 0
        self.due_end = 0
        self.sleeper = -1
        self.n_running = 0
        self.r_acc = 0  # ns of "slots full" time during which this adapter was running
        self.g0 = 0  # value of the engine's slots-full clock when the adapter became running
        # Breakpoints of D(G): from G = hist_g[k] on, D = hist_d[k] (running: hist_run[k]) or
        # hist_d[k] + G - hist_g[k]. D = G - r_acc = G at first.
        self.hist_g = [0]
        self.hist_d = [0]
        self.hist_run = [False]

    def deferred_at(self, g: int) -> int:
        """D when the slots-full clock read ``g`` (not before the first breakpoint kept)."""
        hg = self.hist_g
        k = len(hg) - 1
        if g < hg[k]:
            k = bisect.bisect_right(hg, g) - 1
        d = self.hist_d[k]
        return d if self.hist_run[k] else d + g - hg[k]

    def breakpoint(self, g: int, d: int, running: bool, waiting: bool) -> None:
        """The adapter starts (``running``) or stops running at G = ``g``, with D = ``d``.

        Only rows waiting now need D at earlier values of G (rows still to come join at ``g``
        or later): with none (not ``waiting``), the earlier breakpoints are dropped."""
        if waiting:
            self.hist_g.append(g)
            self.hist_d.append(d)
            self.hist_run.append(running)
        else:
            self.hist_g = [g]
            self.hist_d = [d]
            self.hist_run = [running]


class _Rows:
    """One block of ``_BLOCK`` request rows (columns), for requests never admitted yet.

    A request that has not yet run is only a row number ``g`` (block ``g >> _SHIFT``, index
    ``g & _MASK``): under overload most requests only ever wait, and an int per request (no
    object, nothing for the cyclic GC to track) is the cheapest way to queue them. Its
    :class:`_Req` is created when it is first admitted. ``live``: rows neither admitted nor
    dropped; a full block with no live row is freed. ``snap`` is written when the row joins the
    waiting queue (the slots-full clock then, see :class:`_Adapter`); its waiting order follows
    from ``ns`` and its row number (see :meth:`Engine._wseq`), so a queued row needs no tuple
    of its own. A row added with :class:`NumberedIds` has no id string until it is read
    (``rid`` None; see :meth:`id`).
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
        self.ns = array("q")  # arrival, integer ns (once waiting: when it joined the queue)
        self.snap = array("q", bytes(8 * _BLOCK))  # G when it joined (see _Adapter)
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

    def add_span(self, lo: int, n: int, prefix: str, number: int) -> None:
        """Rows ``lo..lo+n-1`` are numbered ``prefix{number}``, ... (one span with the previous
        one when it continues its numbering, as consecutive slices of one stream do)."""
        spans = self.spans
        if spans:
            plo, phi, pprefix, pnumber = spans[-1]
            if phi == lo and pprefix == prefix and pnumber + (lo - plo) == number:
                spans[-1] = (plo, lo + n, prefix, pnumber)
                return
        spans.append((lo, lo + n, prefix, number))


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
    # wseq/snap: waiting order and deferred-clock snapshot when requeued.
    computed: int
    b: int
    c0: int
    o0: int
    res: int
    fstep: int
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
        aseq: int,
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
        self.aseq = aseq


# A waiting-queue item: a row number (never admitted yet: its snapshot is in its block; it sits
# in its adapter's stream) or a preempted, requeued _Req (its attributes; in ``front``). The
# waiting order ``wseq`` (smaller first) of a row is ``(ns << _ROW_BITS) | row``: the time it
# joined the queue, then the order of insertion (see Engine._wseq); that of a requeued request
# counts down from _FRONT, below every row's.
_Item: TypeAlias = "int | _Req"
# A queue-head heap entry: (wseq of the head, tiebreak, adapter, head item). It is stale once
# the item is no longer the head of the adapter's queue (``_Adapter.head``).
_Head = tuple[int, int, _Adapter, "int | _Req"]
