from __future__ import annotations

import pytest

from loragate.twin.synthetic_text import (
    TINY_LLAMA_FORMAT,
    OutputSampler,
    PromptFormat,
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


# usage.prompt_tokens of real vLLM 0.32 serving the bundled tiny-llama (whose tokenizer adds no
# BOS; chat template "<|role|>content</s>" per message, then "<|assistant|>"), for prompts whose
# words the synthetic tokenizer counts as its BPE does: tests/e2e/test_vllm_parity.py checks the
# same numbers on real vLLM and the twin.
@pytest.mark.parametrize(
    ("prompt", "add_special_tokens", "tokens"),
    [
        ("Hello world the adapter", True, 4),
        ("Hello world the adapter", False, 4),
        ("hi", True, 1),
        ("Hello, world!", True, 4),
        ("", True, 0),
        ([5, 17, 42, 3], True, 4),
    ],
)
def test_completion_prompt_tokens_as_tiny_llama(
    prompt: str | list[int], add_special_tokens: bool, tokens: int
) -> None:
    fmt = TINY_LLAMA_FORMAT
    assert fmt.completion_prompt_tokens(prompt, add_special_tokens=add_special_tokens) == tokens
    if add_special_tokens:
        assert completion_prompt_tokens(prompt) == tokens


@pytest.mark.parametrize(
    ("texts", "add_generation_prompt", "add_special_tokens", "tokens"),
    [
        (["hi"], True, False, 4),
        (["hi"], False, False, 3),
        (["hi"], True, True, 4),
        (["hi there"], True, False, 5),
        (["Hello world the adapter"], True, False, 7),
        ([""], True, False, 3),
        ([""], False, False, 2),
    ],
)
def test_chat_prompt_tokens_as_tiny_llama(
    texts: list[str], add_generation_prompt: bool, add_special_tokens: bool, tokens: int
) -> None:
    got = TINY_LLAMA_FORMAT.chat_prompt_tokens(
        texts, add_generation_prompt=add_generation_prompt, add_special_tokens=add_special_tokens
    )
    assert got == tokens
    if add_generation_prompt and not add_special_tokens:
        assert chat_prompt_tokens(texts) == tokens


def test_a_tokenizer_that_adds_bos() -> None:
    # Llama's tokenizers add BOS to a completion prompt unless add_special_tokens is false; a
    # chat's BOS is the template's (chat_prefix_tokens), plus the tokenizer's only on request.
    llama = PromptFormat(add_bos=True, chat_prefix_tokens=1, chat_message_tokens=5,
                         chat_generation_prompt_tokens=4)  # fmt: skip
    assert llama.completion_prompt_tokens("hello") == 2
    assert llama.completion_prompt_tokens("hello", add_special_tokens=False) == 1
    assert llama.completion_prompt_tokens([1, 2]) == 2  # token ids are taken as they are
    assert llama.chat_prompt_tokens(["hi"]) == 1 + 5 + 1 + 4
    assert llama.chat_prompt_tokens(["hi"], add_special_tokens=True) == 2 + 5 + 1 + 4
    assert llama.chat_prompt_tokens(["hi", "a b"], add_generation_prompt=False) == 1 + 5 + 1 + 5 + 2
    with pytest.raises(ValueError, match="chat_message_tokens"):
        PromptFormat(chat_message_tokens=-1)


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
