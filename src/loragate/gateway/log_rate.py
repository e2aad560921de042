"""One log line per interval for a kind of event that can come in floods (failed logins, 503s
while no replica is available): the line says how many came since the last one."""

from __future__ import annotations

import math

from loragate.core.clock import Clock


class LineRate:
    """Decides whether an event gets its log line: at most one every ``interval_s``."""

    def __init__(self, clock: Clock, interval_s: float = 60.0) -> None:
        self._clock = clock
        self.interval_s = interval_s
        self._last_s = -math.inf
        self._not_logged = 0  # events since the last line

    def due(self) -> int | None:
        """None if this event gets no line (counted for the next one); else how many events
        went without a line since the last one."""
        now = self._clock.now()
        if now - self._last_s < self.interval_s:
            self._not_logged += 1
            return None
        more, self._not_logged = self._not_logged, 0
        self._last_s = now
        return more
