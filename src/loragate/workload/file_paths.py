"""Where a workload spec's files (ServeGen traces, empirical length files) are looked for.

An absolute path is used as it is. A relative one is looked for, first match wins:

1. under the traces directory, if one is given (``--traces-dir`` of ``loragate loadtest``,
   ``simulate`` and ``demo``, else the ``LORAGATE_TRACES_DIR`` environment variable), by the
   path's trailing parts, longest first, its leading ``..`` dropped: ``../../shared/traces/
   servegen-alibaba-2025/x.csv.gz`` is looked for as ``D/shared/traces/servegen-alibaba-2025/
   x.csv.gz``, ``D/traces/servegen-alibaba-2025/x.csv.gz``, ``D/servegen-alibaba-2025/x.csv.gz``
   and ``D/x.csv.gz``. So a spec written for a checkout beside the shared traces runs
   unchanged from anywhere, whichever level of the traces' copy ``D`` names. Given, it is
   asked first: a directory named on purpose wins over a copy the spec happens to reach;
2. against the spec file's directory;
3. against the current directory.

A file found nowhere is one error listing every place tried (and, without a traces directory,
how to give one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from loragate.core.errors import ConfigError

TRACES_DIR_ENV = "LORAGATE_TRACES_DIR"
TRACES_DIR_FLAG = "--traces-dir"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRoots:
    """The directories a spec's relative paths resolve against. ``traces_from`` names where
    ``traces_dir`` came from, for errors (the flag, or the environment variable)."""

    spec_dir: Path | None = None
    traces_dir: Path | None = None
    traces_from: str = TRACES_DIR_ENV


def file_roots(
    spec_dir: Path | None,
    traces_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> FileRoots:
    """The roots of a spec in ``spec_dir``: ``traces_dir`` if given (``--traces-dir``: an error
    unless a directory), else ``LORAGATE_TRACES_DIR`` from ``environ`` (default:
    ``os.environ``) if set and not empty (not a directory: said if a file is not found)."""
    if traces_dir is not None:  # named on purpose: a wrong one is an error at once
        d = Path(traces_dir).expanduser()
        if not d.is_dir():
            raise ConfigError(f"{d} is not a directory", key=TRACES_DIR_FLAG)
        return FileRoots(spec_dir=spec_dir, traces_dir=d, traces_from=TRACES_DIR_FLAG)
    env = os.environ if environ is None else environ
    value = env.get(TRACES_DIR_ENV, "")
    if value:
        return FileRoots(spec_dir=spec_dir, traces_dir=Path(value).expanduser())
    return FileRoots(spec_dir=spec_dir)


def trailing_parts(value: PurePath) -> list[PurePath]:
    """``value``'s trailing sub-paths, longest first, its leading ``.``/``..`` dropped."""
    parts = list(value.parts)
    while parts and parts[0] in (".", ".."):
        parts.pop(0)
    return [PurePath(*parts[i:]) for i in range(len(parts))]


def resolve_path(value: str, roots: FileRoots, key: str) -> Path:
    """The file ``value`` names (see the module's docstring), or a ConfigError naming ``key``."""
    p = Path(value).expanduser()
    if p.is_absolute():
        if p.is_file():
            return p
        if p.is_dir():
            raise ConfigError(f"{p} is a directory, not a file", key=key)
        raise ConfigError(f"file not found (tried {p})", key=key)
    under = _under_traces_dir(p, roots)
    for c in under:
        if c.is_file():
            return c
    beside = _beside(p, roots.spec_dir)
    for c in beside:
        if c.is_file():
            return c
    if not under and len(beside) == 1 and beside[0].is_dir():
        raise ConfigError(f"{beside[0]} is a directory, not a file", key=key)
    raise ConfigError(f"file not found ({_tried(p, roots, beside)})", key=key)


def _under_traces_dir(p: Path, roots: FileRoots) -> list[Path]:
    d = roots.traces_dir
    if d is None or not d.is_dir():
        return []
    return [d / tail for tail in trailing_parts(p)]


def _beside(p: Path, spec_dir: Path | None) -> list[Path]:
    """``p`` against the spec's directory, then the current one (each place once: the spec's
    directory may be the current one)."""
    unique: dict[Path, Path] = {}
    for c in [*([spec_dir / p] if spec_dir else []), Path.cwd() / p]:
        unique.setdefault(c.resolve(), c)
    return list(unique.values())


def _tried(p: Path, roots: FileRoots, beside: list[Path]) -> str:
    """Every place looked at, in order, on one line."""
    tried = ", ".join(str(c) for c in beside)
    d = roots.traces_dir
    if d is None:
        return (
            f"tried {tried}; to look in a copy of the traces elsewhere, set {TRACES_DIR_ENV} "
            f"or pass {TRACES_DIR_FLAG}"
        )
    name = f"{roots.traces_from} {d}"
    if not d.is_dir():
        return f"{name} is not a directory; tried {tried}"
    tails = ", ".join(str(t) for t in trailing_parts(p))
    return f"tried under {name}: {tails}; then {tried}"
