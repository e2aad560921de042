"""Imports flow one way (see the architecture): a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "loragate"

# Layer of each package: a module may import loragate packages of a lower or equal layer only.
LAYERS: dict[str, int] = {
    "core": 0,
    "workload": 1,
    "routing": 1,
    "forecasting": 1,
    "state": 1,
    "backends": 1,
    "twin": 2,
    "placement": 3,
    "simulate": 4,
    "gateway": 4,
    "loadtest": 4,
    "commands": 5,
    "cli": 5,
}
# Same-layer packages that must stay independent of each other.
INDEPENDENT = {"workload", "routing", "forecasting", "state", "backends"}
# Third-party modules a package must not import.
FORBIDDEN: dict[str, set[str]] = {
    "core": {"aiohttp", "redis", "statsmodels", "numpy", "yaml"},
    "routing": {"aiohttp", "redis", "statsmodels"},
}
STATSMODELS_ONLY_IN = {"forecasting"}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _violations() -> list[str]:
    problems: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package_of(path)
        if pkg not in LAYERS:
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "loragate":
                parts = name.split(".")
                if len(parts) < 2:
                    continue
                target = parts[1]
                if target not in LAYERS or target == pkg:
                    continue
                if LAYERS[target] > LAYERS[pkg]:
                    problems.append(f"{path.relative_to(SRC)} imports higher layer {name}")
                elif pkg in INDEPENDENT and target in INDEPENDENT:
                    problems.append(f"{path.relative_to(SRC)} imports sibling {name}")
            elif top in FORBIDDEN.get(pkg, set()):
                problems.append(f"{path.relative_to(SRC)} imports forbidden {name}")
            elif top == "statsmodels" and pkg not in STATSMODELS_ONLY_IN:
                problems.append(f"{path.relative_to(SRC)} imports statsmodels outside forecasting")
    return problems


def test_imports_flow_one_way() -> None:
    assert _violations() == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    # The checker must be able to fail: parse a synthetic upward import.
    bad = tmp_path / "bad.py"
    bad.write_text("from loragate.gateway import app\n", encoding="utf-8")
    assert _imports(bad) == ["loragate.gateway"]
    assert LAYERS["gateway"] > LAYERS["core"]
