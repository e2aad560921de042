"""``loragate policies``: the built-in routing policies and every filter, scorer and picker a
``routing:`` section can compose, with their parameters, read from the routing registry.

    loragate policies          # a reference to read
    loragate policies --json   # the same for tools: {"policies": [...], "filters": [...], ...}
"""

from __future__ import annotations

import argparse
import json
import textwrap

from loragate.routing.catalog import KINDS, EntryInfo, describe

HELP = "List the routing policies, filters, scorers and pickers with their parameters."

WIDTH = 100
NAME_COLUMN = 18  # entry names are padded to this
PARAM_COLUMN = 21  # parameter names to this

# How each section is written in a config file, after its title.
SYNTAX = {
    "policy": "routing: NAME, or routing: {policy: NAME, PARAM: VALUE, ...}",
    "filter": "filters: [NAME, {name: NAME, params: {PARAM: VALUE}}, ...], applied in order",
    "scorer": "scorers: [NAME, {name: NAME, weight: W, params: {...}}, ...]; weight default 1",
    "picker": "picker: NAME or {name: NAME, params: {...}}; default max_score",
}

COMPOSING = (
    "Composing your own: routing: {name: N, filters: [...], scorers: [...], picker: ...}. A "
    "decision keeps the healthy replicas, narrows them with each filter in order (a filter with "
    "fallback: true that would leave none keeps its input), gives each remaining replica the sum "
    "over the scorers of weight * score (every score in [0, 1], higher is better, clamped; "
    "weights are numbers >= 0, not all 0), and the picker chooses one replica from those totals. "
    "A picker that uses scores needs a scorer; {ignoring} ignore them and take none. A "
    "gateway config's routing mapping may also hold seed: N (ties and random "
    "choices; default 0). examples/policies/ has one file per policy and a composed one; "
    "`loragate simulate --policy FILE` checks and runs a file."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the listing as JSON: policies, filters, scorers, pickers, each a list of "
        "{name, description, params: [{name, type, default, min?, max?, choices?}]} "
        "(pickers also uses_scores)",
    )


def run(args: argparse.Namespace) -> int:
    catalog = describe()
    if args.json:
        print(
            json.dumps(
                {title: [e.as_dict() for e in catalog[kind]] for kind, title in KINDS},
                indent=2,
            )
        )
        return 0
    print(render(catalog))
    return 0


def render(catalog: dict[str, list[EntryInfo]]) -> str:
    """The text listing: one section per kind, each entry's description and parameters."""
    lines: list[str] = []
    for kind, title in KINDS:
        if kind == "filter":
            ignoring = [e.name for e in catalog["picker"] if e.uses_scores is False]
            text = COMPOSING.replace("{ignoring}", " and ".join(ignoring) or "none")
            lines += [*textwrap.wrap(text, WIDTH), ""]
        lines.append(f"{title.capitalize()} ({SYNTAX[kind]}):")
        for entry in catalog[kind]:
            lines += _entry_lines(entry)
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _entry_lines(entry: EntryInfo) -> list[str]:
    indent = " " * (2 + NAME_COLUMN)
    out = textwrap.wrap(
        entry.description or "(no description)",
        WIDTH,
        initial_indent=f"  {entry.name:<{NAME_COLUMN - 1}} ",
        subsequent_indent=indent,
        break_on_hyphens=False,
    )
    for p in entry.params:
        out += textwrap.wrap(
            p.summary(),
            WIDTH,
            initial_indent=f"{indent}  {p.name:<{PARAM_COLUMN}} ",
            subsequent_indent=f"{indent}  {' ' * (PARAM_COLUMN + 1)}",
            break_on_hyphens=False,
        )
    return out
