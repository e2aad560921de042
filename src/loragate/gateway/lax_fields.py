"""Request fields read as vLLM reads them: pydantic v2 in lax mode.

vLLM's OpenAI request models (``CompletionRequest``, ``ChatCompletionRequest``) are pydantic
models without strict mode: an ``int`` field such as ``max_tokens`` takes ``5``, ``5.0``,
``"5"``, ``" 5.0 "`` and ``true`` (as 1), and refuses ``5.5``, ``1e19``, ``"5."``, ``"1e3"``; a
``bool`` field such as ``stream`` takes ``true``, ``1``, ``1.0`` and the strings ``"true"``,
``"yes"``, ``"on"``, ``"t"``, ``"y"``, ``"1"`` (any case; their ``false`` counterparts), and
refuses ``2``, ``0.5``, ``" true "``. The gateway reads the few fields it needs the same way, so
that it refuses no request a replica would serve, and streams exactly when the replica does.
(Measured with pydantic 2.14, the lax-mode rules of every pydantic 2 release.)

The request body itself is forwarded unchanged: the replica judges every field for itself.
"""

from __future__ import annotations

import re

# What pydantic's int parser takes from a string once stripped: a sign, ASCII digits (with
# single underscores between them), and a fraction of zeros only.
_INT_TEXT = re.compile(r"([+-]?[0-9]+(?:_[0-9]+)*)(?:\.0+)?")
_I64 = float(1 << 63)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def lax_int(value: object) -> int | None:
    """``value`` as a lax pydantic ``int`` field reads it, or None if it refuses it."""
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
