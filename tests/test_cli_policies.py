"""`loragate policies` lists what the routing registry holds, as text and as JSON."""

from __future__ import annotations

import json

import pytest

from loragate.cli import main
from loragate.routing import build_policy, default_registry

KINDS = {"policies": "profiles", "filters": "filters", "scorers": "scorers", "pickers": "pickers"}


def test_json_lists_every_registered_name_with_its_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["policies", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    reg = default_registry()
    assert list(listing) == list(KINDS)
    for title, table in KINDS.items():
        assert [e["name"] for e in listing[title]] == list(getattr(reg, table))
        assert all(e["description"] for e in listing[title])
    uses = {e["name"]: e["uses_scores"] for e in listing["pickers"]}
    assert uses == {
        "max_score": True,
        "round_robin": False,
        "random": False,
        "weighted_random": True,
        "power_of_two": True,
    }
    (loragate,) = [e for e in listing["policies"] if e["name"] == "loragate"]
    params = {p["name"]: p for p in loragate["params"]}
    assert params["load_stall_weight"] == {
        "name": "load_stall_weight",
        "type": "number",
        "default": 1.0,
        "min": 0.0,
    }
    assert params["prefill_memory"] == {
        "name": "prefill_memory",
        "type": "boolean",
        "default": True,
    }
    # What it lists builds: each policy with every listed parameter at its listed default.
    for entry in listing["policies"]:
        spec = {"policy": entry["name"], **{p["name"]: p["default"] for p in entry["params"]}}
        assert build_policy(spec).name == entry["name"]


def test_text_names_every_entry_and_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert main(["policies", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    lines = out.splitlines()
    for title in KINDS:
        assert any(line.startswith(f"{title.capitalize()} (") for line in lines)
        for entry in listing[title]:
            assert any(line.startswith(f"  {entry['name']} ") for line in lines), entry["name"]
            for p in entry["params"]:
                assert f" {p['name']} " in out
    assert "  tie_break             one of random, first; default random" in out
    assert "weight * score" in out and "[0, 1]" in out
    assert "round_robin and random ignore them" in out
