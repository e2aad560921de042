"""The simulated replica reads the fields it uses as vLLM 0.32's request models do: pydantic 2 in
lax mode, the same errors in the same order (``twin.vllm_fields``); the adapter admin calls'
bodies too.

The reference is pydantic itself (installed with the openai SDK) on models declaring those
fields as vLLM 0.32 declares them (``CompletionRequest``, ``ChatCompletionRequest``: types,
defaults, ``Optional`` or not, field order; ``extra="allow"``), validated as FastAPI validates
a body and rendered as vLLM's validation handler renders the errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import aiohttp
import pytest

from loragate.twin.replica_protocol import parse_generation_request
from loragate.twin.vllm_errors import VllmApiError
from loragate.twin.vllm_fields import lax_bool, lax_int
from vllm_reference import clean_loc, input_summary

pydantic = pytest.importorskip("pydantic")
StartReplica = Callable[..., Any]


class _Base(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")


_TokenId = Annotated[int, pydantic.Field(ge=0)]


class _StreamOptions(_Base):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Completion(_Base):
    model: str | None = None
    prompt: list[_TokenId] | list[list[_TokenId]] | str | list[str] | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    max_tokens: int | None = 16
    n: int = 1
    presence_penalty: float | None = None
    seed: int | None = pydantic.Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    add_special_tokens: bool = True


class _Chat(_Base):
    messages: list[dict[str, Any]]
    model: str | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    seed: int | None = pydantic.Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    echo: bool = False
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


_SAMPLING = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty"]
FIELDS = {
    "completion": ["model", "echo", "frequency_penalty", "max_tokens", "n", "presence_penalty",
                   "seed", "stream", *_SAMPLING, "ignore_eos", "min_tokens",
                   "add_special_tokens"],
    "chat": ["model", "frequency_penalty", "max_tokens", "max_completion_tokens", "n",
             "presence_penalty", "seed", "stream", *_SAMPLING, "ignore_eos", "min_tokens",
             "echo", "add_generation_prompt", "add_special_tokens"],
}  # fmt: skip
FLOATS = {"frequency_penalty", "presence_penalty", "temperature", "top_p", "min_p",
          "repetition_penalty"}  # fmt: skip
BASE_BODY: dict[str, dict[str, Any]] = {
    "completion": {"prompt": "p"},
    "chat": {"messages": [{"role": "user", "content": "hi"}]},
}
VALUES = [
    "5", "0", "-3", "5.0", "-0.0", "1e3", "5.5", "1e18", "1e19", "-1e19", "1e400", "-1e400",
    "NaN", '"5"', '" 7 "', '"5.0"', '"1_000"', '"5."', '"1e3"', '""', '"true"', '"yes"',
    '"off"', '" true "', '"2"', "true", "false", "1.0", "0.5", "2", "null", "[5]", "{}",
    '"' + "9" * 5000 + '"', "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    '"9223372036854775808"', "99999999999999999999",
]  # fmt: skip


def _vllm(kind: str, payload: dict[str, Any]) -> tuple[str, str] | None:
    """vLLM's (message, param) for ``payload``'s request validation, None if it validates."""
    model = _Chat if kind == "chat" else _Completion
    try:
        pydantic.TypeAdapter(model).validate_python(payload, from_attributes=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        return None
    entries = [
        {**e, "loc": clean_loc(("body", *e["loc"])), "input": input_summary(e["input"])}
        for e in errors[:10]
    ]
    lines = [f"  {entry}\n" for entry in entries]
    label = "error" if len(errors) == 1 else "errors"
    more = f"  ...and {len(errors) - 10} more {label}\n" if len(errors) > 10 else ""
    message = (f"{len(errors)} validation {label}:\n" + "".join(lines) + more).rstrip()
    return message, clean_loc(("body", *errors[0]["loc"]))


def _twin(kind: str, payload: dict[str, Any]) -> tuple[str, str] | None:
    try:
        parse_generation_request(kind, payload)  # type: ignore[arg-type]
    except VllmApiError as exc:
        assert exc.err_type == "Bad Request", exc.message
        assert exc.param is not None
        return exc.message, exc.param
    return None


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("raw", VALUES)
def test_each_field_is_read_as_vllm_reads_it(kind: str, raw: str) -> None:
    for field in FIELDS[kind]:
        payload = {**BASE_BODY[kind], field: json.loads(raw)}
        assert _twin(kind, payload) == _vllm(kind, payload), (field, raw)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("raw", VALUES)
def test_stream_options_are_read_as_vllm_reads_them(kind: str, raw: str) -> None:
    for field in ("include_usage", "continuous_usage_stats"):
        options = {field: json.loads(raw)}
        payload = {**BASE_BODY[kind], "stream": True, "stream_options": options}
        assert _twin(kind, payload) == _vllm(kind, payload), (field, raw)
        if _vllm(kind, payload) is None:  # continuous usage needs include_usage too
            gen = parse_generation_request(kind, payload)  # type: ignore[arg-type]
            assert not gen.continuous_usage
            both = {"include_usage": True, "continuous_usage_stats": json.loads(raw)}
            gen = parse_generation_request(kind, {**payload, "stream_options": both})  # type: ignore[arg-type]
            assert gen.continuous_usage is bool(lax_bool(both["continuous_usage_stats"]))


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_every_bad_field_is_listed_in_the_models_order(kind: str) -> None:
    payload: dict[str, Any] = {**BASE_BODY[kind], **dict.fromkeys(FIELDS[kind], 5.5)}
    expected = _vllm(kind, payload)
    wrong = len([f for f in FIELDS[kind] if f not in FLOATS])  # 5.5 is a float
    assert expected is not None and expected[0].startswith(f"{wrong} validation")
    assert _twin(kind, payload) == expected
    nulls = {**BASE_BODY[kind], **dict.fromkeys(FIELDS[kind])}  # Optional or not
    assert _twin(kind, nulls) == _vllm(kind, nulls)


@pytest.mark.parametrize(
    "prompt",
    [
        ["5", 1], [1.0, 2.0], [True, 2], ["5"], [" 5 "], [[1.0], [True]], [[]], [],
        ["a", 1], [-1], [[1], "a"], [[1], [-2, "b"]], [1, "x"], [1e19], [{}], [None],
        ["x", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 5, {"a": 1}, ["9" * 5000, 1],
    ],
)  # fmt: skip
def test_a_prompt_is_read_as_pydantics_union_reads_it(prompt: Any) -> None:
    payload = {"prompt": prompt, "max_tokens": "bad"}  # (errors are listed with others)
    assert _twin("completion", payload) == _vllm("completion", payload)
    ok = {"prompt": prompt}
    try:
        value = _Completion.model_validate(ok).prompt
    except pydantic.ValidationError:
        return
    assert value is not None and not isinstance(value, str)
    prompts = parse_generation_request("completion", ok).prompts
    if value and all(isinstance(t, int) for t in value):  # one prompt of token ids
        assert [p.token_ids for p in prompts] == [tuple(value)]
    else:
        assert [p.token_ids if isinstance(v, list) else p.echo_text
                for p, v in zip(prompts, value, strict=True)] == [
            tuple(v) if isinstance(v, list) else v for v in value]  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        *VALUES, '"on"', '"T"', '"0x10"', '"+5"', '" 5.0 "', "5.000000000000001", "9.2e18",
        "9.223372036854776e18", "-9.223372036854776e18", '"-5"', '"05"', '"5.00"', '"+5.0"',
        '"1_000.0"', '"1__0"', '"_1"', '".5e1"', '"inf"', '"  "', '"True"', '"TRUE"', '"t"',
        '"y"', '"1"', '"0"', '"no"', '"f"', '"n"', '"false"',
    ],
)  # fmt: skip
def test_lax_values_as_pydantic_reads_them(raw: str) -> None:
    value = json.loads(raw)

    def ref(kind: type) -> object:
        try:
            return pydantic.TypeAdapter(kind).validate_python(value)
        except pydantic.ValidationError:
            return None

    try:
        as_int = lax_int(value)
    except ValueError:  # more digits than int() converts: pydantic refuses it too
        as_int = None
    assert as_int == ref(int)
    assert lax_bool(value) == ref(bool)


class _Load(pydantic.BaseModel):  # vLLM 0.32's LoadLoRAAdapterRequest
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class _Unload(pydantic.BaseModel):  # UnloadLoRAAdapterRequest
    lora_name: str
    lora_int_id: int | None = None


ADMIN_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("load", {"lora_name": "a", "lora_path": "/nowhere", "load_inplace": "yes"}),
    ("load", {"lora_name": "a", "lora_path": "/nowhere", "load_inplace": 1,
              "is_3d_lora_weight": "off"}),
    ("load", {"lora_name": "a", "lora_path": "/nowhere", "load_inplace": None}),
    ("load", {"lora_name": "a", "lora_path": "/nowhere", "is_3d_lora_weight": "maybe"}),
    ("load", {"lora_name": 5, "load_inplace": 2}),
    ("load", {"lora_name": None, "lora_path": None, "load_inplace": 0.5,
              "is_3d_lora_weight": None}),
    ("load", {}),
    ("unload", {"lora_name": "a", "lora_int_id": "x"}),
    ("unload", {"lora_name": None, "lora_int_id": 5.5}),
    ("unload", {"lora_int_id": "7"}),
]  # fmt: skip


@pytest.mark.parametrize(("call", "body"), ADMIN_BODIES)
async def test_adapter_admin_bodies_are_read_as_vllm_reads_them(
    start_replica: StartReplica, call: str, body: dict[str, Any]
) -> None:
    model = _Load if call == "load" else _Unload
    try:
        pydantic.TypeAdapter(model).validate_python(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        entries = [
            {**e, "loc": clean_loc(("body", *e["loc"])), "input": input_summary(e["input"])}
            for e in errors
        ]
        label = "error" if len(errors) == 1 else "errors"
        lines = "".join(f"  {entry}\n" for entry in entries)
        want: dict[str, Any] | None = {
            "message": f"{len(errors)} validation {label}:\n{lines}".rstrip(),
            "type": "Bad Request",
            "param": clean_loc(("body", *errors[0]["loc"])),
            "code": 400,
        }
    else:
        want = None
    async with (
        start_replica() as r,
        aiohttp.ClientSession() as http,
        http.post(f"{r.url}/v1/{call}_lora_adapter", json=body) as resp,
    ):
        answer = await resp.json(content_type=None)
    if want is None:  # valid: refused further on (no such adapter), not by validation
        assert resp.status == 404 and answer["error"]["type"] == "NotFoundError", answer
    else:
        assert (resp.status, answer) == (400, {"error": want})
