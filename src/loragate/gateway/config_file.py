"""Read a gateway config file: YAML -> ``loragate.core.config.config_from_mapping``.

(``core`` may not import ``yaml``, so the file is read here; all validation is in core.) The
``routing:`` section is also built once with ``loragate.routing.build_policy`` so an unknown
policy fails at load time, naming the key.

Problems in the file itself are one line too: a YAML syntax error names ``file:line:column``,
a file that is not UTF-8 says so, and a key written twice in one mapping (which YAML would
otherwise settle silently, the last one winning) is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.core.errors import ConfigError
from loragate.routing import build_policy


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key written twice in the same mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise _DuplicateKeyError(
                    problem=f"duplicate key {key!r} (it is written twice in this mapping)",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    """One line: ``source:line:column: problem`` (PyYAML's own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        context = exc.context
        start = exc.context_mark
        if context and start is not None and start is not mark:
            context += f" (from line {start.line + 1}, column {start.column + 1})"
        what = "; ".join(p for p in (context, exc.problem) if p)
        if isinstance(exc, _DuplicateKeyError):
            return ConfigError(f"{where}: {what}")
        return ConfigError(f"{where}: not valid YAML: {what}")
    return ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}")


def parse_config_text(text: str, *, source: str = "<config>") -> GatewayConfig:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from exc
    config = config_from_mapping(data)
    build_policy(config.routing.build_spec(), seed=config.routing.seed)  # validate now
    return config


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate ``path``; any problem is one ``ConfigError`` naming the key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start]:#04x})"
        ) from exc
    return parse_config_text(text, source=str(p))
