"""``loragate twin``: fit performance profiles, validate the twin against real runs, list profiles.

loragate twin measure --vllm-command TEMPLATE --adapter DIR --model NAME --out DIR [--quick]
loragate twin calibrate --data DIR --model NAME --out FILE [--name PROFILE]
loragate twin validate --real-runs CSV [--paper-runs CSV] [--profile P | MODEL=P ...]
    [--offered-load sent|accounted|nominal] [--json]
loragate twin profiles
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

from loragate.commands.twin_measure import add_measure_parser
from loragate.core.errors import ConfigError, LoragateError
from loragate.twin.validate_workload import DEFAULT_REPLAYS

# The shell's status of a process stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130

HELP = (
    "Digital twin: measure your vLLM, calibrate profiles from benchmark data, validate "
    "against real vLLM runs."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="twin_command", metavar="SUBCOMMAND")
    sub.required = True

    add_measure_parser(sub)

    cal = sub.add_parser(
        "calibrate",
        help="fit a performance profile from a calibration folder",
        description="Fit a performance profile from a calibration folder (BSC CSV format).",
    )
    cal.add_argument("--data", required=True, help="calibration folder (BSC CSV format)")
    cal.add_argument("--model", required=True, help="model name as in the CSVs' model column")
    cal.add_argument("--out", required=True, help="profile YAML to write")
    cal.add_argument("--name", default=None, help="profile name (default: --out file stem)")
    cal.add_argument("--description", default="", help="the profile's one-line description")
    cal.add_argument(
        "--lora-source",
        choices=("poisson", "batch"),
        default="poisson",
        help="LoRA compute cost from the Poisson runs over slot counts plus the per-slot step "
        "cost (poisson, default) or from the all-at-once runs at one slot count (batch)",
    )
    cal.add_argument("--json", action="store_true", help="print the fit report as JSON")
    cal.set_defaults(_twin=_calibrate)

    val = sub.add_parser(
        "validate",
        help="replay real runs in the twin and report errors",
        description="Replay every run of a real_runs.csv in the twin with its own settings and "
        "report throughput, ITL and TTFT errors (MAPE and median bias).",
    )
    val.add_argument("--real-runs", required=True, help="real_runs.csv")
    val.add_argument(
        "--paper-runs",
        default=None,
        help="paper_twin_runs.csv (default: next to --real-runs if present)",
    )
    val.add_argument(
        "--profile",
        action="append",
        default=[],
        help="profile for all models, or MODEL=PROFILE (repeatable)",
    )
    val.add_argument("--model", action="append", default=[], help="only runs of this model")
    val.add_argument("--run-id", action="append", default=[], help="only this run (repeatable)")
    val.add_argument("--limit", type=int, default=None, help="at most this many runs")
    val.add_argument(
        "--window-s",
        type=float,
        default=3600.0,
        help="replayed window in seconds (default: %(default)s)",
    )
    val.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    val.add_argument(
        "--replays",
        type=int,
        default=DEFAULT_REPLAYS,
        help="replays of each synthesised run, metrics averaged (replay k: seed "
        "SEED*REPLAYS+k; default: %(default)s)",
    )
    val.add_argument(
        "--offered-load",
        choices=("sent", "accounted", "nominal"),
        default="sent",
        help="requests each replay offers: the row's requests_sent (sent, default; rows without "
        "it: accounted); successful_requests + max_running + max_waiting where that is "
        "more certain than the rates' Poisson spread and the engine queue stayed below "
        "the front-end cap, else the nominal rates (accounted); or the nominal per-adapter "
        "rates (nominal)",
    )
    val.add_argument(
        "--jobs", type=int, default=0, help="worker processes (0 = all cores, the default)"
    )
    val.add_argument("--json", action="store_true", help="print the full result as JSON")
    val.add_argument("--out", default=None, help="also write the JSON result to this file")
    val.add_argument("--progress", action="store_true", help="one line per finished run (stderr)")
    val.set_defaults(_twin=_validate)

    prof = sub.add_parser(
        "profiles",
        help="list the built-in profiles",
        description="List the built-in profiles (names for --profile) with their descriptions.",
    )
    prof.set_defaults(_twin=_profiles)


def run(args: argparse.Namespace) -> int:
    """Bad input exits 2 with one line on stderr naming the subcommand, like the other
    commands; with ``--json``, one JSON object (``{"error": {"message", "type", "param",
    "code"}}``) instead. Ctrl-C exits 130 with one line (``loragate twin validate:
    interrupted``), nothing written to ``--out``."""
    try:
        return int(args._twin(args))
    except LoragateError as exc:
        if getattr(args, "json", False):
            err = {
                "error": {
                    "message": exc.message,
                    "type": "invalid_request_error",
                    "param": exc.param,
                    "code": 400,
                }
            }
            print(json.dumps(err), file=sys.stderr)
        else:
            print(f"loragate twin {args.twin_command}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the queued runs are cancelled, the workers stopped
        print(f"loragate twin {args.twin_command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _calibrate(args: argparse.Namespace) -> int:
    from loragate.twin.calibrate import calibrate_profile
    from loragate.twin.profile import dump_profile

    out = Path(args.out)
    name = args.name or out.stem
    source = (
        f"loragate twin calibrate --data {args.data} --model {args.model} "
        f"--out {args.out}"
        + (f" --name {args.name}" if args.name else "")
        + (f" --lora-source {args.lora_source}" if args.lora_source != "poisson" else "")
    )
    profile, report = calibrate_profile(
        args.data,
        args.model,
        name=name,
        description=args.description,
        source=source,
        lora_source=args.lora_source,
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        dump_profile(profile, out)
    except OSError as exc:
        raise _cannot_write(out, exc) from exc
    if args.json:
        print(json.dumps(_clean(report.as_dict()), indent=2))
    else:
        print(f"wrote {out} (profile {name!r}, model {args.model})")
        for key, comp in report.components.items():
            mape = "" if math.isnan(comp.mape_pct) else f" MAPE {comp.mape_pct:.1f}%"
            print(f"  {key:<15} rows={comp.rows:<4}{mape}  {comp.note}")
    return 0


def _profile_map(values: list[str]) -> dict[str, str]:
    """``--profile P`` (every model: key ``*``) and ``--profile MODEL=P`` (wins for MODEL)."""
    out: dict[str, str] = {}
    for value in values:
        model, sep, prof = value.partition("=")
        if not sep:
            model, prof = "*", value
        if not model.strip() or not prof.strip():
            raise ConfigError(f"expected PROFILE or MODEL=PROFILE, got {value!r}", key="--profile")
        out[model.strip()] = prof.strip()
    return out


def _cannot_write(path: Path, exc: OSError) -> ConfigError:
    reason = exc.strerror or str(exc)
    blocking = next((d for d in path.parents if d.exists() and not d.is_dir()), None)
    if blocking is not None:  # mkdir's own "File exists" would not say which one
        reason = f"{blocking} is not a directory"
    return ConfigError(f"cannot write {path}: {reason}", key="--out")


def check_out_path(path: Path) -> None:
    """Fail before a long run, not after it, if ``--out`` cannot be a file."""
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory", key="--out")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: no directory {path.parent}", key="--out")


def write_out(path: Path, text: str) -> None:
    """Write ``--out``; a failure is one ``ConfigError`` naming the file."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc


