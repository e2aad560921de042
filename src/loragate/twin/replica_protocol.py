"""Parsing ``/v1/completions`` and ``/v1/chat/completions`` bodies as vLLM 0.32 validates them.

Type errors become pydantic-style 400s (see ``vllm_errors``); value errors use vLLM's wording.
Only the fields that change what the simulated replica does are interpreted; every other
OpenAI/vLLM field is accepted and ignored (sampling parameters only change synthetic text).

``echo`` as vLLM 0.32.0 does it (``entrypoints/openai/completion/protocol.py``,
``to_sampling_params``; ``completion/serving.py``; ``chat_completion/serving.py``):

* ``/v1/completions``: each choice's text is the prompt's text followed by the generated text.
  ``echo`` with ``max_tokens: 0`` is allowed (``echo_without_generation``): the request runs with
  ``max_tokens=1``, the text is the prompt alone, but the one hidden token still counts in
  ``usage.completion_tokens`` and its ``finish_reason`` ("length") is the choice's. A token-id
  prompt is detokenized for the echo (``renderers/base.py``: ``tokenizer.decode``).
* ``/v1/chat/completions``: the answer is prefixed with the last message's content when that
  message has the answer's role ("assistant", or with ``add_generation_prompt: false`` the last
  message's own role, which then is also the answer's role). ``max_tokens: 0`` stays an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loragate.twin.request_prechecks import (
    check_chat_body,
    check_completion_body,
    no_prompt,
)
from loragate.twin.sampling_checks import SamplingFields, check_sampling_fields
from loragate.twin.synthetic_logprobs import (
    TokenLogprob,
    check_logprobs_limit,
    prompt_logprob,
    prompt_logprobs_field,
)
from loragate.twin.synthetic_text import TINY_LLAMA_FORMAT, VOCAB, PromptFormat, text_tokens
from loragate.twin.vllm_errors import FieldError, bad_request, validation_error
from loragate.twin.vllm_fields import field_error, read_bool, read_int, read_prompt, read_str

Kind = Literal["completion", "chat"]
SYNTHETIC_VOCAB_SIZE = 1024  # the recorded tiny-llama's vocabulary


_NO_SAMPLING_FIELDS = SamplingFields()


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptSpec:
    """One prompt of a request: its token count, a key for reproducible output and the text that
    ``echo`` puts before the output (completions: the prompt's text; chat: the last message's
    content when it has the answer's role, else empty)."""

    prompt_tokens: int
    key: str
    echo_text: str = ""
    token_ids: tuple[int, ...] | None = None  # a token-id prompt's ids

    def ids(self) -> list[int]:
        """The prompt's token ids: its own, or synthetic ones (stable per prompt) for text."""
        if self.token_ids is not None:
            return list(self.token_ids)
        rng = random.Random(f"ids|{self.key}")
        return [rng.randrange(SYNTHETIC_VOCAB_SIZE) for _ in range(self.prompt_tokens)]

    def token_texts(self) -> list[str]:
        """The prompt's tokens as text, joined: ``echo_text`` (a token-id prompt: each id's
        piece; a text: the synthetic tokenizer's cuts, after an empty one per token the
        tokenizer adds)."""
        if self.token_ids is not None:
            return [VOCAB[t % len(VOCAB)] for t in self.token_ids]
        tokens = text_tokens(self.echo_text)
        return [""] * max(0, self.prompt_tokens - len(tokens)) + tokens

    def logprob_entries(self, alternatives: int, texts: list[str]) -> list[TokenLogprob]:
        """Each prompt token's synthetic logprob after ``alternatives`` better tokens."""
        return [prompt_logprob(self.key, i, t, alternatives) for i, t in enumerate(texts)]

    def prompt_logprobs(self, top: int = 0) -> list[dict[str, dict[str, Any]] | None]:
        """What vLLM returns as ``prompt_logprobs`` for a chat request with ``echo`` (its
        ``top_logprobs``, 0 by default, becomes ``prompt_logprobs``): ``null`` for the first
        token, then each prompt token's own entry and ``top`` better ones; the numbers are
        synthetic."""
        ids = self.ids()
        entries = self.logprob_entries(top, [VOCAB[t % len(VOCAB)] for t in ids])
        return prompt_logprobs_field(entries, ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    kind: Kind
    model: str | None
    prompts: tuple[PromptSpec, ...]
    n: int
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    greedy: bool
    seed: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # stream_options.continuous_usage_stats, with include_usage
    sampling: SamplingFields = _NO_SAMPLING_FIELDS  # range-checked, otherwise unused
    echo: bool = False
    prompt_embeds: bool = False  # completions: embeddings given (refused once the model is known)
    role: str = "assistant"  # chat: the answer's role
    max_tokens_param: str = "max_tokens"  # the field max_tokens came from
    logprobs: int | None = None  # sample logprobs per token (chat: top_logprobs), None: off
    prompt_logprobs: int | None = None  # the prompt's (echo: logprobs), for the limit check

    @property
    def echo_only(self) -> bool:
        """``/v1/completions`` with ``echo`` and ``max_tokens: 0``: the prompt, nothing
        generated (vLLM still runs the request with ``max_tokens=1``)."""
        return self.echo and self.kind == "completion" and self.max_tokens == 0

    @property
    def engine_max_tokens(self) -> int | None:
        """The ``max_tokens`` vLLM's ``SamplingParams`` gets from the body."""
        return 1 if self.echo_only else self.max_tokens


class _Fields:
    """Collects pydantic-style errors while reading fields of one body (``vllm_fields``: lax
    mode, pydantic's words; read them in the request model's field order)."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.errors: list[FieldError] = []

    def int_(
        self,
        field: str,
        default: int | None,
        *,
        nullable: bool = True,
        ge: int | None = None,
        le: int | None = None,
    ) -> int | None:
        return read_int(
            self.body, field, self.errors, default=default, nullable=nullable, ge=ge, le=le
        )

    def float_(self, field: str, default: float | None) -> float | None:
        value = self.body.get(field)
        if value is None:
            return default
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                self.errors.append(
                    field_error(
                        "float_parsing",
                        field,
                        "Input should be a valid number, unable to parse string as a number",
                        value,
                    )
                )
                return default
        self.errors.append(
            field_error("float_type", field, "Input should be a valid number", value)
        )
        return default

    def bool_(self, field: str, default: bool, *, nullable: bool = True) -> bool:
        return read_bool(self.body, field, self.errors, default=default, nullable=nullable)

    def str_(self, field: str) -> str | None:
        return read_str(self.body, field, self.errors)


def parse_generation_request(
    kind: Kind, body: Mapping[str, Any], fmt: PromptFormat = TINY_LLAMA_FORMAT
) -> GenerationRequest:
    """Validate a completions or chat body; raises ``VllmApiError`` (400) when invalid.
    ``fmt`` says what the served model's tokenizer and chat template add to a prompt."""
    if kind == "completion":  # vLLM's "before" model validators: ahead of every field
        check_completion_body(body)
    else:
        check_chat_body(body)
    f = _Fields(body)
    # The fields the twin uses, in the request model's field order (so errors are listed as
    # vLLM lists them): CompletionRequest / ChatCompletionRequest.
    max_tokens_param = "max_tokens"
    prompts: tuple[PromptSpec, ...] | None = None
    role = "assistant"
    if kind == "completion":
        model = f.str_("model")
        prompt_texts = _completion_prompts(f)
        echo = f.bool_("echo", False)
        frequency_penalty = f.float_("frequency_penalty", None)
        logprobs = f.int_("logprobs", None)
        echo_logprobs = logprobs
        # CompletionRequest.max_tokens defaults to 16, and a null is replaced by that default.
        max_tokens = f.int_("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
        n = f.int_("n", 1, nullable=False)
    else:
        chat_texts = _chat_texts(f)
        model = f.str_("model")
        frequency_penalty = f.float_("frequency_penalty", None)
        want_logprobs = f.bool_("logprobs", False)
        top_logprobs = f.int_("top_logprobs", 0)  # null is 0
        logprobs = top_logprobs if want_logprobs else None
        echo_logprobs = top_logprobs
        max_tokens = f.int_("max_tokens", None)
        max_completion_tokens = f.int_("max_completion_tokens", None)
        if max_completion_tokens is not None:  # it wins over max_tokens
            max_tokens, max_tokens_param = max_completion_tokens, "max_completion_tokens"
        n = f.int_("n", 1)  # (chat: Optional, null is 1)
    presence_penalty = f.float_("presence_penalty", None)
    seed = f.int_("seed", None, ge=-(1 << 63), le=(1 << 63) - 1)
    stream = f.bool_("stream", False)
    include_usage, continuous_usage = _stream_options(f)
    temperature = f.float_("temperature", None)
    sampling = SamplingFields(
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        temperature=temperature,
        top_p=f.float_("top_p", None),
        top_k=f.int_("top_k", None),
        min_p=f.float_("min_p", None),
        repetition_penalty=f.float_("repetition_penalty", None),
    )
    ignore_eos = f.bool_("ignore_eos", False, nullable=False)
    min_tokens = f.int_("min_tokens", 0, nullable=False)
    if kind == "chat":  # vLLM's extra chat fields come after the sampling ones
        echo = f.bool_("echo", False, nullable=False)
        add_generation_prompt = f.bool_("add_generation_prompt", True, nullable=False)
        add_special_tokens = f.bool_("add_special_tokens", False, nullable=False)
        if chat_texts is not None and not f.errors:
            prompts, role = _chat_prompts(
                f.body["messages"], chat_texts, fmt, add_generation_prompt, add_special_tokens
            )
    else:
        add_special_tokens = f.bool_("add_special_tokens", True, nullable=False)
        if prompt_texts is not None:
            prompts = tuple(
                _token_prompt(p)
                if isinstance(p, list)
                else _text_prompt(p, fmt, add_special_tokens=add_special_tokens)
                for p in prompt_texts
            )
    if f.errors:
        raise validation_error(f.errors)
    assert n is not None and min_tokens is not None
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is None and echo:  # vLLM: echo asks for the prompt's logprobs too
        prompt_logprobs = echo_logprobs
    # max_tokens and min_tokens are checked per prompt, once the model is known:
    # resolve_max_tokens.
    assert prompts is not None
    return GenerationRequest(
        kind=kind,
        model=model,
        prompts=prompts,
        n=n,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        greedy=temperature is not None and temperature == 0.0,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        sampling=sampling,
        echo=echo,
        prompt_embeds=kind == "completion" and body.get("prompt_embeds") not in (None, []),
        role=role,
        max_tokens_param=max_tokens_param,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs if isinstance(prompt_logprobs, int) else None,
    )


COMPLETION_DEFAULT_MAX_TOKENS = 16


def _stream_options(f: _Fields) -> tuple[bool, bool]:
    """``stream_options``' (``include_usage``, ``continuous_usage_stats``): ``StreamOptions``,
    both ``bool | None``; the second counts only with the first (``should_include_usage``)."""
    options = f.body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, Mapping):
        f.errors.append(
            FieldError(
                kind="model_type",
                loc=("body", "stream_options"),
                msg="Input should be a valid dictionary or instance of StreamOptions",
                input=options,
            )
        )
        return False, False
    inner: list[FieldError] = []
    include_usage = read_bool(options, "include_usage", inner)
    continuous = read_bool(options, "continuous_usage_stats", inner)
    f.errors += [dataclasses.replace(e, loc=("body", "stream_options", *e.loc[1:])) for e in inner]
    return include_usage, include_usage and continuous


def _completion_prompts(f: _Fields) -> list[str | list[int]] | None:
    """The body's prompts: texts and token-id lists (an empty list: none, which vLLM's renderer
    refuses once the model is known; an empty text or id list: the engine's 'cannot be
    empty'). No prompt at all passed vLLM's "before" checks only with ``prompt_embeds``, which
    are refused once the model is known (``check_prompt_count``). None (errors recorded) when
    pydantic refuses the value (``vllm_fields.read_prompt``)."""
    if no_prompt(f.body):
        return []
    prompt = read_prompt(f.body, f.errors)
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    ids = [t for t in prompt if isinstance(t, int)]
    if ids:
        return [ids]  # one prompt of token ids
    return [p if isinstance(p, str) else list(p) for p in prompt if isinstance(p, str | list)]


def _text_prompt(prompt: str, fmt: PromptFormat, *, add_special_tokens: bool) -> PromptSpec:
    tokens = fmt.completion_prompt_tokens(prompt, add_special_tokens=add_special_tokens)
    return PromptSpec(prompt_tokens=tokens, key=prompt, echo_text=prompt)


def _token_prompt(token_ids: list[int]) -> PromptSpec:
    return PromptSpec(
        prompt_tokens=len(token_ids),
        key=json.dumps(token_ids),
        echo_text=detokenize(token_ids),
        token_ids=tuple(token_ids),
    )


def detokenize(token_ids: list[int]) -> str:
    """Synthetic text of a token-id prompt (the replica has no tokenizer): a fixed piece of the
    output vocabulary per id, so the same ids always read the same."""
    return "".join(VOCAB[t % len(VOCAB)] for t in token_ids)


def chat_message_texts(body: Mapping[str, Any]) -> tuple[list[str] | None, list[FieldError]]:
    """Each message's text content of a body's ``messages`` (as a chat completion reads them),
    or None and the pydantic-style errors found."""
    f = _Fields(body)
    texts = _chat_texts(f)
    return texts, f.errors


def _chat_texts(f: _Fields) -> list[str] | None:
    """Each message's text content, or None (errors recorded) when ``messages`` is invalid."""
    messages = f.body.get("messages")
    if messages is None:
        f.errors.append(
            FieldError(kind="missing", loc=("body", "messages"), msg="Field required", input=f.body)
        )
        return None
    if not isinstance(messages, list):
        f.errors.append(
            FieldError(
                kind="list_type",
                loc=("body", "messages"),
                msg="Input should be a valid list",
                input=messages,
            )
        )
        return None
    texts: list[str] = []
    for i, message in enumerate(messages):
        text = _message_text(f, i, message)
        if text is not None:
            texts.append(text)
    return None if f.errors else texts


def _chat_prompts(
    messages: list[Any],
    texts: list[str],
    fmt: PromptFormat,
    add_generation_prompt: bool,
    add_special_tokens: bool,
) -> tuple[tuple[PromptSpec, ...], str]:
    """The conversation's prompt and the answer's role. The prompt is the template's rendering
    (without the generation prompt it lacks the assistant header's tokens); the text ``echo``
    repeats (``chat_completion/serving.py``) is the last message's content if it has the
    answer's role. List content is its text parts joined by newlines, as vLLM renders it for a
    string chat template."""
    last = messages[-1] if messages else None
    role = "assistant"
    if not add_generation_prompt and isinstance(last, Mapping):
        role = str(last["role"])
    echo_text = ""
    if isinstance(last, Mapping) and last.get("role") == role:
        content = last.get("content")
        if isinstance(content, str):
            echo_text = content
        elif isinstance(content, list):
            echo_text = "\n".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "text"
            )
    if not messages:
        return (), role  # nothing to render: check_prompt_count refuses it
    tokens = fmt.chat_prompt_tokens(
        texts, add_generation_prompt=add_generation_prompt, add_special_tokens=add_special_tokens
    )
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return (PromptSpec(prompt_tokens=tokens, key=key, echo_text=echo_text),), role


def _message_text(f: _Fields, index: int, message: Any) -> str | None:
    loc: tuple[str | int, ...] = ("body", "messages", index)
    if not isinstance(message, Mapping):
        f.errors.append(
            FieldError(
                kind="model_type", loc=loc, msg="Input should be a valid dictionary", input=message
            )
        )
        return None
    if not isinstance(message.get("role"), str):
        f.errors.append(
            FieldError(kind="missing", loc=(*loc, "role"), msg="Field required", input=message)
        )
        return None
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        ]
        return "".join(parts)
    f.errors.append(
        FieldError(
            kind="string_type",
            loc=(*loc, "content"),
            msg="Input should be a valid string",
            input=content,
        )
    )
    return None


