"""``loragate loadtest``: replay a workload spec open-loop against any OpenAI-compatible URL.

The target is whatever serves ``/v1/completions``: a loragate gateway, one vLLM server, another
load balancer. The spec's adapters are mapped onto the models the target lists (``--models``),
requests are sent at the spec's times whatever the answers (open loop), streamed, and every one
is accounted for in the summary (and in ``--results``, one JSON line each).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from loragate.core.errors import ConfigError, LoragateError
from loragate.loadtest.api_keys import read_api_keys
from loragate.loadtest.fleet import (
    FleetModels,
    ModelPlan,
    TargetError,
    by_popularity,
    fetch_models,
    openai_base,
    plan_models,
)
from loragate.loadtest.openloop import OpenLoopConfig, RequestResult, RunStart, run_open_loop
from loragate.loadtest.prompt_tokens import PromptTokens, measure_prompt_tokens, root_of
from loragate.loadtest.proxy_env import env_proxy
from loragate.loadtest.records import RecordWriter
from loragate.loadtest.scaling import scale_rates
from loragate.loadtest.summary import format_text, summarise
from loragate.workload import Workload, WorkloadRequest, WorkloadSpec, load_spec

HELP = "Replay a workload spec open-loop against any OpenAI-compatible URL and report."

EPILOG = """\
Requests are streamed (stream_options.include_usage, ignore_eos; --no-stream,
--no-stream-options, --no-ignore-eos leave these out) with prompts of the spec's length in
words, each one token in common tokenizers; a target with vLLM's POST /tokenize counts one
such prompt at start-up and the summary's prompts line says what it counted. The summary goes
to stdout, the model mapping, start-up steps and progress to stderr.
Output tokens are the server's usage counts; a server that sends no usage gets an estimate
(content chunks of a stream, words of a JSON answer), said once on stderr and in the summary.
TTFT is the time to the first chunk that carries output; JSON answers have none.
With --max-requests N the offered rate is over the arrivals up to the first one left out:
n/a when that is under 1 s (a trace's first arrivals can be microseconds apart). Each
--results record names the replica a loragate gateway says served it (X-Loragate-Replica,
null from other targets); the summary lists replicas when more than one served.
Every request is sent with X-Request-Id lt-<run id>-<index> (a loragate gateway keeps it and
names the request by it in its logs); each record has it (sent_request_id), the answer's
X-Request-Id (request_id; null without an answer) and its wall-clock send time (sent_at,
epoch seconds); the JSON summary's run has the run's id and start (started_at, ISO-8601 UTC,
and started_epoch_s).
Proxies: HTTP_PROXY / HTTPS_PROXY / ALL_PROXY (either case) are used as the openai SDK
(httpx) and requests use them, except for hosts NO_PROXY lists (names, domain suffixes, CIDR
ranges) and loopback targets (localhost, 127.0.0.0/8, ::1); the proxy is said on stderr, as
its latency is then in every figure. --no-proxy-env connects directly. ~/.netrc is not read.

exit status:
  0    every request the workload scheduled was sent and answered 200 (or the failed
       fraction is within --max-error-rate)
  1    requests failed (any HTTP error, timeout, broken stream, or not sent before the
       run's deadline), or none was sent
  2    bad flags or spec, unreachable URL, GET /v1/models refused (e.g. 401) when needed
  130  interrupted (Ctrl-C): the summary of the requests sent is printed, those in
       flight counted as failed (interrupted)

example:
  loragate loadtest --url http://127.0.0.1:8080 --workload workload/demo.yaml \\
      --duration-s 20 --api-key sk-acme-123 --json summary.json --results records.jsonl
"""

ENDPOINTS = {"completions": 0, "chat": 1, "mixed": 3}  # -> OpenLoopConfig.chat_every

# The shell's status of a process stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130

# A start-up step (GET /v1/models, POST /tokenize) that takes longer is said on stderr.
SLOW_STEP_S = 1.0

T = TypeVar("T")

# The shortest arrival window --max-requests may leave that a rate is given over: the first
# arrivals of a bursty trace can fall within microseconds, and N over that is no rate.
MIN_RATE_WINDOW_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--url",
        required=True,
        help="the target's root or OpenAI base, e.g. http://127.0.0.1:8080 or .../v1",
    )
    parser.add_argument(
        "--workload",
        required=True,
        type=Path,
        metavar="SPEC.yaml",
        help="workload spec, as loragate simulate reads it (e.g. workload/demo.yaml)",
    )
    parser.add_argument(
        "--traces-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="a copy of the traces the spec reads: its relative file paths are looked for "
        "under DIR first, by their trailing parts (../../shared/traces/x/y.csv as "
        "DIR/shared/traces/x/y.csv, DIR/traces/x/y.csv, DIR/x/y.csv, DIR/y.csv), then beside "
        "the spec (default: $LORAGATE_TRACES_DIR)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, else none)",
    )
    parser.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="each model's own API key, for a fleet of tenants that each see only their "
        "adapters: FILE.csv of 'model,key' lines, or a YAML/JSON mapping {model: key}. "
        "With --models auto the spec's adapters are mapped onto the file's models (the base "
        "model's line, if any, is its requests' key); a model without a line is sent with "
        "--api-key. GET /v1/models and POST /tokenize use --api-key, else the file's first key",
    )
    parser.add_argument(
        "--models",
        default="auto",
        help="auto: the LoRA adapters GET /v1/models lists (cards with a parent), the base "
        "model if none; or a,b,c: these models. The spec's adapters are mapped onto them "
        "most popular first, cycling if fewer (default: %(default)s)",
    )
    parser.add_argument(
        "--base-only", action="store_true", help="send every request to the base model"
    )
    parser.add_argument(
        "--base-model",
        help="the model base-model requests name (default: the one GET /v1/models lists)",
    )
    run = parser.add_argument_group("how much load")
    run.add_argument(
        "--duration-s", type=float, help="seconds of arrivals (default: the spec's duration_s)"
    )
    run.add_argument(
        "--max-requests", type=int, metavar="N", help="send at most the first N requests"
    )
    rate = run.add_mutually_exclusive_group()
    rate.add_argument(
        "--rate-scale",
        type=float,
        metavar="X",
        help="multiply every rate of the spec by X (keeps bursts and diurnal shape)",
    )
    rate.add_argument(
        "--rate-rps",
        type=float,
        metavar="R",
        help="scale the spec's rates so that its mean total rate is R req/s",
    )
    run.add_argument("--seed", type=int, help="workload seed (default: the spec's)")
    run.add_argument(
        "--max-concurrency",
        type=int,
        default=256,
        help="requests in flight at most; beyond, sends wait (send lag) (default: %(default)s)",
    )
    run.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="per request, stream included (default: %(default)s)",
    )
    run.add_argument(
        "--endpoint",
        choices=tuple(ENDPOINTS),
        default="completions",
        help="/v1/completions, /v1/chat/completions or every third request chat "
        "(default: %(default)s)",
    )
    body = parser.add_argument_group("what the requests ask")
    body.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="ask for JSON answers (stream: false), for endpoints that do not stream; "
        "no TTFT is measured",
    )
    body.add_argument(
        "--no-stream-options",
        dest="stream_usage",
        action="store_false",
        help="leave out stream_options.include_usage, for servers that refuse it; output "
        "tokens are then estimated from the stream's chunks",
    )
    body.add_argument(
        "--max-completion-tokens",
        action="store_true",
        help="chat requests bound their output with max_completion_tokens, OpenAI's newer "
        "name (its reasoning models refuse max_tokens with 400), instead of max_tokens; "
        "/v1/completions knows only max_tokens. Needs --endpoint chat or mixed",
    )
    body.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="leave out ignore_eos, vLLM's extension that makes outputs exactly max_tokens "
        "long (servers that refuse unknown fields, e.g. OpenAI's, answer it with 400)",
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--no-proxy-env",
        dest="proxy_env",
        action="store_false",
        help="ignore HTTP_PROXY/HTTPS_PROXY/ALL_PROXY and connect to the target directly "
        "(default: use them, see below)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--json", type=Path, metavar="FILE", help="write the summary as JSON ('-': stdout)"
    )
    out.add_argument(
        "--results", type=Path, metavar="FILE", help="write every request's record (JSON lines)"
    )
    out.add_argument(
        "--top", type=int, default=10, help="models shown in the summary (default: %(default)s)"
    )
    out.add_argument(
        "--progress-s",
        type=float,
        default=5.0,
        help="progress line on stderr every S seconds, 0: none (default: %(default)s)",
    )
    out.add_argument(
        "--max-error-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="exit 0 if at most this fraction of requests failed (default: %(default)s)",
    )


@dataclasses.dataclass(slots=True)
class _Run:
    """What a run accumulates; kept outside the event loop so Ctrl-C can still report it."""

    results: list[RequestResult] = dataclasses.field(default_factory=list)
    pulled: int = 0  # requests taken from the workload stream
    # The time of the first arrival --max-requests left out (None: it cut nothing, so far):
    # the first N requests are the arrivals of [0, next_t_s).
    next_t_s: float | None = None
    started: float = 0.0  # the run's start (perf_counter); 0: not started
    start: RunStart | None = None  # the same, with the wall clock's
    run_id: str = ""  # the middle of every X-Request-Id sent (lt-<run id>-<index>)
    ended: float = 0.0
    writer: RecordWriter | None = None
    stream: bool = True  # streamed answers were asked for
    stream_usage: bool = True  # and usage in them
    noted: set[str] = dataclasses.field(default_factory=set)  # notes said once
    prompt_tokens: PromptTokens | None = None  # the target's count of a probe prompt

    def take(
        self, requests: Iterator[WorkloadRequest], limit: int | None
    ) -> Iterator[WorkloadRequest]:
        """The first ``limit`` (None: all) of ``requests``, counted."""
        for req in requests:
            if limit is not None and self.pulled >= limit:
                self.next_t_s = req.t_s
                return
            self.pulled += 1
            yield req

    def done(self, r: RequestResult) -> None:
        self.results.append(r)
        if self.writer is not None:
            self.writer.write(r)
        for key in _answer_notes(r, stream=self.stream, stream_usage=self.stream_usage):
            if key not in self.noted:
                self.noted.add(key)
                _note(_NOTES[key])


# What an answer shows about the target, said once per run.
_NOTES = {
    "chunks": "note: the target sent a stream without usage (it ignores "
    "stream_options.include_usage): output tokens are estimated as the chunks that carried output",
    "words": "note: the target sent an answer without usage: output tokens are estimated as the "
    "words of its text",
    "chunks unasked": "note: streams carry no usage without stream_options "
    "(--no-stream-options): output tokens are estimated as the chunks that carried output",
    "json": "note: the target answered a streamed request with one JSON object (it ignores "
    "stream: true): no TTFT for such answers",
}


def _answer_notes(r: RequestResult, *, stream: bool, stream_usage: bool) -> list[str]:
    """The keys of the :data:`_NOTES` a successful answer calls for."""
    if not r.ok:
        return []
    keys: list[str] = []
    if r.tokens_source == "chunks":
        keys.append("chunks" if stream_usage else "chunks unasked")
    elif r.tokens_source == "words":
        keys.append("words")
    if stream and not r.streamed:
        keys.append("json")
    return keys


# Request fields a server may refuse: what its 400 message says, the field, the flag to try.
_REFUSED_FIELD_HINTS = (
    ("ignore_eos", "ignore_eos", "--no-ignore-eos"),
    ("stream_options", "stream_options", "--no-stream-options"),
    # OpenAI's reasoning models: "Unsupported parameter: 'max_tokens' is not supported with
    # this model. Use 'max_completion_tokens' instead."
    ("'max_tokens' is not supported", "max_tokens", "--max-completion-tokens --endpoint chat"),
)


def _hints(results: list[RequestResult]) -> list[str]:
    """Flags to try when 400 answers name a field the load test sends."""
    messages = {r.error or "" for r in results if r.status == 400}
    return [
        f"hint: 400 answers name {field}, which the target may not accept: try {flag}"
        for said, field, flag in _REFUSED_FIELD_HINTS
        if any(said in m for m in messages)
    ]


def _check_flags(args: argparse.Namespace) -> None:
    def positive(v: float | None) -> bool:
        return v is None or v > 0

    def natural(v: float | None) -> bool:
        return v is None or v >= 0

    checks = [
        ("--duration-s", args.duration_s, positive, "> 0"),
        ("--max-requests", args.max_requests, positive, "> 0"),
        ("--rate-scale", args.rate_scale, positive, "> 0"),
        ("--rate-rps", args.rate_rps, positive, "> 0"),
        ("--max-concurrency", args.max_concurrency, positive, "> 0"),
        ("--timeout-s", args.timeout_s, positive, "> 0"),
        ("--top", args.top, natural, ">= 0"),
        ("--progress-s", args.progress_s, natural, ">= 0"),
        ("--seed", args.seed, natural, ">= 0"),
    ]
    for flag, value, good, what in checks:
        if not good(value):
            raise ConfigError(f"must be {what}, got {value}", key=flag)
    if not 0 <= args.max_error_rate <= 1:
        raise ConfigError(f"must be in [0, 1], got {args.max_error_rate}", key="--max-error-rate")
    if args.max_completion_tokens and args.endpoint == "completions":
        raise ConfigError(
            "names the chat requests' output bound, and --endpoint completions sends none "
            "(/v1/completions knows only max_tokens): add --endpoint chat or mixed",
            key="--max-completion-tokens",
        )


def _workload(args: argparse.Namespace) -> Workload:
    spec = load_spec(args.workload, traces_dir=args.traces_dir)
    _say_trace(spec)
    if args.duration_s is not None:
        spec = dataclasses.replace(spec, duration_s=args.duration_s)
    if args.seed is not None:
        spec = dataclasses.replace(spec, seed=args.seed)
    if args.rate_scale is not None:
        spec = scale_rates(spec, args.rate_scale)
    elif args.rate_rps is not None:
        offered = Workload(spec).offered_rate_rps
        if offered <= 0:
            raise ConfigError("the spec offers no requests to scale", key="--rate-rps")
        spec = scale_rates(spec, args.rate_rps / offered)
    return Workload(spec)


def _note(text: str) -> None:
    print(f"loragate loadtest: {text}", file=sys.stderr, flush=True)


def _say_trace(spec: WorkloadSpec) -> None:
    """Say that the spec's ServeGen trace is being read: seconds for a large one (the 4 MB
    m-large trace, 326,592 rows), with nothing else on the screen meanwhile."""
    sg = spec.arrivals.servegen
    if sg is None:
        return
    try:
        size = sg.file.stat().st_size
    except OSError:
        return  # reading it will say what is wrong
    _note(
        f"{spec.name}: reading the ServeGen trace {os.path.normpath(sg.file)} "
        f"({size / 1e6:.1f} MB) for {spec.adapters.count} clients"
    )


async def _announced(step: Awaitable[T], text: str) -> T:
    """Await ``step``, saying ``text`` on stderr if it takes over :data:`SLOW_STEP_S`."""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=SLOW_STEP_S)
        if not done:
            _note(text)
        return await task
    finally:
        task.cancel()  # no-op once done; ends it when the run is cancelled meanwhile


def _listing_key(args: argparse.Namespace, keys: Mapping[str, str]) -> str | None:
    """The key of the requests that are about no model: GET /v1/models, POST /tokenize."""
    return args.api_key or next(iter(keys.values()), None)


async def _plan(
    args: argparse.Namespace,
    base_url: str,
    workload: Workload,
    proxy: str | None,
    keys: Mapping[str, str],
) -> ModelPlan:
    timeout_s = min(args.timeout_s, 10.0)
    try:
        listing: FleetModels | TargetError = await _announced(
            fetch_models(
                base_url, api_key=_listing_key(args, keys), timeout_s=timeout_s, proxy=proxy
            ),
            f"waiting for GET {base_url}/models (what the target serves; up to {timeout_s:g} s)",
        )
    except TargetError as exc:
        if not exc.reachable:
            raise
        listing = exc
    names = by_popularity(workload.adapter_names, workload.mean_rates_rps.tolist())
    models: str | list[str] = args.models
    if keys and args.models == "auto":  # the file's models (its base model's line: a key)
        base = args.base_model or (listing.base_model if isinstance(listing, FleetModels) else None)
        # A file naming the base model only: the adapters are GET /v1/models's, as without it.
        models = [m for m in keys if m != base] or "auto"
    return plan_models(
        models=models,
        base_only=args.base_only,
        base_model=args.base_model,
        listing=listing,
        spec_adapters=names,
        spec_has_base=workload.base_rate_rps > 0,
    )


async def _loadtest(args: argparse.Namespace, workload: Workload, state: _Run) -> None:
    base_url = openai_base(args.url)
    proxy = env_proxy(base_url) if args.proxy_env else None
    if proxy is not None:
        _note(
            f"through the proxy {proxy.shown()} ({proxy.variable}; --no-proxy-env connects "
            "directly): its latency is in every figure"
        )
    proxy_url = None if proxy is None else proxy.url
    keys = {} if args.api_keys is None else read_api_keys(args.api_keys)
    plan = await _plan(args, base_url, workload, proxy_url, keys)
    for line in plan.notes:
        _note(line)
    if keys:
        _note(_keys_note(args, keys, plan))
    if args.results is not None:
        try:
            state.writer = RecordWriter(args.results)
        except OSError as exc:
            raise ConfigError(f"cannot write: {exc.strerror}", key=str(args.results)) from exc
    spec = workload.spec
    bound = f", at most {args.max_requests} requests" if args.max_requests else ""
    expected = workload.offered_rate_rps * spec.duration_s
    _note(
        f"{spec.name}: {workload.offered_rate_rps:.3g} req/s offered for {spec.duration_s:g} s "
        f"(about {expected:,.0f} requests){bound} -> {base_url} ({args.endpoint}, "
        f"{'streamed' if args.stream else 'not streamed'})"
    )
    cfg = OpenLoopConfig(
        base_url=base_url,
        base_model=plan.base_model or "",
        api_key=args.api_key,
        api_keys=keys,
        max_concurrency=args.max_concurrency,
        deadline_s=spec.duration_s + args.timeout_s + 1.0,
        request_timeout_s=args.timeout_s,
        chat_every=ENDPOINTS[args.endpoint],
        stream=args.stream,
        stream_usage=args.stream_usage,
        ignore_eos=args.ignore_eos,
        adapter_map=plan.mapping,
        max_completion_tokens=args.max_completion_tokens,
        proxy=proxy_url,
    )
    state.stream, state.stream_usage = args.stream, args.stream_usage
    timeout_s = min(args.timeout_s, 10.0)
    state.prompt_tokens = await _announced(
        measure_prompt_tokens(
            base_url,
            model=plan.base_model,
            api_key=_listing_key(args, keys),
            timeout_s=timeout_s,
            proxy=proxy_url,
        ),
        f"waiting for POST {root_of(base_url)}/tokenize (the target's count of the prompts' "
        f"tokens; up to {timeout_s:g} s)",
    )
    requests = state.take(workload.requests(), args.max_requests)
    ticker = asyncio.create_task(_progress(args.progress_s, state))
    state.run_id = cfg.run_id
    state.start = RunStart.now()
    _note(
        f"run {cfg.run_id} started at {state.start.iso()}: requests carry X-Request-Id "
        f"lt-{cfg.run_id}-<index>"
    )
    state.started = state.start.perf
    try:
        await run_open_loop(cfg, requests, on_result=state.done, started=state.start)
    finally:
        state.ended = time.perf_counter()
        ticker.cancel()


def _keys_note(args: argparse.Namespace, keys: Mapping[str, str], plan: ModelPlan) -> str:
    """What ``--api-keys`` does for this run: how many models have their own key, and the
    models the run names that have none."""
    named = {*plan.mapping.values(), *([plan.base_model] if plan.base_model else [])}
    without = sorted(m for m in named if m not in keys)
    said = f"--api-keys {args.api_keys}: {len(keys)} models with their own key"
    if not without:
        return said
    fallback = "--api-key" if args.api_key else "no key"
    shown = ", ".join(without[:5]) + (f" and {len(without) - 5} more" if len(without) > 5 else "")
    return f"{said}; {len(without)} model(s) without one, sent with {fallback}: {shown}"


async def _progress(every_s: float, state: _Run) -> None:
    if every_s <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        ok = sum(1 for r in state.results if r.ok)
        done = len(state.results)
        _note(
            f"{time.perf_counter() - state.started:6.1f} s: {done} answered "
            f"({ok} ok, {done - ok} failed), {state.pulled - done} in flight"
        )


def _summary(
    args: argparse.Namespace, workload: Workload, state: _Run, *, interrupted: bool = False
) -> dict[str, Any]:
    elapsed_s = max(0.0, state.ended - state.started)
    # The arrival window: the spec's duration, or, when --max-requests cut the stream, the
    # span that holds exactly the requests taken (up to the first one left out), which a burst
    # can make microseconds long: no rate is given over less than MIN_RATE_WINDOW_S of that.
    cut = state.next_t_s is not None
    window_s = workload.spec.duration_s if state.next_t_s is None else state.next_t_s
    if interrupted:
        window_s = min(window_s, elapsed_s)
    summary = summarise(
        sorted(state.results, key=lambda r: r.index),
        spec_rps=workload.offered_rate_rps,
        window_s=window_s,
        elapsed_s=elapsed_s,
        unanswered=max(0, state.pulled - len(state.results)),
        unanswered_why="not sent before Ctrl-C"
        if interrupted
        else "not sent before the run's deadline",
        top=args.top,
        min_window_s=MIN_RATE_WINDOW_S if cut else 0.0,
    )
    summary["target"] = {"url": openai_base(args.url), "endpoint": args.endpoint}
    if state.start is not None:
        summary["run"] = {
            "id": state.run_id,
            "started_at": state.start.iso(),
            "started_epoch_s": round(state.start.epoch_s, 6),
        }
    if state.prompt_tokens is not None:
        summary["prompt_tokens"] = state.prompt_tokens.as_dict()
    summary["workload"] = {
        "name": workload.spec.name,
        "file": str(args.workload),
        "duration_s": workload.spec.duration_s,
        "seed": workload.spec.seed,
    }
    return summary


def _report(args: argparse.Namespace, summary: dict[str, Any], state: _Run) -> None:
    for hint in _hints(state.results):
        _note(hint)
    text = format_text(summary)
    if args.json is not None and str(args.json) == "-":
        print(text, file=sys.stderr)
        print(json.dumps(summary, indent=2))
        return
    print(text)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            _note(f"error: cannot write {args.json}: {exc.strerror}")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    state = _Run()
    try:
        _check_flags(args)
        workload = _workload(args)
        for note in workload.notes:
            _note(f"note: {args.workload}: {note}")
        asyncio.run(_loadtest(args, workload, state))
    except LoragateError as exc:
        _note(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _note(
            "interrupted: the summary covers the requests sent so far; requests in flight are "
            "counted as failed (interrupted)"
        )
        if state.started:
            state.ended = state.ended or time.perf_counter()
            _report(args, _summary(args, workload, state, interrupted=True), state)
        return EXIT_INTERRUPTED
    finally:
        if state.writer is not None:
            state.writer.close()
            _note(f"{state.writer.written} records in {state.writer.path}")
    summary = _summary(args, workload, state)
    _report(args, summary, state)
    req = summary["requests"]
    if req["sent"] == 0:
        _note("no request was sent: the workload has none in its duration")
        return 1
    failed = req["failed"] + req["unanswered"]
    return 0 if failed <= args.max_error_rate * req["scheduled"] else 1
