"""YAML -> :class:`WorkloadSpec`, validating everything; one :class:`ConfigError` naming the key.

Example (``workload/zipf-200.yaml``)::

    name: zipf-200
    seed: 1
    duration_s: 3600
    adapters:
      count: 200
      ranks: {8: 0.34, 16: 0.33, 32: 0.33}
      popularity: {kind: zipf, s: 1.0}
    arrivals: {process: poisson, rate_rps: 50}
    lengths:
      prompt: {kind: lognormal, mean: 512, sigma: 0.8, min: 16, max: 4096}
      output: {kind: lognormal, mean: 128, sigma: 0.8, min: 1, max: 1024}

Relative file paths (ServeGen traces, empirical length files) resolve under the traces
directory if one is given (``--traces-dir``, ``LORAGATE_TRACES_DIR``), then against the spec
file's directory, then the current directory (:mod:`.file_paths`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal, cast

from loragate.core.errors import ConfigError
from loragate.workload._reader import Node, as_int, as_list, as_number, naming_file, type_name
from loragate.workload.file_paths import FileRoots, file_roots, resolve_path
from loragate.workload.lengths import load_length_values
from loragate.workload.spec import (
    AdaptersSpec,
    ArrivalsSpec,
    DirichletPopularity,
    DiurnalSpec,
    EmpiricalLength,
    ExplicitAdapter,
    ExplicitPopularity,
    FixedLength,
    LengthDist,
    LengthsSpec,
    LognormalLength,
    OnOffSpec,
    Popularity,
    ServeGenSpec,
    UniformLength,
    UniformPopularity,
    WorkloadSpec,
    ZipfPopularity,
)
from loragate.workload.yaml_file import load_yaml_with_lines, read_text_file

MAX_ADAPTERS = 100_000
MAX_DURATION_S = 1e8  # ~3 years of simulated time

# The keys each mapping of a spec may have: any other is reported before anything else in that
# mapping (a misspelt key, not the required key it was meant to be, is what a user has to fix).
ROOT_KEYS = ("name", "description", "duration_s", "seed", "adapters", "arrivals", "lengths")
ADAPTERS_KEYS = (
    "count", "name_pattern", "path_pattern", "ranks", "popularity", "base_fraction", "items"
)  # fmt: skip
ITEM_KEYS = ("name", "rank", "rate_rps")
POPULARITY_KEYS = ("kind", "s", "alpha", "weights")
ARRIVALS_KEYS = ("process", "rate_rps", "cv", "scope", "diurnal", "onoff", "servegen")
DIURNAL_KEYS = ("period_s", "amplitude", "phase_s")
ONOFF_KEYS = ("on_s", "off_s", "on_rate_rps", "off_rate_rps", "durations", "start")
SERVEGEN_KEYS = (
    "file", "select", "client_ids", "offset_s", "time_scale", "rate_scale", "window_s"
)  # fmt: skip
LENGTHS_KEYS = ("prompt", "output", "max_total_tokens")
LENGTH_KEYS = (
    "kind",
    "value",
    "min",
    "max",
    "mean",
    "sigma",
    "file",
    "values",
    "weights",
    "column",
)


def load_spec(
    path: str | Path,
    *,
    traces_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkloadSpec:
    """Read and validate a workload YAML file; every error starts with the file's path.
    Its relative file paths are looked for under ``traces_dir`` (``--traces-dir``; None: the
    ``LORAGATE_TRACES_DIR`` of ``environ``, default ``os.environ``) first, if any."""
    p = Path(path)
    text = read_text_file(p, "workload spec")
    return parse_spec_text(
        text,
        base_dir=p.resolve().parent,
        default_name=p.stem,
        source=str(p),
        traces_dir=traces_dir,
        environ=environ,
    )


def parse_spec_text(
    text: str,
    *,
    base_dir: Path | None = None,
    default_name: str = "workload",
    source: str | None = None,
    traces_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkloadSpec:
    """Parse and validate spec text; ``source`` (the file it came from) starts every error,
    followed by the line and column of the key at fault (``w.yaml:7:3: arrivals.cv: ...``)."""
    data, lines = load_yaml_with_lines(text, source or "workload spec")
    roots = file_roots(base_dir, traces_dir, environ)
    if source is None:
        return _spec(data, roots, default_name)
    with naming_file(source, lines):
        spec = _spec(data, roots, default_name)
    return replace(spec, source=source, key_lines=lines)


def spec_from_mapping(
    data: object,
    *,
    base_dir: Path | None = None,
    default_name: str = "workload",
    traces_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkloadSpec:
    """Validate an already-parsed mapping (e.g. built in code by another package)."""
    return _spec(data, file_roots(base_dir, traces_dir, environ), default_name)


def _spec(data: object, roots: FileRoots, default_name: str) -> WorkloadSpec:
    if data is None:
        raise ConfigError("the spec is empty")
    root = Node(data, "", ROOT_KEYS)
    name = root.get_str("name", default_name)
    description = root.get_str("description", "")
    duration_s = root.get_float("duration_s", gt=0, le=MAX_DURATION_S)
    seed = root.get_int("seed", 0, ge=0)
    arrivals_node = root.node("arrivals", ARRIVALS_KEYS)
    process = arrivals_node.get_str("process", "poisson", choices=("poisson", "gamma", "servegen"))
    adapters = _adapters(root.node("adapters", ADAPTERS_KEYS), servegen=process == "servegen")
    arrivals = _arrivals(arrivals_node, process, adapters, roots)
    lengths = _lengths(root.opt_node("lengths", LENGTHS_KEYS), roots)
    root.finish()
    return WorkloadSpec(
        name=name,
        description=description,
        duration_s=duration_s,
        seed=seed,
        adapters=adapters,
        arrivals=arrivals,
        lengths=lengths,
    )


# --- adapters -----------------------------------------------------------------------------------


def _adapters(node: Node, *, servegen: bool) -> AdaptersSpec:
    name_pattern = node.get_str(
        "name_pattern", "client-{client}" if servegen else "adapter-{i:03d}"
    )
    path_pattern = node.get_str("path_pattern", "adapters/{name}")
    _check_pattern(path_pattern, node.sub("path_pattern"), name="x")
    base_fraction = node.get_float("base_fraction", 0.0, ge=0.0, lt=1.0)
    items: tuple[ExplicitAdapter, ...] = ()
    if node.has("items"):
        items = _items(node)
        count = len(items)
        if node.has("count") and node.get_int("count") != count:
            raise ConfigError(f"must equal the number of items ({count})", key=node.sub("count"))
        for key in ("name_pattern", "ranks"):
            if node.has(key):
                raise ConfigError("not used with adapters.items", key=node.sub(key))
    else:
        count = node.get_int("count", ge=1, le=MAX_ADAPTERS)
    ranks = _rank_mix(node.raw("ranks", 8), node.sub("ranks"))
    popularity: Popularity = UniformPopularity()
    if node.has("popularity"):
        if servegen:
            raise ConfigError("not used with arrivals.process servegen", key=node.sub("popularity"))
        if items and items[0].rate_rps is not None:
            raise ConfigError(
                "not used when adapters.items give rate_rps", key=node.sub("popularity")
            )
        popularity = _popularity(node.raw("popularity"), node.sub("popularity"), count)
    else:
        node.raw("popularity", None)
    if servegen:
        if items:
            raise ConfigError("not used with arrivals.process servegen", key=node.sub("items"))
        if base_fraction > 0:
            raise ConfigError(
                "not supported with arrivals.process servegen", key=node.sub("base_fraction")
            )
    if not items:
        check_names(name_pattern, count, node.sub("name_pattern"), servegen=servegen)
    node.finish()
    return AdaptersSpec(
        count=count,
        name_pattern=name_pattern,
        path_pattern=path_pattern,
        ranks=ranks,
        popularity=popularity,
        base_fraction=base_fraction,
        items=items,
    )


def _items(node: Node) -> tuple[ExplicitAdapter, ...]:
    raw = as_list(node.raw("items"), node.sub("items"))
    if not raw:
        raise ConfigError("must not be empty", key=node.sub("items"))
    out: list[ExplicitAdapter] = []
    for i, entry in enumerate(raw):
        item = Node(entry, f"{node.sub('items')}[{i}]", ITEM_KEYS)
        out.append(
            ExplicitAdapter(
                name=item.get_str("name"),
                rank=item.get_int("rank", ge=1),
                rate_rps=item.opt_float("rate_rps", ge=0.0),
            )
        )
        item.finish()
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"duplicate adapter name {dup!r}", key=node.sub("items"))
    with_rate = sum(a.rate_rps is not None for a in out)
    if with_rate not in (0, len(out)):
        raise ConfigError("give rate_rps for every item or for none", key=node.sub("items"))
    if with_rate and sum(a.rate_rps or 0.0 for a in out) <= 0:
        raise ConfigError("the rates must not all be 0", key=node.sub("items"))
    return tuple(out)


def _rank_mix(value: object, key: str) -> tuple[tuple[int, float], ...]:
    if isinstance(value, Mapping):
        pairs = [(as_int(k, key), as_number(v, f"{key}.{k}")) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        pairs = [(as_int(v, key), 1.0) for v in value]
    else:
        pairs = [(as_int(value, key), 1.0)]
    if not pairs:
        raise ConfigError("must list at least one rank", key=key)
    for rank, weight in pairs:
        if rank < 1:
            raise ConfigError(f"ranks must be >= 1, got {rank}", key=key)
        if weight < 0:
            raise ConfigError(f"weights must be >= 0, got {weight:g}", key=f"{key}.{rank}")
    total = sum(w for _, w in pairs)
    if total <= 0:
        raise ConfigError("weights must not all be 0", key=key)
    return tuple((r, w / total) for r, w in pairs if w > 0)


def _popularity(value: object, key: str, count: int) -> Popularity:
    if isinstance(value, str):
        value = {"kind": value}
    node = Node(value, key, POPULARITY_KEYS)
    kind = node.get_str("kind", choices=("uniform", "zipf", "dirichlet", "explicit"))
    out: Popularity
    if kind == "uniform":
        out = UniformPopularity()
    elif kind == "zipf":
        out = ZipfPopularity(s=node.get_float("s", 1.0, ge=0.0))
    elif kind == "dirichlet":
        out = DirichletPopularity(alpha=node.get_float("alpha", 1.0, gt=0.0))
    else:
        raw = as_list(node.raw("weights"), node.sub("weights"))
        weights = tuple(as_number(w, f"{node.sub('weights')}[{i}]") for i, w in enumerate(raw))
        if len(weights) != count:
            raise ConfigError(
                f"needs one weight per adapter ({count}), got {len(weights)}",
                key=node.sub("weights"),
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("weights must be >= 0 and not all 0", key=node.sub("weights"))
        out = ExplicitPopularity(weights=weights)
    node.finish()
    return out


def _check_pattern(pattern: str, key: str, **fields: object) -> str:
    try:
        return pattern.format(**fields)
    except KeyError as exc:
        known = ", ".join(f"{{{f}}}" for f in fields)
        raise ConfigError(
            f"bad pattern {pattern!r}: no field {{{exc.args[0]}}} (it may use {known})", key=key
        ) from None
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"bad pattern {pattern!r}: {exc}", key=key) from None


def check_names(pattern: str, count: int, key: str, *, servegen: bool) -> None:
    """``pattern`` names ``count`` adapters, each once (a ServeGen replay's: by client id)."""
    if servegen:
        # Client ids are known once the trace is read; they are unique, so {client} suffices.
        _check_pattern(pattern, key, i=0, client=0)
        if "{client" not in pattern and "{i" not in pattern:
            raise ConfigError("must contain {i} or {client}", key=key)
        return
    names = {_check_pattern(pattern, key, i=i) for i in range(count)}
    if len(names) != count:
        raise ConfigError(f"gives duplicate names for {count} adapters", key=key)


# --- arrivals -----------------------------------------------------------------------------------


def _arrivals(node: Node, process: str, adapters: AdaptersSpec, roots: FileRoots) -> ArrivalsSpec:
    explicit_rates = bool(adapters.items) and adapters.items[0].rate_rps is not None
    if process == "servegen":
        for key in ("rate_rps", "cv", "scope", "diurnal", "onoff"):
            if node.has(key):
                raise ConfigError("not used with process servegen", key=node.sub(key))
        servegen = _servegen(node.node("servegen", SERVEGEN_KEYS), roots)
        node.finish()
        return ArrivalsSpec(process="servegen", servegen=servegen)
    if node.has("servegen"):
        raise ConfigError("only used with process servegen", key=node.sub("servegen"))
    cv = 1.0
    scope: Literal["per_adapter", "aggregate"] = "per_adapter"
    if process == "gamma":
        cv = node.get_float("cv", gt=0.0)
        scope = cast(
            Literal["per_adapter", "aggregate"],
            node.get_str("scope", "per_adapter", choices=("per_adapter", "aggregate")),
        )
    else:
        for key in ("cv", "scope"):
            if node.has(key):
                raise ConfigError("only used with process gamma", key=node.sub(key))
    onoff_node = node.opt_node("onoff", ONOFF_KEYS)
    onoff = _onoff(onoff_node) if onoff_node is not None else None
    diurnal_node = node.opt_node("diurnal", DIURNAL_KEYS)
    diurnal = _diurnal(diurnal_node) if diurnal_node is not None else None
    rate_rps: float | None = None
    if onoff is not None or explicit_rates:
        if node.has("rate_rps"):
            why = "arrivals.onoff" if onoff is not None else "adapters.items[].rate_rps"
            raise ConfigError(f"not used: the rate is set by {why}", key=node.sub("rate_rps"))
        if onoff is not None and explicit_rates:
            raise ConfigError(
                "cannot be combined with per-adapter rate_rps in adapters.items",
                key=node.sub("onoff"),
            )
        node.raw("rate_rps", None)
    else:
        rate_rps = node.get_float("rate_rps", gt=0.0)
    node.finish()
    return ArrivalsSpec(
        process=cast(Literal["poisson", "gamma"], process),
        rate_rps=rate_rps,
        cv=cv,
        scope=scope,
        diurnal=diurnal,
        onoff=onoff,
    )


def _diurnal(node: Node) -> DiurnalSpec:
    out = DiurnalSpec(
        period_s=node.get_float("period_s", 86_400.0, ge=1.0),
        amplitude=node.get_float("amplitude", 0.5, ge=0.0, le=1.0),
        phase_s=node.get_float("phase_s", 0.0),
    )
    node.finish()
    return out


def _onoff(node: Node) -> OnOffSpec:
    out = OnOffSpec(
        on_s=node.get_float("on_s", gt=0.0),
        off_s=node.get_float("off_s", gt=0.0),
        on_rate_rps=node.get_float("on_rate_rps", ge=0.0),
        off_rate_rps=node.get_float("off_rate_rps", 0.0, ge=0.0),
        durations=cast(
            Literal["fixed", "exponential"],
            node.get_str("durations", "fixed", choices=("fixed", "exponential")),
        ),
        start=cast(Literal["on", "off"], node.get_str("start", "on", choices=("on", "off"))),
    )
    if out.mean_rate_rps <= 0:
        raise ConfigError("on_rate_rps and off_rate_rps must not both be 0", key=node.key)
    node.finish()
    return out


def _servegen(node: Node, roots: FileRoots) -> ServeGenSpec:
    file = resolve_path(node.get_str("file"), roots, node.sub("file"))
    select = node.get_str("select", "top", choices=("top", "sample", "ids"))
    ids: tuple[int, ...] = ()
    if select == "ids":
        raw = as_list(node.raw("client_ids"), node.sub("client_ids"))
        ids = tuple(as_int(v, f"{node.sub('client_ids')}[{i}]") for i, v in enumerate(raw))
        if len(set(ids)) != len(ids):
            raise ConfigError("duplicate client id", key=node.sub("client_ids"))
    elif node.has("client_ids"):
        raise ConfigError("only used with select: ids", key=node.sub("client_ids"))
    window_s = node.get_float("window_s", 600.0, gt=0.0)
    offset_s = node.get_float("offset_s", 0.0, ge=0.0)
    if not math.isclose(offset_s / window_s, round(offset_s / window_s), abs_tol=1e-9):
        raise ConfigError(
            f"must be a multiple of the window ({window_s:g} s)", key=node.sub("offset_s")
        )
    out = ServeGenSpec(
        file=file,
        select=cast(Literal["top", "sample", "ids"], select),
        client_ids=ids,
        offset_s=offset_s,
        time_scale=node.get_float("time_scale", 1.0, gt=0.0),
        rate_scale=node.get_float("rate_scale", 1.0, gt=0.0),
        window_s=window_s,
    )
    node.finish()
    return out


# --- lengths ------------------------------------------------------------------------------------


def _lengths(node: Node | None, roots: FileRoots) -> LengthsSpec:
    if node is None:
        return LengthsSpec()
    prompt = _length(node.raw("prompt", 256), node.sub("prompt"), roots)
    output = _length(node.raw("output", 128), node.sub("output"), roots)
    max_total: int | None = None
    if node.has("max_total_tokens"):
        max_total = node.get_int("max_total_tokens", ge=2)
    else:
        node.raw("max_total_tokens", None)
    node.finish()
    return LengthsSpec(prompt=prompt, output=output, max_total_tokens=max_total)


def _length(value: object, key: str, roots: FileRoots) -> LengthDist:
    if not isinstance(value, Mapping):
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            n = as_int(value, key)
            if n < 1:
                raise ConfigError(f"must be >= 1, got {n}", key=key)
            return FixedLength(value=n)
        raise ConfigError(f"expected a number or a mapping, got {type_name(value)}", key=key)
    node = Node(value, key, LENGTH_KEYS)
    kind = node.get_str("kind", choices=("fixed", "uniform", "lognormal", "empirical"))
    out: LengthDist
    if kind == "fixed":
        out = FixedLength(value=node.get_int("value", ge=1))
    elif kind == "uniform":
        lo = node.get_int("min", ge=1)
        hi = node.get_int("max", ge=lo)
        out = UniformLength(min=lo, max=hi)
    elif kind == "lognormal":
        lo = node.get_int("min", 1, ge=1)
        hi = node.get_int("max", 1_000_000, ge=lo)
        out = LognormalLength(
            mean=node.get_float("mean", gt=0.0),
            sigma=node.get_float("sigma", ge=0.0),
            min=lo,
            max=hi,
        )
    else:
        out = _empirical(node, roots)
    node.finish()
    return out


def _empirical(node: Node, roots: FileRoots) -> EmpiricalLength:
    if node.has("file") == node.has("values"):
        raise ConfigError("give exactly one of file or values", key=node.key)
    weights: tuple[float, ...] = ()
    if node.has("values"):
        raw = as_list(node.raw("values"), node.sub("values"))
        values = tuple(as_int(v, f"{node.sub('values')}[{i}]") for i, v in enumerate(raw))
        source = "inline"
        if node.has("weights"):
            wraw = as_list(node.raw("weights"), node.sub("weights"))
            weights = tuple(as_number(w, f"{node.sub('weights')}[{i}]") for i, w in enumerate(wraw))
            if len(weights) != len(values):
                raise ConfigError("needs one weight per value", key=node.sub("weights"))
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError("weights must be >= 0 and not all 0", key=node.sub("weights"))
    else:
        path = resolve_path(node.get_str("file"), roots, node.sub("file"))
        column: str | None = node.get_str("column") if node.has("column") else None
        node.raw("column", None)
        values = load_length_values(path, column, key=node.sub("file"))
        source = str(path)
    if not values:
        raise ConfigError("has no values", key=node.key)
    if source == "inline" and min(values) < 1:
        raise ConfigError(f"lengths must be >= 1, got {min(values)}", key=node.key)
    return EmpiricalLength(values=values, weights=weights, source=source)
