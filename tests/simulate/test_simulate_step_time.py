"""ProfileStepTime: the twin profile as routing's step-time model."""

from __future__ import annotations

import pytest

from loragate.routing.step_time import LinearStepTimeModel, prefill_token_s
from loragate.simulate.step_time import ProfileStepTime
from loragate.twin.profile import load_profile


def test_prefill_token_time_matches_the_profile_step() -> None:
    profile = load_profile("llama-3.1-8b-h100")
    model = ProfileStepTime(profile, max_lora_rank=32)
    per_token = prefill_token_s(model)
    chunk = profile.step_time_s(
        batch_size=2,
        distinct_adapters=1,
        prefill_tokens=1024,
        decode_tokens=1,
        max_rank_in_batch=32,
        num_waiting=0,
        lora_enabled=True,
    )
    # a 1024-token chunk step = one decode step + 1024 marginal prompt tokens (linear profile)
    assert chunk == pytest.approx(model.step_time_s(1, 1) + 1024 * per_token, rel=0.05)
    assert per_token * 2048 > 5 * model.step_time_s(1, 1)  # prefill dominates a full chunk
    assert prefill_token_s(LinearStepTimeModel()) == 0.0  # Agulló et al. leave prefill out
