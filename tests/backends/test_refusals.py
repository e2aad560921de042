"""Refusals: which replicas refused to load which adapter, until when (pure data, no I/O)."""

from __future__ import annotations

from loragate.backends.refusals import Refusals
from loragate.core.clock import VirtualClock
from loragate.core.types import AdapterSpec

BIG = AdapterSpec(name="big", path="/loras/big", rank=16)


def test_a_refusal_holds_until_it_expires() -> None:
    clock = VirtualClock(100.0)
    refusals = Refusals(60.0, clock)
    assert refusals.refusing(BIG) == ()
    refusals.record(BIG, "r0", "rank 16 > 8")
    clock.advance_to(159.5)
    assert refusals.refusing(BIG) == {"r0"}
    assert refusals.of_replica("r0") == {"big": ("rank 16 > 8", 0.5)}
    assert refusals.refusing(AdapterSpec(name="other", path="/loras/other")) == ()
    clock.advance_to(160.0)
    assert refusals.refusing(BIG) == ()
    assert refusals.of_replica("r0") == {}
    assert refusals.counts == {("big", "r0"): 1}  # counted for /metrics all the same


def test_a_new_path_listing_or_forgetting_ends_a_refusal() -> None:
    refusals = Refusals(60.0, VirtualClock())
    for rid in ("r0", "r1", "r2"):
        refusals.record(BIG, rid, "no")
    moved = AdapterSpec(name="big", path="/elsewhere/big", rank=16)
    assert refusals.refusing(moved) == ()  # refused from another folder: void
    for rid in ("r0", "r1", "r2"):
        refusals.record(BIG, rid, "no")
    refusals.listed("r0", {"big", "x"})  # r0's /v1/models lists it now
    assert refusals.refusing(BIG) == {"r1", "r2"}
    refusals.forget_replica("r1")  # removed by a reload
    assert refusals.refusing(BIG) == {"r2"}
    refusals.forget("big")  # registered again through the admin API
    assert refusals.refusing(BIG) == ()
    assert refusals.counts == {("big", r): 2 for r in ("r0", "r1", "r2")}


def test_a_zero_ttl_only_counts() -> None:
    refusals = Refusals(0.0, VirtualClock())
    refusals.record(BIG, "r0", "no")
    assert refusals.refusing(BIG) == ()
    assert refusals.counts == {("big", "r0"): 1}


def test_a_refusal_is_news_once_while_it_is_remembered() -> None:
    # The pool logs a refusal at WARNING only when it is news (once per TTL per replica).
    clock = VirtualClock(100.0)
    refusals = Refusals(60.0, clock)
    assert refusals.record(BIG, "r0", "no") is True
    assert refusals.record(BIG, "r1", "no") is True
    clock.advance_to(130.0)
    assert refusals.record(BIG, "r0", "no") is False  # remembered: not news
    assert refusals.record(AdapterSpec(name="big", path="/new/big"), "r0", "no") is True
    in_force = refusals.in_force(AdapterSpec(name="big", path="/new/big"))
    assert set(in_force) == {"r0"} and in_force["r0"].until_s == 190.0
    clock.advance_to(190.0)  # lapsed: news again
    assert refusals.in_force(BIG) == {}
    assert refusals.record(BIG, "r1", "no") is True
    assert Refusals(0.0, clock).record(BIG, "r0", "no") is True  # no memory: always news
