"""Calibration from the real vLLM CPU data (data/tiny-llama-cpu): the shipped profile is ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.twin.calibrate import calibrate_profile
from loragate.twin.profile import load_profile, profile_to_dict

DATA = Path(__file__).resolve().parents[2] / "data" / "tiny-llama-cpu" / "calibration"


@pytest.fixture(scope="module")
def fitted():  # type: ignore[no-untyped-def]
    return calibrate_profile(str(DATA), "tiny-llama-cpu", name="tiny-llama-cpu")


def test_shipped_profile_is_what_the_calibrator_fits(fitted) -> None:  # type: ignore[no-untyped-def]
    profile, _ = fitted
    shipped = load_profile("tiny-llama-cpu")
    ours, theirs = profile_to_dict(profile), profile_to_dict(shipped)
    for key in ("step", "lora", "scheduler", "loading", "kv"):
        assert ours[key] == theirs[key], key
    assert "twin calibrate --data data/tiny-llama-cpu/calibration" in shipped.source


def test_cpu_fit_uses_server_side_step_times(fitted) -> None:  # type: ignore[no-untyped-def]
    profile, report = fitted
    # KV is an explicit byte budget on CPU: 64 MiB = 32,768 tokens whatever the LoRA settings.
    for loras in (1, 4, 16):
        assert (
            profile.kv_capacity_tokens(max_loras=loras, max_lora_rank=16, lora_enabled=True)
            == 32768
        )
    # Server-side ITL at batch 1 is ~2.8 ms (the client's 2.2 ms is distorted by coalescing);
    # a one-sequence decode step without LoRA must sit near the server-side figure.
    one = (
        profile.step_time_s(
            batch_size=1,
            distinct_adapters=0,
            prefill_tokens=0,
            decode_tokens=1,
            max_rank_in_batch=0,
            num_waiting=0,
            lora_enabled=False,
        )
        * 1000
    )
    assert 2.0 < one < 4.0
    # LoRA on CPU costs x2-3 at batch 8 (README): the fitted LoRA step is well above the base.
    kw = dict(batch_size=8, prefill_tokens=0, decode_tokens=8, max_rank_in_batch=16, num_waiting=0)
    base = profile.step_time_s(distinct_adapters=0, lora_enabled=False, **kw)
    lora = profile.step_time_s(distinct_adapters=1, lora_enabled=True, **kw)
    assert 2.0 < lora / base < 4.0
    # Swaps are free within noise (medians), disk->CPU loads a few ms, larger for rank 16.
    assert profile.cpu_to_gpu_load_s(8) * 1000 < 1.0
    assert 0 < profile.disk_to_cpu_load_s(8) < profile.disk_to_cpu_load_s(16) < 0.05
    assert report.components["lora"].rows >= 20
