"""A misspelt key, parameter or plugin name in a routing section says which one was meant, as
the gateway config's other sections do since 68cccb6 (``core.config.unknown_key``); with no
close one, the error lists what is taken, as before. Before, routing listed everything, and
``routing: {polcy: NAME}`` said only "needs 'policy: NAME'". The key path stays the error's
key, so a config file's error names its line (and ``loragate simulate --policy FILE`` and
``loragate demo --policy FILE`` say the same)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.cli import main
from loragate.core.errors import ConfigError
from loragate.gateway import load_config
from loragate.routing import build_policy, default_registry

REG = default_registry()
POLICIES = ", ".join(sorted(REG.profiles))
SCORERS = ", ".join(sorted(REG.scorers))
FILTERS = ", ".join(sorted(REG.filters))
PICKERS = ", ".join(sorted(REG.pickers))

HINTED: list[tuple[object, str]] = [
    ("loragte",
     f"routing: unknown policy 'loragte' (is it a misspelling of 'loragate'?; known: {POLICIES})"),
    ({"policy": "lest_loaded"},
     "routing.policy: unknown policy 'lest_loaded' (is it a misspelling of 'least_loaded'?; "
     f"known: {POLICIES})"),
    ({"polcy": "round_robin"},
     "routing.polcy: unknown key (is 'polcy' a misspelling of 'policy'?)"),
    ({"load_factor": 1.25, "polciy": "consistent_hash"},
     "routing.polciy: unknown key (is 'polciy' a misspelling of 'policy'?)"),
    ({"policy": "least_loaded", "tiebreak": "first"},
     "routing.tiebreak: unknown parameter (is 'tiebreak' a misspelling of 'tie_break'?)"),
    ({"policy": "consistent_hash", "params": {"load_factr": 1.25}},
     "routing.params.load_factr: unknown parameter (is 'load_factr' a misspelling of "
     "'load_factor'?)"),
    ({"scorers": ["load"], "pickr": "random"},
     "routing.pickr: unknown key (is 'pickr' a misspelling of 'picker'?)"),
    ({"scorers": [{"name": "load", "wieght": 1}]},
     "routing.scorers[0].wieght: unknown key (is 'wieght' a misspelling of 'weight'?)"),
    ({"scorers": ["lod"]},
     "routing.scorers[0]: unknown scorer 'lod' (is it a misspelling of 'load'?; known: "
     f"{SCORERS})"),
    ({"filters": [{"name": "registerd"}]},
     "routing.filters[0].name: unknown filter 'registerd' (is it a misspelling of 'registered'?; "
     f"known: {FILTERS})"),
    ({"filters": [{"name": "max_load", "params": {"max_lod": 3}}]},
     "routing.filters[0].params.max_lod: unknown parameter (is 'max_lod' a misspelling of "
     "'max_load'?)"),
    ({"picker": "max_scor"},
     "routing.picker: unknown picker 'max_scor' (is it a misspelling of 'max_score'?; known: "
     f"{PICKERS})"),
    ({"picker": {"name": "max_score", "parms": {}}},
     "routing.picker.parms: unknown key (is 'parms' a misspelling of 'params'?)"),
]  # fmt: skip

# Nothing close: what is taken, as before.
LISTED: list[tuple[object, str]] = [
    ("fastest", f"routing: unknown policy 'fastest' (known: {POLICIES})"),
    ({"weights": 1},
     f"routing: needs 'policy: NAME' (one of {POLICIES}) or a composition of "
     "filters/scorers/picker"),
    ({"policy": "round_robin", "x": 1}, "routing.x: unknown parameter (this plugin takes: none)"),
    ({"scorers": ["load"], "extra": 1},
     "routing.extra: unknown key (a composition takes: name, filters, scorers, picker)"),
    ({"scorers": [{"name": "load", "w": 1}]},
     "routing.scorers[0].w: unknown key (allowed: name, weight, params)"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), HINTED + LISTED)
def test_a_misspelling_names_what_was_meant(spec: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_policy(spec)
    assert str(exc.value) == message
    assert exc.value.key == message.split(":", 1)[0]


def test_the_hint_comes_with_the_line_of_the_key_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "base_model: m\nreplicas: [http://127.0.0.1:18101]\nrouting:\n  polcy: round_robin\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (
        f"{path}:4:3: routing.polcy: unknown key (is 'polcy' a misspelling of 'policy'?)"
    )
    path.write_text(
        "base_model: m\nreplicas: [http://127.0.0.1:18101]\nrouting:\n  scorers:\n"
        "    - {name: load}\n    - {name: queu, weight: 2}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (
        f"{path}:6:8: routing.scorers[1].name: unknown scorer 'queu' (is it a misspelling of "
        f"'queue'?; known: {SCORERS})"
    )


SPEC = """
name: tiny
seed: 5
duration_s: 2
adapters: {count: 2}
arrivals: {process: poisson, rate_rps: 2}
lengths: {prompt: 16, output: 4}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routing:\n  polcy: round_robin\n",
         "2:3: routing.polcy: unknown key (is 'polcy' a misspelling of 'policy'?)"),
        ("policy: loragte\n", "1:1: routing.policy: unknown policy 'loragte' (is it a "
         f"misspelling of 'loragate'?; known: {POLICIES})"),
        ("routing:\n  scorers: [{name: load, wieght: 1}]\n",
         "2:26: routing.scorers[0].wieght: unknown key (is 'wieght' a misspelling of 'weight'?)"),
    ],
)  # fmt: skip
def test_simulate_and_demo_say_the_same_of_a_policy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    spec = tmp_path / "w.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    argv = ["simulate", "--workload", str(spec), "--replicas", "1", "--policy", str(policy)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"loragate simulate: error: {policy}:{message}\n"
    argv = ["demo", "--duration", "1", "--replicas", "1", "--no-progress", "--policy", str(policy)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"loragate demo: {policy}:{message}\n"


def test_a_weight_too_large_for_a_float_is_a_config_error_naming_the_key() -> None:
    """10**400 made float() raise OverflowError out of the validator (a reload counted it as an
    error instead of a rejected file)."""
    with pytest.raises(ConfigError) as err:
        build_policy({"scorers": [{"name": "kv_cache", "weight": 10**400}], "picker": "max_score"})
    assert err.value.key == "routing.scorers[0].weight"
    assert "too large" in str(err.value)
