"""The gateway reads max_tokens and stream as vLLM's pydantic models do (lax mode): checked
value by value against pydantic itself (installed with the openai SDK)."""

from __future__ import annotations

import json

import pytest

from loragate.gateway.lax_fields import lax_bool, lax_int

pydantic = pytest.importorskip("pydantic")

JSON_VALUES = [
    "5", "0", "-3", "5.0", "-0.0", "1e3", "5.5", "5.000000000000001", "1e18", "9.2e18",
    "9.223372036854776e18", "-9.223372036854776e18", "1e400", "99999999999999999999",
    '"5"', '" 7 "', '"+5"', '"-5"', '"05"', '"5.0"', '"5.00"', '"+5.0"', '"1_000"',
    '"1_000.0"', '"1__0"', '"_1"', '"5."', '".5e1"', '"1e3"', '"0x10"', '"inf"', '""', '"  "',
    '"true"', '"True"', '"TRUE"', '"yes"', '"on"', '"t"', '"y"', '"1"', '"0"', '"no"', '"off"',
    '"f"', '"n"', '"false"', '" true "', '"2"', "true", "false", "1.0", "0.5", "2", "null",
    "[5]", "{}",
]  # fmt: skip


def _pydantic(kind: type, raw: str) -> object:
    try:
        return pydantic.TypeAdapter(kind).validate_json(raw)
    except pydantic.ValidationError:
        return None


@pytest.mark.parametrize("raw", JSON_VALUES)
def test_integers_as_vllm_reads_them(raw: str) -> None:
    assert lax_int(json.loads(raw)) == _pydantic(int, raw)


@pytest.mark.parametrize("raw", JSON_VALUES)
def test_booleans_as_vllm_reads_them(raw: str) -> None:
    assert lax_bool(json.loads(raw)) == _pydantic(bool, raw)