def check_prompt_count(gen: GenerationRequest) -> None:
    """What vLLM's renderer refuses once the model is known, ahead of the prompts' lengths:

    * ``prompt_embeds`` (completions): with ``echo``, ``Echo is unsupported with prompt
      embeds.`` (``renderers/online_renderer.py`` ``render_completion``); else, as vLLM was not
      started with ``--enable-prompt-embeds`` (the twin has no use for it), ``You must set
      `--enable-prompt-embeds` to input `prompt_embeds`.`` (``renderers/embed_utils.py``,
      ``param`` "prompt_embeds"), with or without a ``prompt`` beside them.
    * Empty input that passes request validation but not rendering: a completions ``prompt`` of
      ``[]`` (``renderers/base.py`` ``render_prompts``) or a chat of no ``messages`` (the
      tokenizer's ``apply_chat_template``, transformers 5.19's ``tokenization_utils_base.py``).
      Either ``ValueError`` is a 400 ``BadRequestError`` without ``param``.

    Real vLLM 0.32 answered exactly these (``tests/e2e/test_vllm_parity.py``)."""
    if gen.prompt_embeds:
        if gen.echo:
            raise bad_request("Echo is unsupported with prompt embeds.")
        raise bad_request(
            "You must set `--enable-prompt-embeds` to input `prompt_embeds`.",
            param="prompt_embeds",
        )
    if gen.prompts:
        return
    if gen.kind == "chat":
        raise bad_request(
            "Cannot apply chat template to an empty conversation. Provide at least one message."
        )
    raise bad_request("You must pass at least one prompt")


