"""``bench/compare_policies_sim.py --policies``: built-in names and policy files, all checked
before any run (a misspelt name failed with a traceback after the whole capacity search)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import compare_policies_sim as cps
from loragate.core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policies" / "composed_affinity.yaml"


def test_names_and_files_become_labelled_specs(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("filters: [registered]\nscorers: [load]\n", encoding="utf-8")
    parsed = cps.parse_policies(f"loragate, {EXAMPLE},{bare},")
    assert [label for label, _ in parsed] == ["loragate", str(EXAMPLE), str(bare)]
    assert parsed[0][1] == "loragate"
    assert isinstance(parsed[1][1], dict) and parsed[1][1]["name"] == "affinity-plus-ttft"
    assert parsed[2][1] == {"filters": ["registered"], "scorers": ["load"]}


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("loragate,loragte", "unknown policy 'loragte' (is it a misspelling of 'loragate'?"),
        ("loragate,loragate", "'loragate' is given twice"),
        (",", "names no policy"),
        ("BAD", ":2:25: routing.filters[1]: unknown filter 'nope'"),
        ("MISSING", "cannot read policy file"),
    ],
)
def test_a_bad_policy_is_one_line_before_any_run(
    arg: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  filters: [registered, nope]\n", encoding="utf-8")
    arg = arg.replace("BAD", str(bad)).replace("MISSING", str(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError) as raised:
        cps.parse_policies(arg)
    assert message in str(raised.value)
    # main() stops in argument parsing, before the process pool and the capacity search.
    with pytest.raises(SystemExit) as exc:
        cps.main(["--policies", arg])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: --policies: " in err and message in err
    assert "Traceback" not in err
