"""Statistics for a LoRA placement study: several strategies x several seeds.

Every run is evaluated on the same N examples, so two strategies can be compared
example by example (paired), pooling seeds by averaging them per example.

    from loraplace.analysis import stats

    table = stats.aggregate(summary)  # one row per strategy, mean/std/t-interval
    # per_example[(strategy, seed)] = per-example mean eval loss, shape (N,)
    comparisons = stats.compare_strategies(per_example, ["attn", "mlp", "all"], reference="all")
    print(comparisons[["strategy_a", "strategy_b", "mean_diff", "p_adjusted", "verdict"]])

A positive ``mean_diff`` means strategy_a has the higher loss (strategy_b is better).
p-values come from a Wilcoxon signed-rank test over examples and are Holm-adjusted
across the rows of one comparison table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

DEFAULT_METRICS = ("eval_loss", "perplexity", "train_time_s", "peak_memory_mb")
COMPARISON_COLUMNS = (
    "strategy_a strategy_b mean_diff ci_low ci_high p_value p_adjusted"
    " n_examples n_seeds effect_size examples_needed verdict"
).split()


def t_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """Mean, sample std and Student-t confidence interval of the values.

    Args:
        values: Observations; NaN values are dropped.
        confidence: Coverage of the interval.

    Returns:
        ``(mean, std, ci_low, ci_high)`` with ``std`` using ddof=1. With one value
        only the mean is defined (the rest are NaN); with none, all are NaN.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    if std == 0:
        return mean, 0.0, mean, mean
    low, high = sps.t.interval(confidence, df=x.size - 1, loc=mean, scale=std / math.sqrt(x.size))
    return mean, std, float(low), float(high)


