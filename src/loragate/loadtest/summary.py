"""The summary of a load test: counts, rates, latency percentiles, per-model rows, errors.

Latencies are of successful requests only (a 401 answered in 1 ms is no latency figure);
percentiles are nearest-rank. Rates: ``spec_rps`` is the spec's mean rate (after any
scaling), ``offered_rps`` the rate of the stream this run drew from it (requests scheduled over
the arrival window: a bursty spec over a short run draws more or fewer than the mean),
``sent_rps`` what the client achieved (requests sent over the send window, which grows past the
arrival window when sends lag), ``ok_rps`` successful requests over the whole run, drain
included.

Output tokens are the servers' usage counts where they sent usage; where not, the estimate each
request states (``tokens_source``: content chunks of a stream, words of a JSON answer), summed
in ``output_tokens_by_source`` and counted in ``answers.without_usage``, so a figure that is
partly estimated says so.
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
) -> dict[str, Any]:
    """The summary of ``results`` (every request sent); ``window_s``: the arrival window
    (requests are scheduled in it); ``unanswered``: requests the workload scheduled that have no
    result (``unanswered_why``: not sent before the deadline, or cut by Ctrl-C); they count as
    failures."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    last_sent_s = max((r.sent_s for r in results), default=0.0)
    send_window_s = max(window_s, last_sent_s)
    lags = [max(0.0, r.sent_s - r.scheduled_s) for r in results]
    tokens = sum(r.output_tokens for r in ok)
    by_source: Counter[str] = Counter()
    for r in ok:
        by_source[r.tokens_source] += r.output_tokens
    samples = Counter(f"{_error_key(r)}: {r.error}" for r in failed)
    return {
        "requests": {
            "scheduled": len(results) + unanswered,
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
            "offered_rps": round((len(results) + unanswered) / window_s, 4)
            if window_s > 0
            else None,
            "sent_rps": round(len(results) / send_window_s, 4) if send_window_s > 0 else None,
            "ok_rps": round(len(ok) / elapsed_s, 4) if elapsed_s > 0 else None,
            "window_s": round(window_s, 3),
            "send_window_s": round(send_window_s, 3),
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
        "error_samples": [{"count": n, "error": text[:300]} for text, n in samples.most_common(5)],
    }


def _per_model(results: Sequence[RequestResult], top: int) -> dict[str, Any]:
    by_model: dict[str, list[RequestResult]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(r)
    ranked = sorted(by_model.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    rows = []
    for model, rs in ranked[:top]:
        ok = [r for r in rs if r.ok]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        rows.append(
            {
                "model": model,
                "requests": len(rs),
                "ok": len(ok),
                "failed": len(rs) - len(ok),
                "ttft_ms": _ms(ttfts, (50, 99)),
            }
        )
    return {"count": len(by_model), "top": rows}


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


def format_text(summary: dict[str, Any]) -> str:
    """The summary as the lines ``loragate loadtest`` prints."""
    req, rate = summary["requests"], summary["rate"]
    errs = req["errors_by_type"]
    why = f" ({', '.join(f'{k}: {v}' for k, v in errs.items())})" if errs else ""
    n = req["unanswered"]
    unsent = f", unanswered {n} ({req['unanswered_why']})" if n else ""
    offered, sent_rps, ok_rps = (
        "-" if rate[k] is None else f"{rate[k]:.2f}" for k in ("offered_rps", "sent_rps", "ok_rps")
    )
    lag = rate["send_lag_ms"]
    ttft, e2e = summary["ttft_ms"], summary["e2e_ms"]
    tps = summary["output_tokens_per_s"]
    lines = [
        f"requests  sent {req['sent']}, ok {req['ok']}, failed {req['failed']}{why}{unsent}",
        f"rate      offered {offered} req/s over {rate['window_s']:.1f} s (spec mean "
        f"{rate['spec_rps']:.2f}), sent {sent_rps} req/s, ok {ok_rps} req/s over "
        f"{rate['elapsed_s']:.1f} s",
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
        width = max(len(row["model"]) for row in models["top"])
        for row in models["top"]:
            t = row["ttft_ms"]
            lines.append(
                f"  {row['model']:<{width}}  {row['requests']:>6} sent  {row['ok']:>6} ok  "
                f"{row['failed']:>5} failed  TTFT p50 {_f(t['p50'])}  p99 {_f(t['p99'])}"
            )
    for sample in summary["error_samples"]:
        lines.append(f"error     {sample['count']} x {sample['error']}")
    return "\n".join(lines)
