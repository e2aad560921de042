"""``simulate --policy FILE`` and ``demo --policy FILE`` read the policy file as a gateway
config file is read (``workload.yaml_file``'s strict reader): every problem is one line naming
the file, the line and column and the key, exit status 2.

Before, ``commands.simulate.policy_from_arg`` used ``yaml.safe_load``: a key written twice
was taken silently (the last one won), a ``routing:`` nested 3,000 levels deep was an
uncaught ``RecursionError`` (a traceback thousands of lines long), and the policy's own
errors came with no file or line (``routing.filters[0]: unknown filter ...``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loragate.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEC = str(REPO / "workload" / "demo.yaml")
DEEP = 3000


def _simulate(policy: Path, capsys: pytest.CaptureFixture[str]) -> str:
    args = ["simulate", "--workload", SPEC, "--replicas", "1", "--duration-s", "2"]
    assert main([*args, "--policy", str(policy)]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (  # was taken: round_robin routed
            "routing:\n  policy: least_loaded\n  policy: round_robin\n",
            "3:3: duplicate key 'policy' (it is written twice in this mapping)",
        ),
        (  # was a RecursionError traceback
            "routing:\n  " + "{a: " * DEEP + "1" + "}" * DEEP + "\n",
            "2:396: nested more than 100 levels deep (a loragate file needs a few)",
        ),
        (  # no line before
            "# composed\nrouting:\n  name: mine\n  filters: [registered, no_such_filter]\n",
            "4:25: routing.filters[1]: unknown filter 'no_such_filter' (known: ",
        ),
        (  # a bare routing section: its keys named as under routing:
            "name: mine\nscorers:\n  - {name: kv_cache, wieght: 2}\n",
            "3:22: routing.scorers[0].wieght: unknown key",
        ),
        ("routing:\n  polcy: loragate\n", "2:3: routing.polcy: unknown key (is 'polcy' a"),
        ("routing: [a]\n", "1:1: routing: a policy file holds a policy name or a routing mapping"),
        ("- a\n", "1:1: a policy file holds a policy name or a routing mapping, got list"),
        ("routing: {policy: on}\n", "1:11: routing.policy: unknown policy 'on'"),  # YAML 1.2
        ("routing:\n\tpolicy: x\n", "2:1: not valid YAML: "),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(text, encoding="utf-8")
    err = _simulate(policy, capsys)
    assert err.startswith(f"loragate simulate: error: {policy}:{says}"), err[-2000:]
    assert err.count("\n") == 1


def test_a_good_policy_file_still_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("# mine\nrouting:\n  policy: least_loaded\n", encoding="utf-8")
    args = ["simulate", "--workload", SPEC, "--replicas", "1", "--duration-s", "2", "--json"]
    assert main([*args, "--policy", str(policy)]) == 0
    assert '"policy": "least_loaded"' in capsys.readouterr().out


def test_demo_says_the_same_of_a_deep_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "deep.yaml"
    policy.write_text("routing:\n  " + "[" * DEEP + "]" * DEEP + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "demo", "--duration", "1", "--no-progress",
         "--replicas", "1", "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        f"loragate demo: {policy}:2:102: nested more than 100 levels deep (a loragate file "
        "needs a few)\n"
    )
