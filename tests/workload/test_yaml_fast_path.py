"""A valid YAML file (gateway config, workload spec) is read by libyaml, PyYAML's C parser,
with the strict reader's rules; the pure-Python, line-tracking ``StrictLoader`` reads it only
when a value turns out invalid and its line must be named, or when libyaml's reading is not
plainly fine (an error, an alias, too deep), so every message is the one it always was.
Before, every file was read by ``StrictLoader``: seconds for a 1,200-adapter gateway config
(see bench/config_load.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from loragate.core.errors import ConfigError
from loragate.gateway import load_config
from loragate.workload import yaml_file
from loragate.workload.yaml_file import StrictLoader, load_yaml_text, load_yaml_with_lines


@pytest.fixture
def strict_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each ``StrictLoader`` built, by the first line of what it reads."""
    built: list[str] = []

    class Counted(StrictLoader):
        def __init__(self, stream: str) -> None:
            built.append(stream.split("\n", 1)[0])
            super().__init__(stream)

    monkeypatch.setattr(yaml_file, "StrictLoader", Counted)
    return built


def _config(adapters: int, **extra: Any) -> str:
    return yaml.safe_dump(
        {
            "base_model": "base",
            "replicas": [{"id": "r0", "url": "http://127.0.0.1:9"}],
            "adapters": [
                {"name": f"a{i}", "path": f"/loras/a{i}", "rank": 8, "tenants": [f"t{i}"]}
                for i in range(adapters)
            ],
            "tenants": [{"name": f"t{i}", "api_keys": [f"key-{i}"]} for i in range(adapters)],
            **extra,
        },
        sort_keys=False,
    )


def test_a_valid_config_is_read_without_the_line_tracking_reader(
    tmp_path: Path, strict_reads: list[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(_config(50), encoding="utf-8")
    config = load_config(path)
    assert [a.name for a in config.adapters] == [f"a{i}" for i in range(50)]
    assert strict_reads == []


def test_an_invalid_value_is_still_named_at_its_line_and_column(
    tmp_path: Path, strict_reads: list[str]
) -> None:
    path = tmp_path / "gw.yaml"
    text = _config(3, limits={"request_timeout_s": -1})
    path.write_text(text, encoding="utf-8")
    line = text.splitlines().index("  request_timeout_s: -1") + 1
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (
        f"{path}:{line}:3: limits.request_timeout_s: must be a positive number of seconds, got -1"
    )
    assert strict_reads == ["base_model: base"]  # read again, for the line only


DOCUMENT = """\
plain: on
yes_no: [yes, no, y, n, off]
bools: [true, False, TRUE]
numbers: [1, -2, 0x1f, 1.5, .inf, 1e3]
nothing: ~
when: 2024-01-02
text: "quoted: yes"
nested: {a: [1, {b: 2}], c: null}
merged:
  <<: {x: 1}
  y: 2
"""


def test_the_fast_path_reads_what_the_strict_reader_reads(strict_reads: list[str]) -> None:
    data, lines = load_yaml_with_lines(DOCUMENT, "x.yaml")
    assert strict_reads == []
    assert data == yaml.load(DOCUMENT, Loader=StrictLoader)
    assert data["plain"] == "on" and data["bools"] == [True, False, True]
    assert lines["nested.a[1].b"] == (8, 18)  # worked out on demand
    assert strict_reads == ["plain: on"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a: 1\nb: 2\na: 3\n", "x.yaml:3:1: duplicate key 'a' (it is written twice in this"),
        ("a: 2024-13-01\n", "x.yaml:1:4: cannot read '2024-13-01' as a YAML timestamp: "),
        ("a: [1,\n", "x.yaml:2:1: not valid YAML: while parsing a flow node"),
        ("a: 1\n---\nb: 2\n", "x.yaml:2:1: not valid YAML: expected a single document"),
    ],
    ids=["duplicate", "bad-date", "syntax", "two-documents"],
)
def test_a_refused_document_says_what_the_strict_reader_says(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as fast:
        load_yaml_with_lines(text, "x.yaml")
    with pytest.raises(ConfigError) as strict:
        load_yaml_text(text, "x.yaml")
    assert str(fast.value) == str(strict.value)
    assert str(fast.value).startswith(says)


def test_an_alias_is_read_by_the_strict_reader(strict_reads: list[str]) -> None:
    data, _ = load_yaml_with_lines("a: &x [1, 2]\nb: *x\n", "x.yaml")
    assert data == {"a": [1, 2], "b": [1, 2]}
    assert strict_reads == ["a: &x [1, 2]"]
