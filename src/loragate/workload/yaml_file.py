"""Reading a YAML spec file strictly, with every problem as one line.

- A key written twice in one mapping is an error (plain YAML keeps the last one silently).
- Only ``true`` / ``false`` are booleans (YAML 1.2). YAML 1.1, which PyYAML follows, also reads
  ``on``, ``off``, ``yes``, ``no``, ``y`` and ``n`` as booleans, so ``start: on`` would not be
  the string a spec means.
- A syntax error is ``FILE:LINE:COLUMN: not valid YAML: problem``, not PyYAML's several lines.
- A document nested more than ``MAX_DEPTH`` levels deep (through aliases too) is refused at the
  line where it gets too deep, before anything recurses that deep (PyYAML's composer recurses
  per level: ``[[[[...`` a few hundred deep was a ``RecursionError`` and a traceback thousands of
  lines long), and a scalar PyYAML cannot build (``2024-13-01``, an integer of 5,000 digits)
  is refused at its line rather than escaping as a ``ValueError``.
- A file that cannot be read, or is not UTF-8, is one line naming it (``read_text_file``).
- ``load_yaml_with_lines`` also says where each key is written (``KeyLines``), so a value that
  parses but is invalid can be reported at its line too: :func:`naming_file` puts the file, and
  the line and column of the error's key, in front of a ``ConfigError`` raised while reading
  the parsed document (``w.yaml:7:3: arrivals.cv: expected a number, got 'high'``). Workload
  specs and gateway config files are both read this way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

import yaml

from loragate.core.errors import ConfigError

_BOOL_TAG = "tag:yaml.org,2002:bool"

# Deepest nesting read (the document's own level is 1). loragate's files need a handful of
# levels; this bounds the recursion of PyYAML's composer and of everything that walks the
# parsed document, far below Python's recursion limit.
MAX_DEPTH = 100


class _RefusedError(yaml.MarkedYAMLError):
    """Valid YAML that the strict reader refuses (a key written twice, too deep, a scalar that
    cannot be built): said without "not valid YAML"."""


class _StrictConstruction(yaml.constructor.SafeConstructor):
    """Building a document strictly: a key written twice, or a scalar that cannot be built, is
    refused at its line (shared by :class:`StrictLoader` and the libyaml fast path)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # int() of too many digits, a bad date
            text = str(node.value)
            shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
            kind = node.tag.rsplit(":", 1)[-1]
            raise _RefusedError(
                problem=f"cannot read {shown} as a YAML {kind}: {str(exc).split(';')[0]}",
                problem_mark=node.start_mark,
            ) from exc

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
                raise _RefusedError(
                    problem=f"duplicate key {key!r} (it is written twice in this mapping)",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


class StrictLoader(_StrictConstruction, yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans that rejects duplicate keys, nesting deeper
    than ``MAX_DEPTH`` and scalars it cannot build, each at its line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        # Levels of each composed collection, itself included (scalars: 1), so an alias is
        # measured by what it brings in.
        self._levels: dict[yaml.Node, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None and self._depth + self._levels.get(target, 1) > MAX_DEPTH:
                raise _RefusedError(
                    problem=f"alias *{event.anchor} nests the document more than {MAX_DEPTH} "
                    "levels deep (a loragate file needs a few)",
                    problem_mark=event.start_mark,
                )
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _RefusedError(
                problem=f"nested more than {MAX_DEPTH} levels deep (a loragate file needs a few)",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            return node
        self._levels[node] = 1 + max((self._levels.get(c, 1) for c in children), default=0)
        return node


_FAST_LOADERS: tuple[type[Any], ...] = ()  # empty: PyYAML without libyaml

if yaml.__with_libyaml__:

    class _FastLoader(_StrictConstruction, yaml.CSafeLoader):
        """libyaml's parser with the strict construction: the fast path of
        :func:`load_yaml_with_lines` (nesting and aliases are checked on the composed tree)."""

    _FAST_LOADERS = (_FastLoader,)

_loader: Any
for _loader in (StrictLoader, *_FAST_LOADERS):
    _loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _loader.add_implicit_resolver(
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
        if isinstance(exc, _RefusedError):
            return ConfigError(f"{where}: {what}")
        return ConfigError(f"{where}: not valid YAML: {what}")
    return ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}")


def load_yaml_text(text: str, source: str) -> Any:
    """Parse ``text`` (from ``source``, named in errors) with :class:`StrictLoader`."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from exc


# Where each key of a parsed document is written: dotted key ("arrivals.cv", "adapters.items[0]",
# "" for the document itself) -> (line, column), both 1-based.
KeyLines: TypeAlias = Mapping[str, tuple[int, int]]

NO_LINES: KeyLines = MappingProxyType({})


def load_yaml_with_lines(text: str, source: str) -> tuple[Any, KeyLines]:
    """:func:`load_yaml_text`, and where each key is written (see :func:`locate`).

    Fast path: a document libyaml (PyYAML's C parser) reads under the same rules (no key
    written twice, YAML 1.2 booleans, every scalar buildable), no deeper than ``MAX_DEPTH``
    and without aliases, is read by it, and where its keys are written is worked out only if
    asked (:class:`_LinesOnDemand`: a value found invalid), by the pure-Python
    :class:`StrictLoader`. Anything else (an error, an alias, too deep) is read by
    :class:`StrictLoader` from the start, so every error says what it always said. A
    1,200-adapter gateway config took seconds in the pure-Python reader, tenths in libyaml.
    """
    for loader_class in _FAST_LOADERS:
        fast = loader_class(text)
        try:
            node = fast.get_single_node()
            if node is None or not _plain_tree(node):
                break
            data = fast.construct_document(node)
        except yaml.YAMLError:
            break
        finally:
            fast.dispose()
        return data, _LinesOnDemand(text, source)
    return _load_with_lines(text, source)


def _plain_tree(root: yaml.Node) -> bool:
    """Whether ``root`` is a tree (no node reached twice: no alias) at most ``MAX_DEPTH``
    levels deep. Iterative; libyaml bounds the depth it composes (1,000 levels) itself."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen or depth > MAX_DEPTH:
            return False
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
    return True


class _LinesOnDemand(Mapping[str, tuple[int, int]]):
    """The :data:`KeyLines` of ``text``, read (by :class:`StrictLoader`) on first use."""

    def __init__(self, text: str, source: str) -> None:
        self._text, self._source = text, source
        self._lines: KeyLines | None = None

    def _read(self) -> KeyLines:
        if self._lines is None:
            self._lines = _load_with_lines(self._text, self._source)[1]
            self._text = ""
        return self._lines

    def __getitem__(self, key: str) -> tuple[int, int]:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


def _load_with_lines(text: str, source: str) -> tuple[Any, KeyLines]:
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from exc
    finally:
        loader.dispose()
    return data, (_key_lines(node) if node is not None else NO_LINES)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _key_lines(root: yaml.Node) -> KeyLines:
    """Walk the composed document once (an aliased collection under its first key only, so
    aliases cannot make the walk long); merge keys are already folded in by the constructor."""
    out: dict[str, tuple[int, int]] = {"": _mark(root)}
    stack: list[tuple[str, yaml.Node]] = [("", root)]
    seen: set[int] = set()
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    sub = f"{path}.{key_node.value}" if path else str(key_node.value)
                    out[sub] = _mark(key_node)
                    stack.append((sub, value_node))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = f"{path}[{i}]"
                out[sub] = _mark(item)
                stack.append((sub, item))
    return MappingProxyType(out)


def locate(lines: KeyLines, key: str | None) -> tuple[int, int] | None:
    """Where ``key`` is written, else where the nearest enclosing key is (the mapping that
    lacks a required key), else the document's start; None if nothing is known."""
    path = key or ""
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        cut = path.rfind("[") if path.endswith("]") else path.rfind(".")
        path = path[: max(cut, 0)]


class SpecFileError(ConfigError):
    """A :class:`ConfigError` found in a file (a workload spec, a gateway config):
    ``FILE:LINE:COLUMN: key: what is wrong`` (``FILE: what is wrong`` when nothing in the file
    can be pointed at, e.g. it is empty)."""

    def __init__(
        self, source: str, error: ConfigError, where: tuple[int, int] | None = None
    ) -> None:
        at = f"{source}:{where[0]}:{where[1]}" if where is not None else source
        super().__init__(f"{at}: {error}")
        self.key = error.key
        self.param = error.key
        self.source = source
        self.line = where[0] if where is not None else None


@contextmanager
def naming_file(
    source: str, lines: KeyLines = NO_LINES, *, outside: tuple[type[ConfigError], ...] = ()
) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` raised inside as a :class:`SpecFileError` of ``source``,
    at the line in ``lines`` of its key (or of the nearest enclosing key that is written).
    Errors of the ``outside`` classes are not about the file (e.g. an environment variable
    read with it) and pass as they are."""
    try:
        yield
    except ConfigError as exc:
        if isinstance(exc, (SpecFileError, *outside)):
            raise
        raise SpecFileError(source, exc, locate(lines, exc.key)) from exc


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
