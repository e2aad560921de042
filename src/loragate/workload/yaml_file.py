"""Reading a YAML spec file strictly, with every problem as one line.

- A key written twice in one mapping is an error (plain YAML keeps the last one silently).
- Only ``true`` / ``false`` are booleans (YAML 1.2). YAML 1.1, which PyYAML follows, also reads
  ``on``, ``off``, ``yes``, ``no``, ``y`` and ``n`` as booleans, so ``start: on`` would not be
  the string a spec means.
- A syntax error is ``FILE:LINE:COLUMN: not valid YAML: problem``, not PyYAML's several lines.
- A file that cannot be read, or is not UTF-8, is one line naming it (``read_text_file``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from loragate.core.errors import ConfigError

_BOOL_TAG = "tag:yaml.org,2002:bool"


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans that rejects duplicate keys."""

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


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    """One line: ``source:line:column: problem``."""
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


def load_yaml_text(text: str, source: str) -> Any:
    """Parse ``text`` (from ``source``, named in errors) with :class:`StrictLoader`."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from exc


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a ``what``: "workload spec", "config file", ...).

    One ``ConfigError`` line if it cannot be read (``cannot read WHAT PATH: reason``) or is not
    UTF-8 (``PATH is not a UTF-8 text file (byte N: 0xNN)``).
    """
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start]:#04x})"
        ) from exc
