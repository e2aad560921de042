"""The catalog tells an unknown model (worth asking the shared store about: another instance
may have registered it a moment ago) from one the tenant may not use; clients get one 404."""

from __future__ import annotations

import pytest

from loragate.core.errors import NotFoundError
from loragate.core.types import AdapterSpec
from loragate.gateway.catalog import Catalog, UnknownModelError
from loragate.gateway.errors import classify


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
    # What the client sees does not tell them apart.
    assert (
        classify(unknown.value)
        == classify(hidden.value)
        == (404, "invalid_request_error", "model_not_found")
    )
    assert unknown.value.message == "The model `nope` does not exist."
    assert hidden.value.message == "The model `mine` does not exist."
    assert unknown.value.param == hidden.value.param == "model"
