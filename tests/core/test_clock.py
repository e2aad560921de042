from __future__ import annotations

import pytest

from loragate.core.clock import VirtualClock, WallClock


def test_virtual_clock_moves_only_forward() -> None:
    clock = VirtualClock(5.0)
    assert clock.now() == 5.0
    clock.advance_by(1.5)
    assert clock.now() == 6.5
    clock.advance_to(10.0)
    assert clock.now() == 10.0
    with pytest.raises(ValueError):
        clock.advance_to(9.0)


def test_wall_clock_is_monotonic() -> None:
    clock = WallClock()
    a = clock.now()
    b = clock.now()
    assert b >= a
