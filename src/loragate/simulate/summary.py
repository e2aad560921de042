"""Aggregate statistics of a simulation run, accumulated record by record.

Throughput is measured inside the workload window ``[0, duration_s]``: a request's output
tokens are spread evenly between its first token and its finish (the first token at the first
token time), and only tokens emitted inside the window count. A run is *starved* when this
achieved token throughput is below 0.9 x the offered token throughput (the ``max_tokens`` of
the requests that arrived in the window, per second) — the seed paper's criterion
(shared/design/DIGITAL_TWIN.md). Requests a replica refuses as invalid (too long for
``max_model_len``) are not offered load: they are counted, by reason, but not in the offered
tokens.

That criterion is cluster-wide: when LoRA slots are the bottleneck, hot adapters keep their slots
and the cluster's throughput keeps up while cold adapters' requests wait for minutes. So the
summary also counts *starved requests* — those that waited longer than ``starvation_wait_s`` for
their first token, or never got one (unfinished) — and the adapters they belong to.

*Slot-bound*: a request is deferred while every LoRA slot (``max_loras``) of its replica's
running batch is held by other adapters. ``deferred.share_of_ttft`` is the part of all served
requests' time to first token spent so. When it is at least :data:`SLOT_BOUND_SHARE` (the slots
are most of what first tokens wait for) and the cluster's throughput keeps up, the run is
slot-bound (:func:`slot_bound`): more LoRA slots per replica (KV memory, no GPU) is the first
thing to try, before more replicas. Measured with ``loragate simulate --workload
workload/zipf-200.yaml --profile llama-3.1-8b-h100 --policy loragate --duration-s 600 --rate-rps
20 --max-cpu-loras 64 --ttft-slo-ms 500 --sweep replicas=2,3,4,5,6 --sweep max_loras=8,12,16``:
the 6 of 15 points at or above that share are all far from the SLO (33-71% attained), and at
the 5 of them with a bigger max_loras in the grid, 4 more slots raised attainment (33 -> 44%,
44 -> 52%, 45 -> 71%, 71 -> 97%, 71 -> 99%), about as much as one more replica did (45%, 71%,
71%, 99%, 98%); the points below it attain 97-100%. Not when the throughput is starved: with
``--adapters 24 --rate-rps 60 --duration-s 300 --max-cpu-loras 32`` on 2 replicas, share 72%,
16 slots instead of 8 took attainment from 42% to 10% (slots take KV memory), one more replica
to 94%.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from loragate.simulate.records import INVALID_REASONS, SimRecord

STARVATION_RATIO = 0.9
# deferred.share_of_ttft at or above which a run that keeps up is called slot-bound.
SLOT_BOUND_SHARE = 0.5


def slot_bound(summary: dict[str, Any]) -> bool:
    """Whether a built summary's run is slot-bound (see the module's docstring)."""
    share = summary["deferred"].get("share_of_ttft") or 0.0
    return not summary["starved"] and share >= SLOT_BOUND_SHARE


def _tokens_within(rec: SimRecord, end_s: float) -> float:
    n = rec.output_tokens
    if n <= 0 or rec.first_token_s > end_s:
        return 0.0
    if rec.finish_s <= end_s or n == 1:
        return float(n)
    frac = (end_s - rec.first_token_s) / (rec.finish_s - rec.first_token_s)
    return 1.0 + (n - 1) * frac


def _pct(values: list[float]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(arr) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
    }


class SummaryBuilder:
    """Feed every record once with :meth:`add`; :meth:`build` returns the summary dict."""

    def __init__(
        self, *, duration_s: float, ttft_slo_ms: float, starvation_wait_s: float = 60.0
    ) -> None:
        self.duration_s = duration_s
        self.ttft_slo_s = ttft_slo_ms / 1000.0
        self.starvation_wait_s = starvation_wait_s
        self._starved_requests = 0
        self._starved_by_adapter: Counter[str] = Counter()
        self._ttft: list[float] = []
        self._itl: list[float] = []
        self._e2e: list[float] = []
        self._status: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._arrived = 0
        self._slo_ok = 0
        self._offered_tokens = 0
        self._achieved_tokens = 0.0
        self._output_tokens = 0
        self._deferred = 0
        self._deferred_s = 0.0
        self._preemptions = 0
        self._per_replica: Counter[str] = Counter()
        self._per_replica_adapters: dict[str, set[str]] = {}
        self._last_finish_s = 0.0
        self._done_in_window = 0

    def add(self, rec: SimRecord) -> None:
        self._status[rec.status] += 1
        if rec.status == "rejected":
            self._rejected[rec.reason] += 1
        if rec.arrival_s <= self.duration_s:
            self._arrived += 1
            if rec.reason not in INVALID_REASONS:
                self._offered_tokens += rec.max_tokens
        if rec.replica is not None:
            self._per_replica[rec.replica] += 1
            if rec.adapter is not None:
                self._per_replica_adapters.setdefault(rec.replica, set()).add(rec.adapter)
        if rec.status == "unfinished" or (
            rec.status == "ok" and rec.ttft_s > self.starvation_wait_s
        ):
            self._starved_requests += 1
            self._starved_by_adapter[rec.adapter or ""] += 1
        if rec.status != "ok":
            return
        ttft = rec.ttft_s
        self._ttft.append(ttft)
        self._itl.append(rec.itl_s)
        self._e2e.append(rec.e2e_s)
        if ttft <= self.ttft_slo_s:
            self._slo_ok += 1
        self._output_tokens += rec.output_tokens
        self._achieved_tokens += _tokens_within(rec, self.duration_s)
        if rec.deferred_s > 0:
            self._deferred += 1
            self._deferred_s += rec.deferred_s
        self._preemptions += rec.preemptions
        self._last_finish_s = max(self._last_finish_s, rec.finish_s)
        if rec.finish_s <= self.duration_s:
            self._done_in_window += 1

    def build(self, **extra: Any) -> dict[str, Any]:
        total = sum(self._status.values())
        ok = self._status["ok"]
        offered_tps = self._offered_tokens / self.duration_s
        achieved_tps = self._achieved_tokens / self.duration_s
        ttft_sum = math.fsum(self._ttft)
        out: dict[str, Any] = {
            "requests": {
                "total": total,
                "ok": ok,
                "rejected": self._status["rejected"],
                "unfinished": self._status["unfinished"],
                "rejected_by_reason": dict(sorted(self._rejected.items())),
            },
            "duration_s": self.duration_s,
            "makespan_s": self._last_finish_s,
            "throughput": {
                # Requests completed inside the workload window, per second of it.
                "requests_per_s": self._done_in_window / self.duration_s,
                # Requests that arrived inside the window, per second (the offered rate).
                "arrivals_per_s": self._arrived / self.duration_s,
                "offered_tokens_per_s": offered_tps,
                "achieved_tokens_per_s": achieved_tps,
                "output_tokens_total": self._output_tokens,
            },
            "starved": achieved_tps < STARVATION_RATIO * offered_tps,
            "starvation": {
                "wait_s": self.starvation_wait_s,
                "requests": self._starved_requests,
                "fraction": self._starved_requests / total if total else 0.0,
                # "" = base-model requests
                "adapters": len(self._starved_by_adapter),
                "worst_adapters": dict(self._starved_by_adapter.most_common(5)),
            },
            "ttft_s": _pct(self._ttft),
            "itl_s": _pct(self._itl),
            "e2e_s": _pct(self._e2e),
            "slo": {
                "ttft_ms": self.ttft_slo_s * 1000.0,
                # Rejected and unfinished requests count as misses.
                "attainment": self._slo_ok / total if total else None,
            },
            "deferred": {
                "requests": self._deferred,
                "fraction": self._deferred / ok if ok else 0.0,
                "total_s": self._deferred_s,
                # The served requests' time to first token spent waiting for a LoRA slot.
                "share_of_ttft": self._deferred_s / ttft_sum if ttft_sum > 0 else 0.0,
            },
            "preemptions": self._preemptions,
            "routed_per_replica": dict(sorted(self._per_replica.items())),
            "adapters_per_replica": {
                r: len(a) for r, a in sorted(self._per_replica_adapters.items())
            },
        }
        out.update(extra)
        return out