def aggregate(summary: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
    """Summarise runs per strategy over seeds.

    Args:
        summary: One row per run with ``strategy``, ``seed``, optionally ``status``
            (only ``"ok"`` rows count) and the metric columns.
        metrics: Metric columns to summarise.

    Returns:
        One row per strategy, in order of first appearance, with ``strategy``,
        ``n_seeds`` and ``{m}_mean``, ``{m}_std``, ``{m}_ci_low``, ``{m}_ci_high``.
        Strategies whose runs all failed get ``n_seeds`` 0 and NaN values.
    """
    good = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    rows = []
    for strategy in pd.unique(summary["strategy"]):
        runs = good[good["strategy"] == strategy]
        row: dict[str, object] = {"strategy": strategy, "n_seeds": len(runs)}
        for m in metrics:
            values = runs[m] if m in runs.columns else []
            stats = t_interval(values)
            for suffix, value in zip(("mean", "std", "ci_low", "ci_high"), stats, strict=True):
                row[f"{m}_{suffix}"] = value
        rows.append(row)
    columns = ["strategy", "n_seeds"] + [
        f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci_low", "ci_high")
    ]
    return pd.DataFrame(rows, columns=columns)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values.

    Args:
        p_values: Raw p-values; NaN entries stay NaN and do not count in m.

    Returns:
        Adjusted p-values (monotone in the raw order, capped at 1), input order.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = order.size
    scaled = p[order] * (m - np.arange(m))
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def examples_needed(d: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Examples a paired two-sided test needs to detect the observed effect.

    Uses the normal approximation ``n = ((z_{1-alpha/2} + z_power) / dz)^2`` with
    ``dz = mean(d) / std(d, ddof=1)``, rounded up, and at least the smallest n at which an
    exact two-sided Wilcoxon test can reach ``alpha`` at all (2 / 2^n < alpha).

    Args:
        d: Per-example differences.
        alpha: Two-sided significance level.
        power: Desired power.

    Returns:
        The number of examples, or None when the effect size is 0 or undefined.
    """
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return None
    mean, std = float(d.mean()), float(d.std(ddof=1))
    if mean == 0 or math.isnan(mean) or math.isnan(std):
        return None
    floor = max(2, math.floor(math.log2(2 / alpha)) + 1)  # Wilcoxon's smallest p is 2 / 2^n
    if std == 0:
        return floor
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return max(floor, math.ceil((z * std / mean) ** 2))


def paired_comparison(
    losses_a: np.ndarray,
    losses_b: np.ndarray,
    n_boot: int = 10000,
    rng_seed: int = 0,
    confidence: float = 0.95,
    alpha: float = 0.05,
) -> dict:
    """Compare two strategies example by example, pooling seeds per example.

    Args:
        losses_a: Per-example losses of strategy a, shape (n_seeds, n_examples).
        losses_b: Same for strategy b, rows aligned by seed, columns by example.
        n_boot: Bootstrap resamples of the examples.
        rng_seed: Seed of the bootstrap generator.
        confidence: Coverage of the percentile bootstrap interval.
        alpha: Significance level the power estimate (``examples_needed``) aims at.

    Returns:
        Dict with ``mean_diff`` (mean of a - b; positive means b is better),
        ``ci_low``, ``ci_high``, ``p_value`` (Wilcoxon signed-rank), ``n_examples``,
        ``n_seeds``, ``effect_size`` and ``examples_needed``.
    """
    a = np.atleast_2d(np.asarray(losses_a, dtype=float))
    b = np.atleast_2d(np.asarray(losses_b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    d = (a - b).mean(axis=0)
    n = d.size
    mean_diff = float(d.mean()) if n else math.nan
    ci_low = ci_high = math.nan
    if n >= 2:
        boot = sps.bootstrap(
            (d,),
            np.mean,
            n_resamples=n_boot,
            method="percentile",
            confidence_level=confidence,
            random_state=np.random.default_rng(rng_seed),
        )
        ci_low, ci_high = map(float, boot.confidence_interval)
    if n and np.all(d == 0):
        p_value = 1.0
    elif n:
        p_value = float(sps.wilcoxon(d).pvalue)
    else:
        p_value = math.nan
    std = float(d.std(ddof=1)) if n >= 2 else math.nan
    return {
        "mean_diff": mean_diff,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "n_examples": n,
        "n_seeds": a.shape[0],
        "effect_size": mean_diff / std if std > 0 else math.nan,
        "examples_needed": examples_needed(d, alpha),
    }


def _verdict(a: str, b: str, mean_diff: float, p_adjusted: float, needed: int | None) -> str:
    """Plain-English reading of one comparison row."""
    if p_adjusted < 0.05:
        better, worse = (b, a) if mean_diff > 0 else (a, b)
        return f"{better} has lower eval loss than {worse}"
    if needed is None:
        return "not resolved at this sample size"
    return (
        f"not resolved at this sample size (about {needed} examples would give 80% power "
        "for the observed effect at the corrected level)"
    )


def compare_strategies(
    per_example: dict[tuple[str, int], np.ndarray],
    strategies: list[str],
    reference: str | None = None,
    n_boot: int = 10000,
) -> pd.DataFrame:
    """Paired comparisons between strategies, Holm-adjusted across the table.

    Args:
        per_example: ``(strategy, seed) -> per-example losses``, all the same length.
        strategies: Strategies to compare, in display order.
        reference: If given, compare every other strategy (a) against it (b);
            otherwise compare every pair ``(strategies[i], strategies[j])``, i < j.
        n_boot: Bootstrap resamples per comparison.

    Returns:
        One row per compared pair with columns ``COMPARISON_COLUMNS``. Pairs with
        no seed in common are skipped.
    """
    if reference is not None:
        pairs = [(s, reference) for s in strategies if s != reference]
    else:
        pairs = list(combinations(strategies, 2))
    rows = []
    alpha = 0.05 / max(1, len(pairs))  # Bonferroni level: what Holm asks of the hardest pair
    for a, b in pairs:
        seeds_a = {seed for strategy, seed in per_example if strategy == a}
        seeds_b = {seed for strategy, seed in per_example if strategy == b}
        seeds = sorted(seeds_a & seeds_b)
        if not seeds:
            continue
        losses_a = np.stack([per_example[(a, s)] for s in seeds])
        losses_b = np.stack([per_example[(b, s)] for s in seeds])
        rows.append(
            {
                "strategy_a": a,
                "strategy_b": b,
                **paired_comparison(losses_a, losses_b, n_boot, alpha=alpha),
            }
        )
    table = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "verdict"])
    table["p_adjusted"] = holm(table["p_value"].tolist())
    table["examples_needed"] = pd.array(table["examples_needed"].tolist(), dtype="Int64")
    table["verdict"] = [
        _verdict(r.strategy_a, r.strategy_b, r.mean_diff, r.p_adjusted, _or_none(r.examples_needed))
        for r in table.itertuples()
    ]
    return table[COMPARISON_COLUMNS]


def _or_none(value: object) -> int | None:
    """An integer, or None for a missing value."""
    return None if pd.isna(value) else int(value)
