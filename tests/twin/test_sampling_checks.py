"""The simulated replica refuses sampling fields out of range as vLLM 0.32's
``SamplingParams._verify_args`` does, though it uses none of them: after ``n``, before
``max_tokens``, in vLLM's order, with vLLM's words (compared with real vLLM in
``tests/e2e/test_vllm_parity.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from loragate.twin.replica_protocol import parse_generation_request, resolve_all_max_tokens
from loragate.twin.vllm_errors import VllmApiError

NAN = float("nan")


def _answer(kind: str, body: dict[str, Any]) -> tuple[str, str | None] | None:
    """(message, param) of the replica's refusal once the model is known, or None."""
    base = (
        {"prompt": "p"} if kind == "completion" else {"messages": [{"role": "u", "content": "x"}]}
    )
    try:
        gen = parse_generation_request(kind, {**base, **body})  # type: ignore[arg-type]
        resolve_all_max_tokens(gen, 512)
    except VllmApiError as exc:
        assert exc.status == 400 and exc.err_type == "BadRequestError"
        return exc.message, exc.param
    return None


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5.", None),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0.", None),
        ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0.0.",
         None),
        ({"repetition_penalty": float("inf")},
         "repetition_penalty must be a finite number, got inf.", None),
        ({"temperature": -1}, "temperature must be non-negative, got -1.0. (parameter="
         "temperature, value=-1.0)", "temperature"),
        ({"temperature": 2.5}, "temperature must be in [0, 2], got 2.5. (parameter=temperature, "
         "value=2.5)", "temperature"),
        ({"temperature": NAN}, "temperature must be a finite number, got nan. (parameter="
         "temperature, value=nan)", "temperature"),
        ({"temperature": "0.001"}, None, None),  # raised to 0.01: fine
        ({"top_p": 0}, "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p"),
        ({"top_p": "1.5"}, "top_p must be in (0, 1], got 1.5. (parameter=top_p, value=1.5)",
         "top_p"),
        ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2.", None),
        ({"top_k": -1, "min_p": 1}, None, None),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5.", None),
        # vLLM's order: n first, then these, then max_tokens and min_tokens.
        ({"n": 0, "top_p": 5}, "n must be at least 1, got 0.", None),
        ({"top_k": -5, "presence_penalty": 9}, "presence_penalty must be in [-2, 2], got 9.0.",
         None),
        ({"min_p": -1, "max_tokens": 0}, "min_p must be in [0, 1], got -1.0.", None),
        ({"temperature": 0, "top_p": 0}, "top_p must be in (0, 1], got 0.0. (parameter=top_p, "
         "value=0.0)", "top_p"),
    ],
)  # fmt: skip
def test_sampling_fields_out_of_range(
    kind: str, body: dict[str, Any], message: str | None, param: str | None
) -> None:
    assert _answer(kind, body) == (None if message is None else (message, param))


def test_a_mistyped_sampling_field_is_a_validation_error() -> None:
    with pytest.raises(VllmApiError) as exc:
        parse_generation_request("completion", {"prompt": "p", "top_p": "abc", "top_k": 1.5})
    assert exc.value.err_type == "Bad Request" and exc.value.param == "body.top_p"
    assert exc.value.message.startswith("2 validation errors:\n  {'type': 'float_parsing'")
