"""The simulated replica counts prompt tokens as the served model's tokenizer would: by default
as the bundled tiny-llama's (no BOS), with ``--add-bos`` as a Llama tokenizer (BOS on a
completion prompt unless ``add_special_tokens`` is false). Over a real socket, openai SDK."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import openai

from loragate.commands.replica import add_arguments, config_from_args

StartReplica = Callable[..., Any]
BASE = "tiny-llama"
PROMPT = "Hello world the adapter"  # 4 tokens on real vLLM with tiny-llama


async def _prompt_tokens(client: openai.AsyncOpenAI, **extra: Any) -> tuple[int, int]:
    comp = await client.completions.create(model=BASE, prompt=PROMPT, max_tokens=1,
                                           extra_body=extra)  # fmt: skip
    chat = await client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=1, extra_body=extra
    )
    assert comp.usage is not None and chat.usage is not None
    return comp.usage.prompt_tokens, chat.usage.prompt_tokens


async def test_prompt_tokens_with_and_without_bos(start_replica: StartReplica) -> None:
    seen: dict[bool, list[tuple[int, int]]] = {}
    for add_bos in (False, True):
        async with (
            start_replica(time_scale=50.0, add_bos=add_bos) as r,
            openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0) as client,
        ):
            seen[add_bos] = [
                await _prompt_tokens(client),
                await _prompt_tokens(client, add_special_tokens=False),
                await _prompt_tokens(client, add_special_tokens=True),
            ]
    # tiny-llama: no BOS anywhere; chat "<|user|>hi</s><|assistant|>" is 4 tokens.
    assert seen[False] == [(4, 4), (4, 4), (4, 4)]
    # A BOS-adding tokenizer: completions get it by default; chat only on request.
    assert seen[True] == [(5, 4), (4, 4), (5, 5)]


def test_the_add_bos_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).prompt_format.add_bos is False
    assert config_from_args(parser.parse_args(["--add-bos"])).prompt_format.add_bos is True
