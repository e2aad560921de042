"""Request fields read as vLLM 0.32's request models read them: pydantic 2 in lax mode, errors in
pydantic's words (rendered by ``vllm_errors.validation_message``).

vLLM's OpenAI request models (``CompletionRequest``, ``ChatCompletionRequest``) are pydantic
models without strict mode: an ``int`` field such as ``max_tokens`` takes ``5``, ``5.0``,
``"5"``, ``" 5.0 "`` and ``true`` (as 1), and refuses ``5.5``, ``1e19``, ``"5."``, ``"1e3"``; a
``bool`` field such as ``stream`` takes ``true``, ``1``, ``1.0`` and the strings ``"true"``,
``"yes"``, ``"on"``, ``"t"``, ``"y"``, ``"1"`` (any case; their ``false`` counterparts), and
refuses ``2``, ``0.5``, ``" true "``. A field that is not ``Optional`` (``n: int = 1``,
``ignore_eos: bool = False``) refuses ``null``. The simulated replica and the gateway
(``gateway.vllm_validation``) read fields through these functions; each appends the field's
pydantic error to ``errors`` and returns the default when it refuses the value, so that every
bad field is listed, in the model's field order, as vLLM lists them.
(Measured with pydantic 2.14, the lax-mode rules of every pydantic 2 release; checked against
pydantic itself in ``tests/twin/test_vllm_fields.py`` and ``tests/gateway/``.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from loragate.twin.vllm_errors import FieldError

# What pydantic's int parser takes from a string once stripped: a sign, ASCII digits (with
# single underscores between them), and a fraction of zeros only.
_INT_TEXT = re.compile(r"([+-]?[0-9]+(?:_[0-9]+)*)(?:\.0+)?")
_I64 = float(1 << 63)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})

NOT_INT = "Input should be a valid integer"
NOT_BOOL = "Input should be a valid boolean"
NOT_STR = "Input should be a valid string"
_TOO_BIG = "Unable to parse input string as an integer, exceeded maximum size"


def lax_int(value: object) -> int | None:
    """``value`` as a lax pydantic ``int`` field reads it, or None if it refuses it. Raises
    ``ValueError`` for a string of more digits than ``int()`` converts (4,300)."""
    if isinstance(value, int):  # bool too: True is 1
        return int(value)
    if isinstance(value, float):  # integral (not NaN, not infinite) and within i64
        return int(value) if value.is_integer() and -_I64 < value < _I64 else None
    if isinstance(value, str):
        match = _INT_TEXT.fullmatch(value.strip())
        return int(match.group(1)) if match is not None else None
    return None


def lax_bool(value: object) -> bool | None:
    """``value`` as a lax pydantic ``bool`` field reads it, or None if it refuses it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        text = value.lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def field_error(
    kind: str, name: str, msg: str, value: Any, ctx: Mapping[str, Any] | None = None
) -> FieldError:
    """One pydantic validation error of body field ``name``."""
    return FieldError(kind=kind, loc=("body", name), msg=msg, input=value, ctx=ctx)


def read_str(payload: Mapping[str, Any], name: str, errors: list[FieldError]) -> str | None:
    """An ``str | None`` field (pydantic does not turn other values into strings)."""
    value = payload.get(name)
    if value is None or type(value) is str:
        return value
    errors.append(field_error("string_type", name, NOT_STR, value))
    return None


def read_bool(
    payload: Mapping[str, Any],
    name: str,
    errors: list[FieldError],
    *,
    default: bool = False,
    nullable: bool = True,
) -> bool:
    """A ``bool`` field (``bool | None`` when ``nullable``; an absent or null one is
    ``default``)."""
    value = payload.get(name)
    if value is None:
        if not nullable and name in payload:
            errors.append(field_error("bool_type", name, NOT_BOOL, None))
        return default
    if type(value) is bool:
        return value
    parsed = lax_bool(value)
    if parsed is not None:
        return parsed
    if isinstance(value, str) or (
        isinstance(value, int | float) and -_I64 < value < _I64 and float(value).is_integer()
    ):
        # Read as an integer or a string, neither of which names a boolean.
        errors.append(
            field_error("bool_parsing", name, f"{NOT_BOOL}, unable to interpret input", value)
        )
    else:
        errors.append(field_error("bool_type", name, NOT_BOOL, value))
    return default


def read_int(
    payload: Mapping[str, Any],
    name: str,
    errors: list[FieldError],
    *,
    default: int | None = None,
    nullable: bool = True,
    ge: int | None = None,
    le: int | None = None,
) -> int | None:
    """An ``int`` field (``int | None`` when ``nullable``; an absent or null one is
    ``default``), within ``ge`` and ``le`` when given (``Field(ge=..., le=...)``)."""
    value = payload.get(name)
    if value is None:
        if not nullable and name in payload:
            errors.append(field_error("int_type", name, NOT_INT, None))
        return default
    number = _read_int(value, ("body", name), errors)
    if number is None:
        return default
    if ge is not None and number < ge:
        msg = f"Input should be greater than or equal to {ge}"
        errors.append(field_error("greater_than_equal", name, msg, value, {"ge": ge}))
        return default
    if le is not None and number > le:
        msg = f"Input should be less than or equal to {le}"
        errors.append(field_error("less_than_equal", name, msg, value, {"le": le}))
        return default
    return number


