"""``twin.vllm_errors.bad_request``: vLLM 0.32's answer to a ``VLLMValidationError`` (the
simulated replica's and, through ``gateway.vllm_validation``, the gateway's)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loragate.twin.adapters import AdapterRegistry
from loragate.twin.vllm_errors import VllmApiError, bad_request, model_not_found


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        # VLLMValidationError.__str__: each of parameter and value that is not None.
        ("max_tokens", 0, "m. (parameter=max_tokens, value=0)"),
        ("prompt", None, "m. (parameter=prompt)"),
        (None, 5, "m. (value=5)"),
        (None, None, "m."),
        ("stop", [1, 2], "m. (parameter=stop, value=[1, 2])"),
    ],
)
def test_parameter_and_value_are_appended_as_vllm_does(
    param: str | None, value: Any, message: str
) -> None:
    err = bad_request("m.", param=param, value=value)
    assert (err.status, err.err_type, err.param, err.message) == (
        400,
        "BadRequestError",
        param,
        message,
    )
    assert json.loads(err.body()) == {
        "error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}
    }


def test_the_message_is_sanitised_as_every_vllm_error_message() -> None:
    err = bad_request("cannot read /tmp/loras/a/adapter_config.json: <obj at 0xdeadbeef>")
    assert err.message == "cannot read <path>: <obj>"


def test_every_error_message_is_sanitised() -> None:
    # vLLM's create_error_response sanitises whatever it answers: a model name too.
    err = model_not_found("/home/me/models/x", "tiny-llama")
    assert err.message == "The model `<path>` does not exist. Valid aliases: tiny-llama."
    assert VllmApiError(404, "gone at 0x7f00ab>", "NotFoundError").message == "gone>"


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/nowhere", "/nowhere"),  # neither a system path nor a file: shown as it is
        ("relative/dir", "relative/dir"),
        ("/tmp/loras/a", "<path>"),  # as recorded (transcript_basic.md)
        ("/data/a/adapter.safetensors", "<path>"),
    ],
)
def test_a_missing_adapter_folder_is_named_as_vllm_names_it(path: str, shown: str) -> None:
    registry = AdapterRegistry(
        base_model_name="base", model="/m", enable_lora=True, max_lora_rank=16
    )
    with pytest.raises(VllmApiError) as exc:
        registry.load("a", path)
    assert (exc.value.status, exc.value.message) == (
        404,
        f"Loading lora a failed: No adapter found for {shown}",
    )
