"""Spec errors point into the file: ``FILE:LINE:COLUMN: key: what is wrong`` for every kind of
problem (README: "one line naming the file, the line and the key"), and a misspelt key is
reported before the required key it was meant to be."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.core.errors import ConfigError
from loragate.workload import SpecFileError, Workload, load_spec

# Line numbers below are of this text (1-based).
SPEC = """\
# a comment first: the document starts on line 2
seed: 1
duration_s: 60
adapters:
  count: 4
  ranks: {8: 0.5, 16: 0.5}
arrivals:
  process: gamma
  cv: 2
  rate_rps: 2
lengths:
  prompt: {kind: lognormal, mean: 100, sigma: 0.5}
  output: 16
"""


def _error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        Workload(load_spec(path))
    return exc.value


def _message(tmp_path: Path, text: str) -> str:
    err = _error(tmp_path, text)
    prefix = f"{tmp_path / 'w.yaml'}:"
    assert str(err).startswith(prefix)
    assert "\n" not in str(err)
    return str(err)[len(prefix) :]


def test_the_spec_itself_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(SPEC)
    assert Workload(load_spec(path)).spec.arrivals.cv == 2


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # wrong type: the line of the key (was "w.yaml: arrivals.cv: ...", no line)
        ("cv: 2", "cv: high", "9:3: arrivals.cv: expected a number, got 'high'"),
        ("seed: 1", "seed: true", "2:1: seed: expected an integer, got bool"),
        ("count: 4", "count: [4]", "5:3: adapters.count: expected an integer, got [4]"),
        ("output: 16", "output: [16]", "13:3: lengths.output: expected a number or a mapping"),
        # out of range, inside a flow mapping: the key's own column
        ("16: 0.5}", "16: -1}", "6:19: adapters.ranks.16: weights must be >= 0, got -1"),
        ("sigma: 0.5", "sigma: -1", "12:40: lengths.prompt.sigma: must be >= 0, got -1"),
        # missing: the line of the mapping that lacks it
        ("  cv: 2\n", "", "7:1: arrivals.cv: is required"),
        ("duration_s: 60\n", "", "2:1: duration_s: is required"),
        (", sigma: 0.5", "", "12:3: lengths.prompt.sigma: is required"),
        ("cv: 2", "cv:", "9:3: arrivals.cv: is required"),  # written, but null
        # unknown, and known but not used with the other settings
        ("cv: 2", "cv: 2\n  burst: 3", "10:3: arrivals.burst: unknown key (known here: "),
        (
            "output: 16",
            "output: {kind: fixed, value: 16, mean: 3}",
            "13:36: lengths.output.mean: not used with the other settings here (used: kind, value)",
        ),
        # a value the spec needs a whole mapping for
        (
            "adapters:\n  count: 4\n  ranks: {8: 0.5, 16: 0.5}\n",
            "adapters: 5\n",
            "4:1: adapters: expected a mapping, got int",
        ),
    ],
)
def test_every_kind_of_error_names_file_line_and_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in SPEC
    assert _message(tmp_path, SPEC.replace(old, new, 1)).startswith(expected)


def test_yaml_and_duplicate_key_errors_keep_their_line(tmp_path: Path) -> None:
    dup = _message(tmp_path, SPEC + "seed: 2\n")
    assert dup.startswith("14:1: duplicate key 'seed'")
    syntax = _message(tmp_path, SPEC.replace("{8: 0.5, 16: 0.5}", "{8: 0.5, 16: 0.5"))
    assert syntax.startswith("7:") and "not valid YAML" in syntax


def test_list_items_are_pointed_at(tmp_path: Path) -> None:
    items = "items:\n    - {name: a, rank: 8}\n    - name: b\n      rank: x"
    text = SPEC.replace("count: 4\n  ranks: {8: 0.5, 16: 0.5}", items)
    assert _message(tmp_path, text).startswith(
        "8:7: adapters.items[1].rank: expected an integer, got 'x'"
    )
    missing = SPEC.replace("count: 4\n  ranks: {8: 0.5, 16: 0.5}", "items: [{name: a}]")
    assert _message(tmp_path, missing).startswith("5:11: adapters.items[0].rank: is required")
    weights = SPEC.replace("ranks: {8: 0.5, 16: 0.5}", "popularity: {kind: explicit, "
                           "weights: [1, 2,\n      x, 4]}")  # fmt: skip
    assert _message(tmp_path, weights).startswith(
        "7:7: adapters.popularity.weights[2]: expected a number, got 'x'"
    )


def test_errors_found_when_building_the_workload_have_the_line(tmp_path: Path) -> None:
    # Known only once the rate is multiplied out, after parsing: the spec keeps the lines.
    too_many = _message(tmp_path, SPEC.replace("rate_rps: 2", "rate_rps: 1e9"))
    assert too_many.startswith("7:1: arrivals: about 6e+10 requests")


def test_merged_keys_are_reported_where_they_are_written(tmp_path: Path) -> None:
    from loragate.workload.yaml_file import load_yaml_with_lines, locate

    text = "defaults: &d {count: 4, ranks: 0}\n" + SPEC.replace(
        "  count: 4\n  ranks: {8: 0.5, 16: 0.5}", "  <<: *d"
    )
    data, lines = load_yaml_with_lines(text, "w.yaml")
    assert data["adapters"] == {"count": 4, "ranks": 0}
    assert locate(lines, "adapters.ranks") == (1, 25)
    assert locate(lines, "adapters.count") == (1, 15)


def test_aliases_are_walked_once(tmp_path: Path) -> None:
    """A document of nested aliases (each level 9 references to the one below) is small to
    parse and construct (shared objects) but has 9**6 paths: the key-line map walks each
    collection once, under its first key."""
    from loragate.workload.yaml_file import load_yaml_with_lines

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 7):
        levels.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    _, lines = load_yaml_with_lines("\n".join(levels) + "\n", "w.yaml")
    assert len(lines) < 200  # the document's 70 keys and items, and paths into a0 only once


def test_locate_falls_back_to_the_enclosing_key() -> None:
    from loragate.workload.yaml_file import load_yaml_with_lines, locate

    _, lines = load_yaml_with_lines("a:\n  b: {c: 1}\n  d: [1, {e: 2}]\n", "w.yaml")
    assert locate(lines, "a.b.c") == (2, 7)
    assert locate(lines, "a.b.z") == (2, 3)
    assert locate(lines, "a.d[1].e") == (3, 11)
    assert locate(lines, "a.d[1].z") == (3, 10)
    assert locate(lines, "a.d[7]") == (3, 3)
    assert locate(lines, "q") == (1, 1)
    assert locate(lines, None) == (1, 1)
    assert locate({}, "a") is None


# --- a misspelt key is the first thing reported -------------------------------------------


def test_a_misspelt_top_level_key_is_reported_before_missing_ones(tmp_path: Path) -> None:
    """The walk-through: `adaptrs:` got "duration_s: is required", then with duration_s added
    "arrivals: is required"; the misspelling was named only when it was the last problem."""
    text = "seed: 1\nadaptrs:\n  count: 4\n"
    expected = "2:1: adaptrs: unknown key (is 'adaptrs' a misspelling of 'adapters'?)"
    assert _message(tmp_path, text) == expected
    assert _message(tmp_path, "duration_s: 60\n" + text) == expected.replace("2:1", "3:1", 1)
    full = SPEC.replace("adapters:", "adaptrs:")
    assert _message(tmp_path, full) == expected.replace("2:1", "4:1", 1)


def test_a_misspelt_nested_key_is_reported_before_the_missing_one(tmp_path: Path) -> None:
    text = SPEC.replace("cv: 2", "cvv: 2")
    assert _message(tmp_path, text) == (
        "9:3: arrivals.cvv: unknown key (is 'cvv' a misspelling of 'cv'?)"
    )
    text = SPEC.replace("sigma: 0.5", "sigmma: 0.5")
    assert _message(tmp_path, text) == (
        "12:40: lengths.prompt.sigmma: unknown key (is 'sigmma' a misspelling of 'sigma'?)"
    )


def test_a_missing_key_is_not_called_a_misspelling_of_a_known_one(tmp_path: Path) -> None:
    # off_s is a key of its own, not on_s misspelt (was: "(is 'off_s' a misspelling of it?)")
    text = SPEC.replace("rate_rps: 2", "onoff: {off_s: 5, on_rate_rps: 4}")
    assert _message(tmp_path, text) == "10:3: arrivals.onoff.on_s: is required"


def test_an_unknown_key_without_a_near_one_lists_the_known_keys(tmp_path: Path) -> None:
    assert _message(tmp_path, SPEC + "zzz: 1\n") == (
        "14:1: zzz: unknown key (known here: adapters, arrivals, description, duration_s, "
        "lengths, name, seed)"
    )


def test_specs_built_in_code_keep_plain_key_errors() -> None:
    from loragate.workload import spec_from_mapping

    with pytest.raises(ConfigError) as exc:
        spec_from_mapping({"adaptrs": {"count": 1}, "arrivals": {"rate_rps": 1}})
    assert str(exc.value) == "adaptrs: unknown key (is 'adaptrs' a misspelling of 'adapters'?)"
    assert not isinstance(exc.value, SpecFileError)
