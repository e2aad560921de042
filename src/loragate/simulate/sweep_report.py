"""What ``loragate simulate --sweep`` prints: one table row per point, and the answer.

Columns: the point (``replicas``, ``max_loras``, ``max_cpu_loras``), TTFT p50 and p99 of the
served requests, ``SLO met`` (``slo.attainment``: the share of all requests with a first
token within ``--ttft-slo-ms``), ``deferred`` (requests that waited for a LoRA slot),
``slot wait`` (``deferred.share_of_ttft``: their waiting over all first-token time; 50% or
more without throughput starvation is slot-bound), ``loads`` (adapter loads, all replicas),
``starved`` (requests with no first token within ``--starvation-wait-s``), ``tput starved``
(the cluster's throughput below 0.9 x offered) and ``meets SLO``
(:func:`loragate.simulate.sweep.meets`).

``--json`` prints :func:`sweep_result`'s dict: ``sweep`` (``axes``, ``target``
(``ttft_slo_ms``, ``slo_attainment``), ``smallest`` (the smallest point meeting the target,
``{replicas, max_loras, max_cpu_loras}``, or null), ``left_out`` (combinations with
``max_cpu_loras < max_loras``), the workload's name, ``adapters``, ``offered_rate_rps`` and
``duration_s``, ``profile``, ``policy``, ``seed``, ``jobs``, ``wall_s``; and, if Ctrl-C or
SIGTERM stopped the sweep, ``interrupted``: ``points_done`` of ``points``) and ``points``: per
point its table row (the keys of :func:`row`) and its whole ``summary``, as ``summary.json``
of a single run with the same flags (:mod:`loragate.simulate.outputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from loragate.simulate.config import profile_label
from loragate.simulate.summary import slot_bound
from loragate.simulate.sweep import AXES, Point, meets, smallest


def row(point: Point, summary: dict[str, Any], attainment: float) -> dict[str, Any]:
    """One point's line of the sweep table (and of ``--json``'s ``points``)."""
    ttft = summary["ttft_s"]
    loads = sum(r["adapter_loads"] for r in summary["replicas"].values())
    return {
        **dataclasses.asdict(point),
        "ttft_p50_ms": None if ttft["p50"] is None else ttft["p50"] * 1000.0,
        "ttft_p99_ms": None if ttft["p99"] is None else ttft["p99"] * 1000.0,
        "slo_attainment": summary["slo"]["attainment"],
        "deferred": summary["deferred"]["requests"],
        "deferred_share_of_ttft": summary["deferred"]["share_of_ttft"],
        "adapter_loads": loads,
        "starved_requests": summary["starvation"]["requests"],
        "throughput_starved": summary["starved"],
        "slot_bound": slot_bound(summary),
        "meets": meets(summary, attainment),
    }


_COLUMNS = (
    ("replicas", "replicas", "d"),
    ("max_loras", "max_loras", "d"),
    ("max_cpu_loras", "max_cpu_loras", "d"),
    ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
    ("slo_attainment", "SLO met", ".1%"),
    ("deferred", "deferred", "d"),
    ("deferred_share_of_ttft", "slot wait", ".0%"),
    ("adapter_loads", "loads", "d"),
    ("starved_requests", "starved", "d"),
    ("throughput_starved", "tput starved", ""),
    ("meets", "meets SLO", ""),
)


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, fmt)


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows as aligned text lines, a header first."""
    cells = [[title for _, title, _ in _COLUMNS]]
    cells += [[_cell(r[key], fmt) for key, _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]


def sweep_result(
    axes: dict[str, tuple[int, ...]],
    points: Sequence[Point],
    summaries: Sequence[dict[str, Any]],
    *,
    slo_attainment: float,
    left_out: int,
    jobs: int,
    wall_s: float,
    of_points: int | None = None,
) -> dict[str, Any]:
    """The sweep's outcome (see the module's docstring). ``of_points``: the sweep was
    interrupted, ``points`` are those done of that many (``sweep.interrupted``)."""
    best = smallest(points, summaries, slo_attainment)
    first = summaries[0]
    cfg = first["config"]
    return {
        "sweep": {
            "axes": {k: list(v) for k, v in axes.items()},
            "target": {"ttft_slo_ms": cfg["ttft_slo_ms"], "slo_attainment": slo_attainment},
            "smallest": None if best is None else dataclasses.asdict(best),
            "left_out": left_out,
            "workload": cfg["workload"],
            "adapters": cfg["adapters"],
            "offered_rate_rps": cfg["offered_rate_rps"],
            "duration_s": first["duration_s"],
            "profile": cfg["profile"],
            "policy": cfg["policy"],
            "seed": cfg["seed"],
            "jobs": jobs,
            "wall_s": wall_s,
            **(
                {}
                if of_points is None
                else {"interrupted": {"points_done": len(points), "points": of_points}}
            ),
        },
        "points": [
            {**row(p, s, slo_attainment), "summary": s}
            for p, s in zip(points, summaries, strict=True)
        ],
    }


def _point_of(r: dict[str, Any]) -> Point:
    return Point(**{k: r[k] for k in AXES})


def _no_point_meets(rows: Sequence[dict[str, Any]], ttft_slo_ms: float) -> str:
    """The best point (highest attainment; the smallest among equals) and what to sweep next."""
    top = max(rows, key=lambda r: (r["slo_attainment"] or 0.0, [-r[k] for k in AXES]))
    if top["slot_bound"]:
        why = (
            "its first tokens wait mostly for LoRA slots: sweep higher max_loras "
            "(max_cpu_loras >= it) before more replicas"
        )
    elif top["throughput_starved"]:
        why = "its throughput is starved: sweep more replicas"
    else:
        why = "sweep more replicas or higher max_loras"
    return (
        f"no point meets the target; the best, {_point_of(top).label()}, serves "
        f"{top['slo_attainment'] or 0.0:.1%} within {ttft_slo_ms:g} ms: {why}"
    )


def sweep_lines(result: dict[str, Any]) -> list[str]:
    """:func:`sweep_result` as text: what ran, the target, the table, the answer."""
    sw = result["sweep"]
    rows = result["points"]
    target = sw["target"]
    slo_ms = target["ttft_slo_ms"]
    lines = [
        f"{sw['workload']}: {sw['adapters']} adapters at {sw['offered_rate_rps']:.3g} req/s for "
        f"{sw['duration_s']:g} s, policy {sw['policy']}, profile {profile_label(sw['profile'])}, "
        f"seed {sw['seed']}",
        f"target: first token within {slo_ms:g} ms for >= {target['slo_attainment']:.1%} of "
        "requests, throughput not starved",
        *table(rows),
    ]
    best = sw["smallest"]
    cut = sw.get("interrupted")
    if cut is not None:
        lines.append(
            f"interrupted: {cut['points_done']} of {cut['points']} points done, the rest not "
            "run; what follows is about the points done only"
        )
    if best is not None:
        r = next(r for r in rows if _point_of(r) == Point(**best))
        lines.append(
            f"smallest meeting the target: {_point_of(r).label()} (TTFT p99 "
            f"{r['ttft_p99_ms']:.0f} ms, {r['slo_attainment']:.1%} within {slo_ms:g} ms)"
        )
    else:
        lines.append(_no_point_meets(rows, slo_ms))
    if sw["left_out"]:
        lines.append(
            f"left out {sw['left_out']} points with max_cpu_loras < max_loras (vLLM refuses them)"
        )
    lines.append(f"{len(rows)} points in {sw['wall_s']:.1f} s wall")
    return lines