def paper_runs_beside(real_runs: str | Path) -> str | None:
    """``--paper-runs``' default: the ``paper_twin_runs.csv`` next to ``--real-runs``, if any."""
    guess = Path(real_runs).with_name("paper_twin_runs.csv")
    return str(guess) if guess.is_file() else None


def _validate(args: argparse.Namespace) -> int:
    from loragate.twin.validate import validate
    from loragate.twin.validate_workload import ValidateConfig

    if args.out:
        check_out_path(Path(args.out))
    paper = paper_runs_beside(args.real_runs) if args.paper_runs is None else args.paper_runs
    result = validate(
        args.real_runs,
        paper_runs=paper,
        profile_for=_profile_map(args.profile),
        cfg=ValidateConfig(
            window_s=args.window_s,
            seed=args.seed,
            offered_load=args.offered_load,
            replays=args.replays,
        ),
        models=args.model,
        run_ids=args.run_id,
        limit=args.limit,
        jobs=args.jobs,
        progress=args.progress,
    )
    text = json.dumps(_clean(result), indent=1)
    if args.out:
        write_out(Path(args.out), text)
    if args.json:
        print(text)
    else:
        print(format_table(result))
    return 0


def format_table(result: dict[str, Any]) -> str:
    """The error table, then every row that was not compared (skipped or failed, with the
    reason), the offered-load sources and the fallbacks noted on runs."""
    failed, skipped = result["runs_failed"], result.get("runs_skipped", [])
    lines = [
        f"rows: {result.get('rows_read', result['runs_replayed'])}  replayed: "
        f"{result['runs_replayed'] - len(failed)}  failed: {len(failed)}  skipped: "
        f"{len(skipped)}  not selected: {result.get('rows_not_selected', 0)}  "
        f"elapsed: {result['elapsed_s']:.1f} s  cpu: {result['cpu_s_total']:.1f} s"
    ]
    if result.get("offered_load"):
        lines.append(
            "offered load: "
            + "; ".join(f"{n} x {source}" for source, n in result["offered_load"].items())
        )
    head = (
        f"{'model':<24}{'who':<7}{'metric':<16}{'n':>4}{'MAPE':>8}{'SMAPE':>8}"
        f"{'SMAPEp':>8}{'bias':>8}"
    )
    lines.append(head)
    for m in result["models"]:
        for who in ("ours", "paper"):
            for metric, s in m[who].items():
                if who == "paper" and not s["n"]:
                    continue  # no paper-twin figures for these runs
                lines.append(
                    f"{m['model'][:23]:<24}{who:<7}{metric:<16}{s['n']:>4}"
                    f"{s['mape_pct']:>8.2f}{s['smape_pct']:>8.2f}{s['smape_paper_pct']:>8.2f}"
                    f"{s['median_bias_pct']:>+8.2f}"
                )
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        lines += [
            f"  line {s['line']}  {s['run_id'] or '(no run_id)'}: {s['reason']}" for s in skipped
        ]
    if failed:
        lines.append(f"failed ({len(failed)}):")
        lines += [f"  line {f.get('line', '?')}  {f['run_id']}: {f['error']}" for f in failed]
    if result.get("notes"):
        lines.append("notes:")
        lines += [f"  {n} run(s): {note}" for note, n in result["notes"].items()]
    return "\n".join(lines)


PROFILES_WIDTH = 100  # `twin profiles`: a name column of 28, descriptions wrapped, never cut


def _profiles(args: argparse.Namespace) -> int:
    from loragate.twin.profile import list_profiles, load_profile

    for name in list_profiles():
        text = " ".join(load_profile(name).description.split())
        lines = textwrap.wrap(text, PROFILES_WIDTH - 29, break_on_hyphens=False) or [""]
        print(f"{name:<28} {lines[0]}")
        for line in lines[1:]:
            print(" " * 29 + line)
    return 0


def _clean(obj: Any) -> Any:
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj
