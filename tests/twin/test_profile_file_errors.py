"""A broken profile file is one line naming the file, the line and column, and the key, as a
workload spec or gateway config is (before: ``unknown top-level key(s) ['stepp']; known: [...]``
with no file, and PyYAML's multi-line message for a syntax error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.cli import main
from loragate.core.errors import ConfigError
from loragate.twin.profile import PROFILES_DIR, load_profile

FAST = (PROFILES_DIR / "fast.yaml").read_text(encoding="utf-8")
WORKLOAD = str(Path(__file__).resolve().parents[2] / "workload" / "demo.yaml")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _line_of(text: str, prefix: str) -> int:
    return next(i for i, x in enumerate(text.splitlines(), 1) if x.startswith(prefix))


@pytest.mark.parametrize(
    ("edit", "at", "says"),
    [
        # a misspelt top-level key, with the nearest known one
        (("step:", "stepp:"), "stepp:", "stepp: unknown key (is 'stepp' a misspelling of 'step'?)"),
        # a field of a section
        (("step:", "step:\n  decode_ms_per_sequence: 1"), "  decode_ms_per_sequence:",
         "step.decode_ms_per_sequence: unknown key (is 'decode_ms_per_sequence' a misspelling "
         "of 'decode_ms_per_seq'?)"),
        # a key written twice: plain YAML would keep the last silently
        (("name: fast", "name: fast\nname: other"), "name: other",
         "duplicate key 'name' (it is written twice in this mapping)"),
    ],
)  # fmt: skip
def test_profile_errors_name_the_file_and_line(
    tmp_path: Path, edit: tuple[str, str], at: str, says: str
) -> None:
    text = FAST.replace(*edit, 1)
    assert text != FAST
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    line = _line_of(text, at)
    column = len(at) - len(at.lstrip()) + 1
    assert str(info.value) == f"{path}:{line}:{column}: {says}"


def test_simulate_prints_the_profile_error_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, FAST.replace("step:", "stepp:", 1))
    argv = ["simulate", "--workload", WORKLOAD, "--replicas", "1", "--profile", str(path)]
    assert main(argv) == 2
    line = _line_of(FAST, "step:")
    assert capsys.readouterr().err == (
        f"loragate simulate: error: {path}:{line}:1: stepp: unknown key "
        "(is 'stepp' a misspelling of 'step'?)\n"
    )


def test_a_profile_that_is_not_yaml_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nstep: [\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}:3:1: not valid YAML: ")
    assert "\n" not in str(info.value)
