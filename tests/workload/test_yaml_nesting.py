"""The strict YAML reader (workload specs and gateway configs) refuses a document nested more
than ``MAX_DEPTH`` levels deep, aliases included, at the line and column where it gets too
deep, and a scalar PyYAML cannot build at its own line. Before, PyYAML's composer recursed
per level (``RecursionError``, a traceback thousands of lines long) and a date such as
``2024-13-01`` escaped as a ``ValueError``."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.core.errors import ConfigError
from loragate.workload import load_spec
from loragate.workload.yaml_file import MAX_DEPTH, load_yaml_text, load_yaml_with_lines


def _nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_max_depth_levels_are_read_and_one_more_is_refused_where_it_starts() -> None:
    data, _ = load_yaml_with_lines(_nested(MAX_DEPTH), "x.yaml")
    for _ in range(MAX_DEPTH - 1):
        (data,) = data
    assert data == []
    with pytest.raises(ConfigError) as exc:
        load_yaml_with_lines(_nested(MAX_DEPTH + 1), "x.yaml")
    assert str(exc.value) == (
        f"x.yaml:1:{MAX_DEPTH + 1}: nested more than {MAX_DEPTH} levels deep "
        "(a loragate file needs a few)"
    )


def test_an_alias_counts_the_levels_it_brings_in() -> None:
    anchor = "a: &a " + _nested(MAX_DEPTH - 2) + "\n"  # levels 2 to 99 (the document is 1)
    assert (
        load_yaml_text(anchor + "b: [*a]\n", "x.yaml")["b"][0]
        == load_yaml_text(anchor, "x.yaml")["a"]
    )
    with pytest.raises(ConfigError) as exc:
        load_yaml_text(anchor + "b: [[*a]]\n", "x.yaml")
    assert str(exc.value).startswith(
        f"x.yaml:2:6: alias *a nests the document more than {MAX_DEPTH}"
    )


def test_a_spec_nested_too_deep_is_one_line_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("seed: 1\nduration_s: " + _nested(5000) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert str(exc.value).startswith(f"{path}:2:{13 + MAX_DEPTH - 1}: nested more than")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "2024-13-01",
            "2:13: cannot read '2024-13-01' as a YAML timestamp: month must be in 1..12",
        ),
        ("7" * 5000, "2:13: cannot read '77777777777777777777'... (5000 characters) as a YAML int"),
    ],
    ids=["date", "int-of-5000-digits"],
)
def test_a_scalar_yaml_cannot_build_is_named_at_its_line(
    tmp_path: Path, value: str, expected: str
) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(f"seed: 1\nduration_s: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    assert str(exc.value).startswith(f"{path}:{expected}")
    assert "\n" not in str(exc.value)