MAX_N_SEQUENCES_ENV = "VLLM_MAX_N_SEQUENCES"
DEFAULT_MAX_N_SEQUENCES = 16384


def check_n(n: int) -> None:
    """``SamplingParams``' ``_verify_num_sequences``: ``n`` of 1 to ``VLLM_MAX_N_SEQUENCES``
    (16384 unless the environment says otherwise)."""
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    max_n = int(os.environ.get(MAX_N_SEQUENCES_ENV, str(DEFAULT_MAX_N_SEQUENCES)))
    if n > max_n:
        raise bad_request(
            f"n must be at most {max_n}, got {n}. To increase this limit, set the "
            f"{MAX_N_SEQUENCES_ENV} environment variable."
        )


def resolve_max_tokens(gen: GenerationRequest, spec: PromptSpec, max_model_len: int) -> int:
    """The ``max_tokens`` one prompt of ``gen`` runs with, or vLLM 0.32's 400, in its order:

    1. ``TokenizeParams`` (``renderers/params.py``): a requested ``max_tokens`` above
       ``max_model_len``; a prompt longer than ``max_model_len`` (a text prompt is tokenized
       with truncation at ``max_model_len + 1``, hence "at least").
    2. ``get_max_tokens`` (``serve/utils/api_utils.py``): the request is *clamped* to the room
       left in the context window (no error), and fills it when no ``max_tokens`` is given.
    3. ``SamplingParams`` (``_verify_args``): ``n`` below 1 or above ``VLLM_MAX_N_SEQUENCES``
       (so after the model lookup, not with the body's fields); the sampling fields' ranges
       (``sampling_checks``); the result (1 for an echo without generation) below 1,
       ``min_tokens`` below 0 or above it; then ``n`` above 1 with greedy sampling.
    4. The engine's input processor (``v1/engine/input_processor.py``): ``logprobs`` (and the
       prompt's) above ``--max-logprobs`` (``synthetic_logprobs.check_logprobs_limit``), then
       ``_validate_prompt_len``: an empty prompt; a prompt of exactly ``max_model_len`` tokens
       (reachable only by an echo without generation).
    """
    _check_rendered(gen, spec, max_model_len)
    sampled = _sampling_max_tokens(gen, spec, max_model_len)
    check_logprobs_limit(gen.logprobs, gen.prompt_logprobs)
    _check_engine_input(spec, max_model_len)
    return sampled


