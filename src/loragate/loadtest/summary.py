"""The summary of a load test: counts, rates, latency percentiles, per-model rows, errors.

Latencies are of successful requests only (a 401 answered in 1 ms is no latency figure);
percentiles are nearest-rank. Rates: ``spec_rps`` is the spec's mean rate (after any
scaling), ``offered_rps`` the rate of the stream this run drew from it (requests scheduled over
the arrival window: a bursty spec over a short run draws more or fewer than the mean),
``sent_rps`` what the client achieved (requests sent over the send window, which grows past the
arrival window when sends lag), ``ok_rps`` successful requests over the whole run, drain
included. A window the arrivals themselves set (a run cut after its first N requests) may be
microseconds long (a trace's burst): below ``min_window_s`` the offered and sent rates are
None (``n/a``) and ``rate.not_measured`` says why.

Output tokens are the servers' usage counts where they sent usage; where not, the estimate each
request states (``tokens_source``: content chunks of a stream, words of a JSON answer), summed
in ``output_tokens_by_source`` and counted in ``answers.without_usage``, so a figure that is
partly estimated says so.

``replicas``: the requests of each replica a loragate gateway named (``X-Loragate-Replica``),
requests without the header under ``None``; the text shows them when more than one replica
served.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from loragate.loadtest.openloop import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def _ms(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in qs:
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v * 1000.0, 3)
    return out


def _error_key(r: RequestResult) -> str:
    return f"HTTP {r.status}" if r.error_type == "http" else str(r.error_type or "unknown")


def summarise(
    results: Sequence[RequestResult],
    *,
    spec_rps: float,
    window_s: float,
    elapsed_s: float,
    unanswered: int = 0,
    unanswered_why: str = "not sent before the run's deadline",
    top: int = 10,
    min_window_s: float = 0.0,
) -> dict[str, Any]:
    """The summary of ``results`` (every request sent); ``window_s``: the arrival window
    (requests are scheduled in it); ``unanswered``: requests the workload scheduled that have no
    result (``unanswered_why``: not sent before the deadline, or cut by Ctrl-C); they count as
    failures. Offered and sent rates over a window shorter than ``min_window_s`` are None."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    scheduled = len(results) + unanswered
    last_sent_s = max((r.sent_s for r in results), default=0.0)
    send_window_s = max(window_s, last_sent_s)
    not_measured = None
    if window_s < min_window_s:
        not_measured = (
            f"{scheduled} requests arrived within {_secs(window_s)}: a rate needs "
            f"{min_window_s:g} s of arrivals or more"
        )
    lags = [max(0.0, r.sent_s - r.scheduled_s) for r in results]
    tokens = sum(r.output_tokens for r in ok)
    by_source: Counter[str] = Counter()
    for r in ok:
        by_source[r.tokens_source] += r.output_tokens
    samples = Counter(f"{_error_key(r)}: {r.error}" for r in failed)
    return {
        "requests": {
            "scheduled": scheduled,
            "sent": len(results),
            "ok": len(ok),
            "failed": len(failed),
            "unanswered": unanswered,
            "unanswered_why": unanswered_why if unanswered else None,
            "by_status": dict(sorted(Counter(str(r.status) for r in results).items())),
            "errors_by_type": dict(Counter(_error_key(r) for r in failed).most_common()),
        },
        "rate": {
            "spec_rps": round(spec_rps, 4),
            "offered_rps": _rate(scheduled, window_s, min_window_s),
            "sent_rps": _rate(len(results), send_window_s, min_window_s),
            "ok_rps": _rate(len(ok), elapsed_s, 0.0),
            "not_measured": not_measured,
            "window_s": float(f"{window_s:.6g}"),
            "send_window_s": float(f"{send_window_s:.6g}"),
            "elapsed_s": round(elapsed_s, 3),
            "send_lag_ms": _ms(lags, (50, 99)),
        },
        "ttft_ms": _ms([r.ttft_s for r in ok if r.ttft_s is not None], (50, 90, 99)),
        "e2e_ms": _ms([r.latency_s for r in ok], (50, 90, 99)),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / elapsed_s, 2) if elapsed_s > 0 else None,
        "output_tokens_by_source": dict(sorted(by_source.items())),
        "answers": {
            "streamed": sum(1 for r in ok if r.streamed),
            "json": sum(1 for r in ok if not r.streamed),
            "without_usage": sum(1 for r in ok if r.tokens_source != "usage"),
            "finish_reasons": dict(Counter(r.finish_reason or "none" for r in ok).most_common()),
        },
        "models": _per_model(results, top),
        "replicas": _per_replica(results),
        "error_samples": [{"count": n, "error": text[:300]} for text, n in samples.most_common(5)],
    }


def _rate(n: int, window_s: float, min_window_s: float) -> float | None:
    """``n`` per second over ``window_s``; None over an empty window or one under
    ``min_window_s``."""
    if window_s <= 0 or window_s < min_window_s:
        return None
    return round(n / window_s, 4)


def _secs(s: float) -> str:
    """A duration for a line: 0.1 s resolution from 1 s, three significant digits below."""
    return f"{s:.1f} s" if s >= 1 else f"{s:.3g} s"


def _row(rs: Sequence[RequestResult]) -> dict[str, Any]:
    """Counts and TTFT percentiles of one group of requests."""
    ok = [r for r in rs if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "requests": len(rs),
        "ok": len(ok),
        "failed": len(rs) - len(ok),
        "ttft_ms": _ms(ttfts, (50, 99)),
    }


