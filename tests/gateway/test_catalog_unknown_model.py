"""The catalog tells an unknown model (worth asking the shared store about: another instance
may have registered it a moment ago) from one the tenant may not use; clients get one 404."""

from __future__ import annotations

import json

import pytest

from loragate.core.errors import NotFoundError
from loragate.core.types import AdapterSpec
from loragate.gateway.catalog import Catalog, UnknownModelError
from loragate.gateway.errors import classify, error_response


def test_unknown_and_not_allowed_models_are_one_404_told_apart_inside() -> None:
    catalog = Catalog(
        base_model="base",
        adapters=[AdapterSpec(name="mine", path="/m", tenants=frozenset({"a"}))],
        api_keys={"ka": "a", "kb": "b"},
    )
    with pytest.raises(UnknownModelError) as unknown:
        catalog.resolve("nope", "a")
    assert unknown.value.model == "nope"
    with pytest.raises(NotFoundError) as hidden:
        catalog.resolve("mine", "b")
    assert not isinstance(hidden.value, UnknownModelError)
    # What the client sees does not tell them apart: vLLM 0.32's 404, word for word.
    assert classify(unknown.value)[0] == classify(hidden.value)[0] == 404
    for exc, name in ((unknown.value, "nope"), (hidden.value, "mine")):
        answer = error_response(exc)
        assert answer.status == 404
        assert answer.body is not None
        assert json.loads(bytes(answer.body)) == {
            "error": {
                "message": f"The model `{name}` does not exist. Valid aliases: base.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
    assert unknown.value.param == hidden.value.param == "model"