def resolve_all_max_tokens(gen: GenerationRequest, max_model_len: int) -> list[int]:
    """``resolve_max_tokens`` for every prompt of ``gen``, each step for all prompts before the
    next, as vLLM 0.32's ``create_completion`` takes them: the renderer renders every prompt
    (1), then each prompt gets its sampling parameters (2, 3), then the engine takes each
    request (4). So a later prompt's earlier-step error is the answer."""
    for spec in gen.prompts:
        _check_rendered(gen, spec, max_model_len)
    sampled = [_sampling_max_tokens(gen, spec, max_model_len) for spec in gen.prompts]
    if gen.prompts:  # the engine's input processor: the parameters, then the prompt
        check_logprobs_limit(gen.logprobs, gen.prompt_logprobs)
    for spec in gen.prompts:
        _check_engine_input(spec, max_model_len)
    return sampled


def _check_rendered(gen: GenerationRequest, spec: PromptSpec, limit: int) -> None:
    """Step 1: the renderer's ``TokenizeParams``."""
    prompt, requested = spec.prompt_tokens, gen.max_tokens
    if requested is not None and requested > limit:
        param = gen.max_tokens_param
        raise bad_request(
            f"{param}={requested} cannot be greater than max_model_len={limit}. Please request "
            "fewer output tokens.",
            param=param,
            value=requested,
        )
    if prompt > limit:
        count = prompt if spec.token_ids is not None else limit + 1
        at_least = "at least " if count == limit + 1 else ""
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains {at_least}{count} input tokens, which exceeds this limit even without any "
            "output tokens. Please reduce the length of the input prompt.",
            param="input_tokens",
            value=count,
        )