def _per_model(results: Sequence[RequestResult], top: int) -> dict[str, Any]:
    by_model: dict[str, list[RequestResult]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(r)
    ranked = sorted(by_model.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    rows = [{"model": model, **_row(rs)} for model, rs in ranked[:top]]
    return {"count": len(by_model), "top": rows}


def _per_replica(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Every replica named (``count``), busiest first; requests that named none last."""
    by_replica: dict[str | None, list[RequestResult]] = {}
    for r in results:
        by_replica.setdefault(r.replica, []).append(r)
    ranked = sorted(by_replica.items(), key=lambda kv: (kv[0] is None, -len(kv[1]), kv[0] or ""))
    rows = [{"replica": replica, **_row(rs)} for replica, rs in ranked]
    return {"count": sum(1 for replica in by_replica if replica is not None), "rows": rows}


def _f(v: float | None, unit: str = " ms") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def _estimated(summary: dict[str, Any]) -> str:
    """What part of the token count is estimated, or ''."""
    answers = summary["answers"]
    n = answers["without_usage"]
    if not n:
        return ""
    by_source = summary["output_tokens_by_source"]
    how = ", ".join(
        f"{by_source[k]} counted as {what}"
        for k, what in (("chunks", "content chunks"), ("words", "words"))
        if k in by_source
    )
    ok = answers["streamed"] + answers["json"]
    return f" ({n} of {ok} answers sent no usage: {how}, an estimate)"


def _prompt_line(prompts: dict[str, Any]) -> str:
    """The spec's prompt tokens against the target's tokenizer (see
    :mod:`loragate.loadtest.prompt_tokens`)."""
    words = prompts["words"]
    if prompts["target_tokens"] is None:
        why = prompts["not_measured"]
        return f"prompts   one word per spec token, not measured by the target ({why})"
    context = prompts["max_model_len"]
    ctx = f", context {context} tokens" if context is not None else ""
    return (
        f"prompts   {words} spec tokens (words) are {prompts['target_tokens']} tokens for the "
        f"target's tokenizer ({prompts['tokens_per_word']:.2f} per word, POST /tokenize{ctx})"
    )


def _row_lines(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """One aligned line per ``(name, row)`` of :func:`_row`."""
    width = max(len(name) for name, _ in rows)
    return [
        f"  {name:<{width}}  {row['requests']:>6} sent  {row['ok']:>6} ok  "
        f"{row['failed']:>5} failed  TTFT p50 {_f(row['ttft_ms']['p50'])}  "
        f"p99 {_f(row['ttft_ms']['p99'])}"
        for name, row in rows
    ]


def format_text(summary: dict[str, Any]) -> str:
    """The summary as the lines ``loragate loadtest`` prints."""
    req, rate = summary["requests"], summary["rate"]
    errs = req["errors_by_type"]
    why = f" ({', '.join(f'{k}: {v}' for k, v in errs.items())})" if errs else ""
    n = req["unanswered"]
    unsent = f", unanswered {n} ({req['unanswered_why']})" if n else ""
    offered, sent_rps, ok_rps = (
        "n/a" if rate[k] is None else f"{rate[k]:.2f} req/s"
        for k in ("offered_rps", "sent_rps", "ok_rps")
    )
    spec_mean = f"spec mean {rate['spec_rps']:.2f}"
    if rate.get("not_measured"):
        offered_text = f"offered n/a ({rate['not_measured']}; {spec_mean})"
    else:
        offered_text = f"offered {offered} over {_secs(rate['window_s'])} ({spec_mean})"
    lag = rate["send_lag_ms"]
    ttft, e2e = summary["ttft_ms"], summary["e2e_ms"]
    tps = summary["output_tokens_per_s"]
    lines = [
        f"requests  sent {req['sent']}, ok {req['ok']}, failed {req['failed']}{why}{unsent}",
        f"rate      {offered_text}, sent {sent_rps}, ok {ok_rps} over {_secs(rate['elapsed_s'])}",
        f"send lag  p50 {_f(lag['p50'])}  p99 {_f(lag['p99'])} (sent after the scheduled time)",
        f"TTFT      p50 {_f(ttft['p50'])}  p90 {_f(ttft['p90'])}  p99 {_f(ttft['p99'])}",
        f"E2E       p50 {_f(e2e['p50'])}  p90 {_f(e2e['p90'])}  p99 {_f(e2e['p99'])}",
        f"tokens    {summary['output_tokens']} output tokens, "
        f"{'-' if tps is None else f'{tps:.1f}'} tok/s{_estimated(summary)}",
    ]
    prompts = summary.get("prompt_tokens")
    if prompts:
        lines.append(_prompt_line(prompts))
    reasons = summary["answers"]["finish_reasons"]
    if set(reasons) - {"length"}:  # with ignore_eos every answer runs to max_tokens
        counts = ", ".join(f"{k} {v}" for k, v in reasons.items())
        lines.append(f"finished  {counts} (finish_reason of the answers that succeeded)")
    models = summary["models"]
    if models["top"]:
        shown = len(models["top"])
        lines.append(f"models    top {shown} of {models['count']} by requests:")
        lines.extend(_row_lines([(row["model"], row) for row in models["top"]]))
    replicas = summary.get("replicas")
    if replicas and replicas["count"] > 1:
        lines.append(f"replicas  {replicas['count']} served (the gateway's X-Loragate-Replica):")
        lines.extend(_row_lines([(row["replica"] or "(none)", row) for row in replicas["rows"]]))
    for sample in summary["error_samples"]:
        lines.append(f"error     {sample['count']} x {sample['error']}")
    return "\n".join(lines)
