"""vLLM 0.32's range checks on the sampling fields a request may set, which the simulated
replica does not otherwise use (``SamplingParams._verify_args``, ``sampling_params.py``): made
after ``n``'s and before ``max_tokens``', in this order, on the values the request model's
``to_sampling_params`` passes (the field, else the model's ``generation_config``, which for
the bundled tiny model sets none of them, else the OpenAI default ``_DEFAULT_SAMPLING_PARAMS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loragate.twin.vllm_errors import bad_request


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingFields:
    """The body's sampling fields as read (None: absent or null)."""

    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def check_sampling_fields(f: SamplingFields) -> None:
    """Raise vLLM's 400 for the first sampling field out of its range, in vLLM's order."""
    presence = _or(f.presence_penalty, 0.0)
    if not -2.0 <= presence <= 2.0:
        raise bad_request(f"presence_penalty must be in [-2, 2], got {presence}.")
    frequency = _or(f.frequency_penalty, 0.0)
    if not -2.0 <= frequency <= 2.0:
        raise bad_request(f"frequency_penalty must be in [-2, 2], got {frequency}.")
    repetition = _or(f.repetition_penalty, 1.0)
    if not math.isfinite(repetition):
        raise bad_request(f"repetition_penalty must be a finite number, got {repetition}.")
    if repetition <= 0.0:
        raise bad_request(f"repetition_penalty must be greater than zero, got {repetition}.")
    temperature = _or(f.temperature, 1.0)
    if 0.0 < temperature < _MAX_TEMP:  # vLLM raises it to this first (with a warning)
        temperature = _MAX_TEMP
    if not math.isfinite(temperature):
        raise _temperature(f"temperature must be a finite number, got {temperature}.", temperature)
    if temperature < 0.0:
        raise _temperature(f"temperature must be non-negative, got {temperature}.", temperature)
    if temperature > 2.0:
        raise _temperature(f"temperature must be in [0, 2], got {temperature}.", temperature)
    top_p = _or(f.top_p, 1.0)
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}.", param="top_p", value=top_p)
    top_k = 0 if f.top_k is None else f.top_k
    if top_k < -1:
        raise bad_request(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    min_p = _or(f.min_p, 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise bad_request(f"min_p must be in [0, 1], got {min_p}.")


_MAX_TEMP = 1e-2  # sampling_params._MAX_TEMP


def _temperature(message: str, value: float) -> Exception:
    return bad_request(message, param="temperature", value=value)