def _sampling_max_tokens(gen: GenerationRequest, spec: PromptSpec, limit: int) -> int:
    """Steps 2 and 3: the clamped ``max_tokens`` and ``SamplingParams``' checks."""
    room, requested = limit - spec.prompt_tokens, gen.max_tokens
    sampled = 1 if gen.echo_only else min(room, requested) if requested is not None else room
    check_n(gen.n)
    check_sampling_fields(gen.sampling)
    if sampled < 1:
        raise bad_request(
            f"max_tokens must be at least 1, got {sampled}.", param="max_tokens", value=sampled
        )
    if gen.min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {gen.min_tokens}.")
    if gen.min_tokens > sampled:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={sampled}, got {gen.min_tokens}."
        )
    if gen.greedy and gen.n > 1:
        raise bad_request(f"n must be 1 when using greedy sampling, got {gen.n}.")
    return sampled


def _check_engine_input(spec: PromptSpec, limit: int) -> None:
    """Step 4: the engine's ``_validate_prompt_len``."""
    prompt = spec.prompt_tokens
    if prompt == 0:  # an empty text (without BOS) or id list; real vLLM: [""] and [[]]
        raise bad_request("The decoder prompt cannot be empty")
    if prompt == limit:
        raise bad_request(
            f"The decoder prompt (length {prompt}) plus the number of requested output tokens "
            f"(at least 1) is longer than the maximum model length of {limit}. Make sure that "
            "`max_model_len` is no smaller than the number of text tokens (prompt + requested "
            "output tokens)."
        )
