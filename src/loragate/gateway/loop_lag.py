"""How late the gateway's own event loop runs: host CPU contention, told apart from replicas.

A TTFT or latency tail can come from the replicas (queues, adapter loads) or from the gateway
itself: an event loop that does not get the CPU (a saturated host, a CPU limit throttling the
container, too few cores for the load) or that something blocks runs every request's next step
late. Nothing per request measures that, so a background task sleeps ``metrics.
loop_lag_interval_s`` (0.25 s) again and again and observes how much later than asked it woke:
``loragate_event_loop_lag_seconds`` (a histogram, 1 ms .. 10 s) and
``loragate_event_loop_lag_max_seconds`` (the largest lag of the last minute). A lag from
``metrics.loop_lag_warning_s`` (1 s) on gets a WARNING naming it, at most one a minute
(``log_rate.LineRate``). A reload applies both settings from the next check.

The requests pay nothing for it: one timer every interval, and the families are built only
when ``/metrics`` is scraped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from loragate.core.clock import Clock
from loragate.gateway.log_rate import LineRate

log = logging.getLogger(__name__)

BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
MAX_WINDOW_S = 60.0  # loragate_event_loop_lag_max_seconds: the largest lag this long back
LOG_INTERVAL_S = 60.0


class LoopLag(Collector):
    """The event loop's lag: measured by :meth:`run` (a background task), observed into a
    histogram and a sliding-window maximum, read when ``/metrics`` is scraped.

    ``interval_s`` and ``warning_s`` are read before every check (a reload may change them).
    ``clock`` rate-limits the WARNING lines; the lag itself is measured with
    ``time.monotonic`` (real time whatever clock the app runs on)."""

    def __init__(
        self,
        interval_s: Callable[[], float],
        warning_s: Callable[[], float],
        clock: Clock,
        log_interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self._interval_s = interval_s
        self._warning_s = warning_s
        self._line = LineRate(clock, log_interval_s)
        self.counts = [0] * (len(BUCKETS_S) + 1)  # the last one is +Inf
        self.total_s = 0.0
        # (when, lag) with the lags decreasing: its first entry is the window's maximum.
        self._window: collections.deque[tuple[float, float]] = collections.deque()

    async def run(self) -> None:
        """Check the lag every ``interval_s`` until cancelled."""
        while True:
            interval_s = self._interval_s()
            start = time.monotonic()
            await asyncio.sleep(interval_s)
            woke = time.monotonic()
            self.observe(woke - start - interval_s, woke, interval_s)

    def observe(self, lag_s: float, now_s: float, interval_s: float) -> None:
        """One check woke ``lag_s`` late (negative, from a timer's rounding: 0) at ``now_s``
        (``time.monotonic``)."""
        lag_s = max(lag_s, 0.0)
        self.counts[bisect_left(BUCKETS_S, lag_s)] += 1
        self.total_s += lag_s
        window = self._window
        while window and window[-1][1] <= lag_s:
            window.pop()
        window.append((now_s, lag_s))
        self._expire(now_s)
        warning_s = self._warning_s()
        if lag_s < warning_s:
            return
        more = self._line.due()
        if more is None:
            return
        log.warning(
            "event loop lag: the gateway's event loop ran %.3f s late (it checks every %g s, "
            "metrics.loop_lag_interval_s): every request under way waited that long too, its "
            "TTFT and latency included. The gateway's host is likely short of CPU (other "
            "processes, a container CPU limit throttling it, too few cores for this load), or "
            "something blocked the loop; not a replica's doing. Lags from %g s "
            "(metrics.loop_lag_warning_s) are logged, at most one such line per %g s%s; "
            "loragate_event_loop_lag_seconds has them all",
            lag_s, interval_s, warning_s, self._line.interval_s,
            f" ({more} more since the last such line)" if more else "",
        )  # fmt: skip

    def max_s(self, now_s: float) -> float:
        """The largest lag observed in the ``MAX_WINDOW_S`` before ``now_s`` (0: none)."""
        self._expire(now_s)
        return self._window[0][1] if self._window else 0.0

    def _expire(self, now_s: float) -> None:
        window = self._window
        while window and window[0][0] < now_s - MAX_WINDOW_S:
            window.popleft()

    def collect(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(
            "loragate_event_loop_lag_seconds",
            "How late the gateway's own event loop ran: a check that sleeps "
            "metrics.loop_lag_interval_s (0.25 s) again and again, observed each time by how "
            "much later than asked it woke. Every request under way waits that long too (its "
            "TTFT and latency include it). Lags of a few ms are normal; a tail here, with a "
            "TTFT tail at the same time, is this host short of CPU (other processes, a "
            "container CPU limit, too few cores for the load) or something blocking the loop, "
            "not the replicas.",
        )
        bounds = [repr(b) for b in BUCKETS_S] + ["+Inf"]
        cumulative = itertools.accumulate(self.counts)
        histogram.add_metric([], list(zip(bounds, cumulative, strict=True)), sum_value=self.total_s)
        yield histogram
        yield GaugeMetricFamily(
            "loragate_event_loop_lag_max_seconds",
            "The largest lag of the gateway's event loop (as loragate_event_loop_lag_seconds "
            f"observes it) in the last {MAX_WINDOW_S:g} s; 0 if no check ended in that time. "
            "A WARNING line names each lag from metrics.loop_lag_warning_s (1 s) on, at most "
            "one a minute.",
            value=self.max_s(time.monotonic()),
        )
