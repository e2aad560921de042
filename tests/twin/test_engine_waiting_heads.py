"""Regression: a new waiting adapter must stay visible to the scheduler when stale queue-head
entries are pruned at the moment it is enqueued (found by a 1-hour 200-adapter simulation that
crashed with IndexError in ``Engine._candidate``)."""

from __future__ import annotations

from loragate.twin.engine import Engine, EngineConfig, EngineRequest
from loragate.twin.profile import load_profile


def _req(request_id: str, adapter: str) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        adapter=adapter,
        adapter_rank=8,
        prompt_tokens=8,
        max_tokens=4,
        arrival_s=0.0,
    )


def test_every_request_finishes_whatever_the_number_of_stale_heads() -> None:
    profile = load_profile("fast")
    # The pruning threshold depends on internals; sweep past it twice so one n hits it exactly.
    for n in range(160):
        engine = Engine(EngineConfig(max_loras=2, max_cpu_loras=4, max_model_len=2048), profile)
        engine.add_request(_req("b-init", "b"))
        assert engine.abort("b-init")
        engine.add_request(_req("a0", "a"))
        for i in range(1, n + 1):  # each cycle leaves a stale head entry for adapter a
            engine.add_request(_req(f"a{i}", "a"))
            assert engine.abort(f"a{i - 1}")
        engine.add_request(_req("b0", "b"))
        finished = {r.request_id for r in engine.run_until(100.0)}
        assert finished == {f"a{n}", "b0"}, f"n={n}"
        assert not engine.has_unfinished()
