"""A routing section is copied (``core.config._freeze`` at load, ``_thaw`` to build the
policy), walked and printed in errors value by value: YAML aliases that repeat an anchor 8
times per level made a file of a few hundred bytes expand to billions of values (409 bytes:
3.5 s to load, x8 per extra level). It is refused once it expands to more than
``MAX_ROUTING_VALUES`` values, counted as they are reached, so before the work is done.

Each case runs under a bound on the Python calls it may make (about 5 times what the refusal
takes), so that the unbounded copy fails the test in a fraction of a second instead of running
for minutes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from loragate.core.config import MAX_ROUTING_VALUES, RoutingConfig, config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import load_config
from loragate.routing import build_policy

CALLS = 250_000  # a refusal takes ~55,000 (the YAML reader's included)
EXPANDS = f"the routing section expands to more than {MAX_ROUTING_VALUES:,} values"


class TooMuchWork(Exception):
    pass


@contextmanager
def at_most_calls(calls: int = CALLS) -> Iterator[None]:
    """Raise ``TooMuchWork`` in the code under test once it has made ``calls`` Python calls."""
    made = 0

    def count(_frame: FrameType, event: str, _arg: object) -> None:
        nonlocal made
        if event == "call":
            made += 1
            if made > calls:
                raise TooMuchWork(f"more than {calls} calls")

    sys.setprofile(count)
    try:
        yield
    finally:
        sys.setprofile(None)


def _bomb(levels: int) -> list[Any]:
    """What PyYAML builds of ``a0: &a0 [0, 0, 0, 0, 0, 0, 0, 0]``, ``a1: &a1 [*a0, *a0,
    ... 8 times]``, and so on: 8 ** levels values, of 8 * levels objects."""
    value: list[Any] = [0] * 8
    for _ in range(levels - 1):
        value = [value] * 8
    return value


def _doc(routing: object) -> dict[str, Any]:
    return {"base_model": "m", "replicas": ["http://127.0.0.1:18101"], "routing": routing}


def test_loading_a_routing_section_of_billions_of_values_is_refused_before_copying() -> None:
    with at_most_calls(), pytest.raises(ConfigError) as exc:
        config_from_mapping(_doc({"policy": "round_robin", "x": _bomb(10)}))
    assert exc.value.key is not None and exc.value.key.startswith("routing.x[0]")
    assert str(exc.value) == (
        f"{exc.value.key}: {EXPANDS} (YAML aliases repeat what their anchor holds; a routing "
        "section needs a few dozen)"
    )


def test_the_cap_counts_every_value_once_per_place_it_appears() -> None:
    # routing, policy, x and the list's items: MAX_ROUTING_VALUES values in all
    fits = {"policy": "round_robin", "x": [0] * (MAX_ROUTING_VALUES - 3)}
    assert config_from_mapping(_doc(fits)).routing.build_spec() == fits
    over = {"policy": "round_robin", "x": [0] * (MAX_ROUTING_VALUES - 2)}
    with pytest.raises(ConfigError) as exc:
        config_from_mapping(_doc(over))
    assert exc.value.key == f"routing.x[{MAX_ROUTING_VALUES - 3}]"
    # the same values, shared: an alias counts every time it is used
    shared = [0] * 100
    aliased = {"policy": "round_robin", "x": [shared] * 99}  # 3 + 99 * 101 = 10,002 values
    with pytest.raises(ConfigError, match=EXPANDS):
        config_from_mapping(_doc(aliased))


def test_a_routing_spec_given_in_code_is_refused_when_built() -> None:
    """``loragate demo`` puts a policy file's mapping in ``RoutingConfig`` as it is, and
    ``loragate simulate`` hands it to ``build_policy``: both bounded too."""
    spec = {"policy": "round_robin", "x": _bomb(10)}
    with at_most_calls(), pytest.raises(ConfigError, match=EXPANDS):
        RoutingConfig(spec=spec).build_spec()
    with at_most_calls(), pytest.raises(ConfigError, match=EXPANDS):
        build_policy(spec)


def test_a_value_the_policy_reads_is_not_printed_whole() -> None:
    """``build_policy`` printed a bad weight in its error whole: of 8 ** 6 values, a message
    of 861 kB (x8 per level); now the value is refused as too big before it is read."""
    spec = {"scorers": [{"name": "load", "weight": _bomb(6)}]}
    with pytest.raises(ConfigError) as exc:
        build_policy(spec)
    assert EXPANDS in str(exc.value) and len(str(exc.value)) < 300


def test_a_config_file_of_aliases_is_refused_at_the_line_of_its_key(tmp_path: Path) -> None:
    """A file of 511 bytes that would expand to 8 ** 9 values (3.5 s at 7 levels, x8 each)."""
    lines = [
        "base_model: m",
        "replicas: [http://127.0.0.1:18101]",
        "routing:",
        "  policy: round_robin",
        "  a0: &a0 [0, 0, 0, 0, 0, 0, 0, 0]",
    ]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]" for i in range(1, 9)]
    path = tmp_path / "gw.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with at_most_calls(), pytest.raises(ConfigError) as exc:
        load_config(path)
    # routing, policy and a0 to a3 hold 5,350 values; a4 (line 9) 37,449
    assert str(exc.value).startswith(f"{path}:9:3: routing.a4[0]")
    assert EXPANDS in str(exc.value)
