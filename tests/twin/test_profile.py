"""Performance profiles: YAML schema, the step-time formula, load costs, KV memory model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from loragate.core.errors import ConfigError
from loragate.twin.profile import (
    LoraModel,
    RankCost,
    dump_profile,
    list_profiles,
    load_profile,
)

BUILTIN = ["fast", "paper-llama-3.1-8b-h100", "paper-qwen-2.5-7b-h100"]


def _t(p, **kw):  # type: ignore[no-untyped-def]
    args = dict(
        batch_size=1,
        distinct_adapters=0,
        prefill_tokens=0,
        decode_tokens=1,
        max_rank_in_batch=0,
        num_waiting=0,
        lora_enabled=True,
    )
    args.update(kw)
    return p.step_time_s(**args)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_profiles_load_and_round_trip(name: str, tmp_path: Path) -> None:
    assert name in list_profiles()
    p = load_profile(name)
    assert p.name == name
    assert p.description and p.source
    dump_profile(p, tmp_path / "p.yaml")
    assert load_profile(tmp_path / "p.yaml") == p


def test_paper_llama_step_time_is_the_papers_formula() -> None:
    p = load_profile("paper-llama-3.1-8b-h100")
    # arXiv 2508.08343: (c1*B + c2) * (k1*A + k2) / 100 ms, c1=0.0438 c2=10.54 k1=1.93 k2=200.
    for b, a in [(1, 1), (100, 4), (400, 32)]:
        expected_ms = (0.0438 * b + 10.54) * (1.93 * a + 200.0) / 100.0
        got = _t(p, batch_size=b, distinct_adapters=a, decode_tokens=b)
        assert got == pytest.approx(expected_ms / 1000.0, rel=1e-12)
    # LoRA disabled: no factor; paper ignores prefill tokens and rank.
    no_lora = _t(p, batch_size=10, decode_tokens=10, lora_enabled=False)
    assert no_lora == pytest.approx((0.0438 * 10 + 10.54) / 1000.0)
    assert _t(p, batch_size=10, prefill_tokens=2000, max_rank_in_batch=32) == _t(p, batch_size=10)


def test_qwen_profile_coefficients() -> None:
    p = load_profile("paper-qwen-2.5-7b-h100")
    expected_ms = (0.0489 * 50 + 10.62) * (1.67 * 8 + 177.7) / 100.0
    assert _t(p, batch_size=50, distinct_adapters=8) == pytest.approx(expected_ms / 1000.0)
    assert 0.0029 < p.cpu_to_gpu_load_s(8) < 0.0036
    assert p.disk_to_cpu_load_s(16) == 0.0  # the paper's twin takes disk loads as free


def test_lora_factor_zero_adapters_prefill_rank_and_scheduler_terms() -> None:
    p = load_profile("fast")
    base = _t(p, lora_enabled=False)
    # A = 0 with LoRA on: the intercept factor applies (kernels run for every batch) ...
    assert _t(p) == pytest.approx((base - 0.05e-3) * 1.5 + 0.05e-3)
    # ... unless the profile measured that case.
    q = replace(p, lora=replace(p.lora, zero_adapter_pct=100.0))
    assert _t(q) == pytest.approx(base)
    # More distinct adapters cost more; prefill tokens cost more in this profile.
    assert _t(p, distinct_adapters=3) > _t(p, distinct_adapters=1) > _t(p)
    assert _t(p, prefill_tokens=1000) > _t(p)
    r = replace(p, lora=LoraModel(pct_per_adapter=0, intercept_pct=100, pct_per_rank=1.0))
    assert _t(r, max_rank_in_batch=32) == pytest.approx((base - 0.05e-3) * 1.32 + 0.05e-3)
    s = replace(p, scheduler=replace(p.scheduler, ms_per_waiting=0.01, max_waiting=100))
    assert _t(s, num_waiting=50) - _t(p, num_waiting=50) == pytest.approx(0.5e-3)
    assert _t(s, num_waiting=10_000) == _t(s, num_waiting=100)


def test_rank_cost_table_interpolates_and_clamps() -> None:
    rc = RankCost(table=((8, 6.0), (16, 7.0), (32, 9.0)))
    assert rc.ms(8) == 6.0
    assert rc.ms(24) == pytest.approx(8.0)
    assert rc.ms(4) == 6.0 and rc.ms(64) == 9.0
    assert RankCost(intercept_ms=1.0, ms_per_rank=0.5).ms(8) == 5.0


def test_kv_model_table_then_line() -> None:
    p = load_profile("paper-llama-3.1-8b-h100")
    kv = p.kv_capacity_tokens
    assert kv(max_loras=8, max_lora_rank=8, lora_enabled=True) == 305104  # measured (R7)
    # (128, 32) did not start in R7: the line 307000 - 48*128*32 decides (below 131072).
    assert kv(max_loras=128, max_lora_rank=32, lora_enabled=True) == 307000 - 48 * 128 * 32
    assert kv(max_loras=100, max_lora_rank=8, lora_enabled=True) == 307000 - 48 * 100 * 8
    assert kv(max_loras=8, max_lora_rank=8, lora_enabled=False) > 305104
    assert kv(max_loras=10_000, max_lora_rank=32, lora_enabled=True) == 0


def test_bad_profiles_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'.*fast"):
        load_profile("nope")
    src = (Path(load_profile.__code__.co_filename).parent / "profiles" / "fast.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("decode_ms_per_seq", "decode_ms_per_sequence"))
    with pytest.raises(ConfigError, match=r"step.*decode_ms_per_sequence"):
        load_profile(bad)
    bad.write_text(src + "extra_key: 1\n")
    with pytest.raises(ConfigError, match="extra_key"):
        load_profile(bad)
    bad.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_profile(bad)


def test_lora_prefill_token_weight_counts_scheduled_tokens() -> None:
    p = load_profile("fast")  # decode 0.02 ms/seq, prefill 0.001 ms/token: weight 0.05
    lora = LoraModel(pct_per_adapter=0, intercept_pct=100, extra_ms_per_token=0.01)
    weighted = replace(p, lora=lora)
    every = replace(p, lora=replace(lora, prefill_token_weight=1.0))
    # Without prefill both agree; 1000 prefill tokens cost 1000 * 0.01 ms in the LoRA term at
    # weight 1, and only 1000 * 0.05 * 0.01 ms with the base step's weight.
    assert _t(every, batch_size=10) == pytest.approx(_t(weighted, batch_size=10))
    extra = _t(every, batch_size=10, prefill_tokens=1000) - _t(
        weighted, batch_size=10, prefill_tokens=1000
    )
    assert extra == pytest.approx(1000 * 0.01 * (1 - 0.05) / 1000.0)


def test_slot_cost_grows_with_the_engines_slots_and_padded_rank() -> None:
    p = replace(load_profile("fast"), lora=LoraModel(ms_per_slot=0.02, ms_per_slot_per_rank=0.001))
    plain = _t(p)  # not specialised: no slot count, no slot cost
    at = {
        (slots, rank): _t(p.specialize(max_loras=slots, max_lora_rank=rank)) - plain
        for slots in (8, 64)
        for rank in (8, 16, 32)
    }
    # max_loras * (0.02 + 0.001 * max(rank, 16)) ms, whatever the batch holds
    assert at[(64, 32)] == pytest.approx(64 * (0.02 + 0.032) / 1000.0)
    assert at[(8, 16)] == pytest.approx(8 * (0.02 + 0.016) / 1000.0)
    assert at[(64, 8)] == pytest.approx(at[(64, 16)])  # ranks below the 16 tile cost the same
    assert at[(64, 16)] == pytest.approx(8 * at[(8, 16)])
    with_adapters = p.specialize(max_loras=64, max_lora_rank=32)
    assert _t(with_adapters, distinct_adapters=5, batch_size=40) - _t(
        p, distinct_adapters=5, batch_size=40
    ) == pytest.approx(at[(64, 32)])
    base_only = replace(
        with_adapters, lora=replace(with_adapters.lora, ms_per_slot=0.0, ms_per_slot_per_rank=0.0)
    )
    assert _t(base_only) == pytest.approx(plain)
