"""How vLLM 0.32's request-validation handler renders a pydantic error, for the tests that
compare the gateway's and the simulated replica's answers with pydantic's own (the reference):
an error's location and its input as vLLM shows them."""

from __future__ import annotations

import re
from typing import Any


def clean_loc(loc: tuple[Any, ...]) -> str:
    """A location as vLLM names it: pydantic's wrapper and union-member segments dropped."""
    markers = {"function-wrap", "int", "str", "list", "bool", "nullable", "union"}
    parts = [str(p) for p in loc if not re.search(r"[\[\]{}()]", str(p)) and p not in markers]
    return ".".join(parts)


def input_summary(value: Any) -> Any:
    """An error's input as vLLM shows it: containers described, text cut at 200 characters."""
    if isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"
