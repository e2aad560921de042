"""Time behind a protocol, so one engine runs in wall-clock time or in virtual time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of monotonically non-decreasing time in seconds."""

    def now(self) -> float: ...


class WallClock:
    """Real time: ``time.monotonic()``."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class VirtualClock:
    """Simulated time, moved forward explicitly by a simulation driver."""

    __slots__ = ("_now",)

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def advance_to(self, t_s: float) -> None:
        if t_s < self._now:
            raise ValueError(f"virtual time cannot go backwards ({t_s} < {self._now})")
        self._now = t_s

    def advance_by(self, dt_s: float) -> None:
        self.advance_to(self._now + dt_s)