def _read_int(value: Any, loc: tuple[str | int, ...], errors: list[FieldError]) -> int | None:
    """``value`` as a lax ``int`` at ``loc``, or None with pydantic's error appended."""
    if type(value) is int:
        return value
    try:
        parsed = lax_int(value)
    except ValueError:  # a string of more digits than int() converts (4,300)
        errors.append(FieldError(kind="int_parsing_size", loc=loc, msg=_TOO_BIG, input=value))
        return None
    if parsed is not None:
        return parsed
    if isinstance(value, float):
        if not math.isfinite(value):
            kind, msg = "finite_number", "Input should be a finite number"
        elif not value.is_integer():
            kind, msg = "int_from_float", f"{NOT_INT}, got a number with a fractional part"
        else:
            kind, msg = "int_parsing_size", _TOO_BIG
    elif isinstance(value, str):
        kind, msg = "int_parsing", f"{NOT_INT}, unable to parse string as an integer"
    else:
        kind, msg = "int_type", NOT_INT
    errors.append(FieldError(kind=kind, loc=loc, msg=msg, input=value))
    return None


Prompt = str | list[int] | list[list[int]] | list[str]
_NOT_LIST = "Input should be a valid list"


def read_prompt(payload: Mapping[str, Any], errors: list[FieldError]) -> Prompt | None:
    """A completions ``prompt``: ``list[int] | list[list[int]] | str | list[str] | None`` (token
    ids ``>= 0``), as pydantic's smart union reads it: the first member the value fits exactly
    (an ``int`` list, a list of them, a ``str`` list), else the first it fits in lax mode
    (``["5", 1]`` and ``[1.0]`` are token ids), else every member's errors, in member order."""
    prompt = payload.get("prompt")
    if prompt is None or type(prompt) is str:
        return prompt
    if type(prompt) is not list:
        errors += prompt_type_errors(prompt)
        return None
    if all(type(t) is int and t >= 0 for t in prompt):
        return prompt
    if all(type(p) is list and all(type(t) is int and t >= 0 for t in p) for p in prompt):
        return prompt
    if all(type(p) is str for p in prompt):
        return prompt
    ids_errors: list[FieldError] = []
    ids = _token_ids(prompt, ("body", "prompt"), ids_errors)
    if not ids_errors:
        return ids
    lists_errors: list[FieldError] = []
    lists = []
    for i, p in enumerate(prompt):
        if type(p) is list:
            lists.append(_token_ids(p, ("body", "prompt", i), lists_errors))
        else:
            lists_errors.append(
                FieldError(kind="list_type", loc=("body", "prompt", i), msg=_NOT_LIST, input=p)
            )
    if not lists_errors:
        return lists
    errors += ids_errors + lists_errors
    errors.append(field_error("string_type", "prompt", NOT_STR, prompt))
    errors += [
        FieldError(kind="string_type", loc=("body", "prompt", i), msg=NOT_STR, input=p)
        for i, p in enumerate(prompt)
        if type(p) is not str
    ]
    return None


def _token_ids(items: list[Any], loc: tuple[str | int, ...], errors: list[FieldError]) -> list[int]:
    """``list[int]`` with ``ge=0`` items, lax."""
    out = []
    for i, item in enumerate(items):
        token = _read_int(item, (*loc, i), errors)
        if token is not None and token < 0:
            errors.append(
                FieldError(
                    kind="greater_than_equal",
                    loc=(*loc, i),
                    msg="Input should be greater than or equal to 0",
                    input=item,
                    ctx={"ge": 0},
                )
            )
        elif token is not None:
            out.append(token)
    return out


def prompt_type_errors(prompt: Any) -> list[FieldError]:
    """A completions ``prompt`` that is neither a string nor a list: one error per member of
    its union (``list[int] | list[list[int]] | str | list[str]``), as pydantic lists them."""
    return [
        field_error("list_type", "prompt", "Input should be a valid list", prompt),
        field_error("list_type", "prompt", "Input should be a valid list", prompt),
        field_error("string_type", "prompt", NOT_STR, prompt),
        field_error("list_type", "prompt", "Input should be a valid list", prompt),
    ]


def read_token_list(payload: Mapping[str, Any], name: str, errors: list[FieldError]) -> list[int]:
    """A required ``list[int]`` field of ids ``>= 0`` (``/detokenize``'s ``tokens``), lax:
    missing, not a list, or each bad item an error of its own."""
    if name not in payload:
        errors.append(FieldError(kind="missing", loc=("body", name), msg="Field required",
                                 input=payload))  # fmt: skip
        return []
    value = payload[name]
    if type(value) is not list:
        errors.append(field_error("list_type", name, _NOT_LIST, value))
        return []
    return _token_ids(value, ("body", name), errors)
