from __future__ import annotations

import pytest

from loragate.twin.synthetic_text import (
    BOS_TOKENS,
    OutputSampler,
    chat_prompt_tokens,
    completion_prompt_tokens,
    count_text_tokens,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("hello", 1),
        ("Hello world the adapter", 4),
        ("a, b", 3),
        ("abcdefghijklmno", 3),  # 15 letters -> ceil(15 / 7)
        ("123456789", 2),
        ("  ", 1),
    ],
)
def test_count_text_tokens(text: str, tokens: int) -> None:
    assert count_text_tokens(text) == tokens


def test_prompt_token_counts() -> None:
    assert completion_prompt_tokens("hello") == BOS_TOKENS + 1
    assert completion_prompt_tokens([5, 6, 7]) == 3
    one = chat_prompt_tokens(["hi"])
    two = chat_prompt_tokens(["hi", "hello there"])
    assert two - one == count_text_tokens("hello there") + (one - BOS_TOKENS - 2 - 1)


def test_ignore_eos_gives_exactly_max_tokens() -> None:
    sampler = OutputSampler(seed=1, mean_output_tokens=2.0)
    for i in range(50):
        plan = sampler.plan(model="m", prompt_key=str(i), max_tokens=40, ignore_eos=True)
        assert plan.num_tokens == 40
        assert plan.finish_reason == "length"


def test_eos_sampled_earlier_and_counted_without_text() -> None:
    sampler = OutputSampler(seed=3, mean_output_tokens=8.0)
    plans = [sampler.plan(model="m", prompt_key="p", max_tokens=64) for _ in range(200)]
    stops = [p for p in plans if p.finish_reason == "stop"]
    assert stops, "a mean of 8 tokens must stop before 64 most of the time"
    assert all(p.num_tokens < 64 and p.token_texts[-1] == "" for p in stops)
    assert all(p.num_tokens == 64 for p in plans if p.finish_reason == "length")
    mean = sum(p.num_tokens for p in plans) / len(plans)
    assert 4.0 < mean < 16.0


def test_min_tokens_delays_eos() -> None:
    sampler = OutputSampler(seed=0, mean_output_tokens=1.0)
    for _ in range(20):
        assert (
            sampler.plan(model="m", prompt_key="p", max_tokens=50, min_tokens=10).num_tokens >= 10
        )


def test_plans_are_reproducible_from_the_seed() -> None:
    def run(seed: int) -> list[tuple[str, ...]]:
        s = OutputSampler(seed=seed, mean_output_tokens=16.0)
        return [s.plan(model="m", prompt_key="p", max_tokens=32).token_texts for _ in range(5)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_greedy_is_same_per_prompt_and_differs_by_model() -> None:
    s = OutputSampler(seed=0, mean_output_tokens=16.0)
    a = s.plan(model="lora-0", prompt_key="hi", max_tokens=8, greedy=True, ignore_eos=True)
    b = s.plan(model="lora-0", prompt_key="hi", max_tokens=8, greedy=True, ignore_eos=True)
    c = s.plan(model="base", prompt_key="hi", max_tokens=8, greedy=True, ignore_eos=True)
    assert a == b
    assert a.text != c.text


def test_max_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutputSampler(seed=0, mean_output_tokens=1.0).plan(model="m", prompt_key="", max_tokens=0)
