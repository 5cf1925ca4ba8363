"""Per-strategy summaries over seeds, and Holm's correction.

    from loraplace.analysis import stats

    table = stats.aggregate(summary)  # one row per strategy, mean/std/t-interval
    stats.holm([0.01, 0.04, 0.03])    # [0.03, 0.06, 0.06]

The comparisons between strategies live in compare.py (the two-level test in levels.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

DEFAULT_METRICS = ("eval_loss", "perplexity", "train_time_s", "peak_memory_mb",
                   "eval_loss_all_tokens", "rouge_l", "exact_match")  # fmt: skip


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
