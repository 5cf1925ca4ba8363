import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from loraplace.analysis.stats import (
    COMPARISON_COLUMNS,
    aggregate,
    compare_strategies,
    examples_needed,
    holm,
    paired_comparison,
    t_interval,
)

N_BOOT = 2000


def test_t_interval_matches_scipy():
    values = [2.1, 2.5, 1.9, 2.8, 2.2]
    mean, std, low, high = t_interval(values, confidence=0.9)
    x = np.array(values)
    exp_low, exp_high = sps.t.interval(0.9, df=4, loc=x.mean(), scale=sps.sem(x))
    assert mean == pytest.approx(2.3)
    assert std == pytest.approx(x.std(ddof=1))
    assert (low, high) == pytest.approx((exp_low, exp_high))
    assert low < mean < high


def test_t_interval_drops_nan_and_degenerate_cases():
    assert t_interval([1.0, math.nan, 3.0])[:2] == pytest.approx((2.0, math.sqrt(2)))
    mean, *rest = t_interval([4.0, math.nan])
    assert mean == 4.0 and all(math.isnan(v) for v in rest)
    assert all(math.isnan(v) for v in t_interval([]))
    assert all(math.isnan(v) for v in t_interval([math.nan]))


def test_aggregate_excludes_failed_runs_and_keeps_order():
    summary = pd.DataFrame(
        {
            "strategy": ["mlp", "attn", "attn", "mlp", "attn", "dead"],
            "seed": [0, 0, 1, 1, 2, 0],
            "status": ["ok", "ok", "ok", "ok", "failed", "failed"],
            "eval_loss": [1.0, 2.0, 2.4, 1.2, 99.0, 5.0],
        }
    )
    table = aggregate(summary, metrics=("eval_loss",))
    assert list(table.columns) == [
        "strategy",
        "n_seeds",
        "eval_loss_mean",
        "eval_loss_std",
        "eval_loss_ci_low",
        "eval_loss_ci_high",
    ]
    assert table["strategy"].tolist() == ["mlp", "attn", "dead"]
    assert table["n_seeds"].tolist() == [2, 2, 0]
    attn = table.set_index("strategy").loc["attn"]
    assert attn["eval_loss_mean"] == pytest.approx(2.2)
    assert attn["eval_loss_std"] == pytest.approx(np.std([2.0, 2.4], ddof=1))
    low, high = sps.t.interval(0.95, df=1, loc=2.2, scale=sps.sem([2.0, 2.4]))
    assert (attn["eval_loss_ci_low"], attn["eval_loss_ci_high"]) == pytest.approx((low, high))
    assert table.iloc[2, 2:].isna().all()


def test_aggregate_without_status_counts_all_rows_and_default_metrics():
    summary = pd.DataFrame(
        {
            "strategy": ["a", "a", "a"],
            "seed": [0, 1, 2],
            "eval_loss": [1.0, 2.0, 3.0],
            "perplexity": [2.0, 4.0, 6.0],
            "train_time_s": [10.0, 10.0, 10.0],
            "peak_memory_mb": [100.0, 100.0, 100.0],
        }
    )
    table = aggregate(summary)
    assert table["n_seeds"].tolist() == [3]
    assert table.loc[0, "perplexity_mean"] == pytest.approx(4.0)
    assert table.loc[0, "train_time_s_std"] == 0.0
    assert table.loc[0, "train_time_s_ci_low"] == table.loc[0, "train_time_s_ci_high"] == 10.0
    assert len(table.columns) == 2 + 4 * 4


def test_holm_hand_computed():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_holm_nan_not_counted():
    adjusted = holm([0.01, math.nan, 0.04])
    assert math.isnan(adjusted[1])
    assert [adjusted[0], adjusted[2]] == pytest.approx([0.02, 0.04])


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).uniform(0, 0.2, size=12)
    expected = multitest.multipletests(p, method="holm")[1]
    assert holm(p.tolist()) == pytest.approx(expected.tolist())


def test_examples_needed_hand_computed():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    # mean 0.5, std 1 -> dz 0.5 -> (2.8016 / 0.5)^2 = 31.4 -> 32
    assert examples_needed(np.array([-0.5, 0.5, 1.5])) == math.ceil((z / 0.5) ** 2) == 32
    # dz 2 -> 1.96 by the normal formula, but an exact Wilcoxon test needs 2 / 2^n < 0.05: n >= 6
    assert examples_needed(np.array([1.0, 2.0, 3.0])) == 6
    assert examples_needed(np.array([1.0, 2.0, 3.0]), alpha=0.005) == 9  # 2 / 2^9 < 0.005 < 2 / 2^8
    assert examples_needed(np.array([-1.0, 0.0, 1.0])) is None
    assert examples_needed(np.array([1.0])) is None


def _losses(seed: int, shift: float, noise: float, n_seeds: int = 3, n_examples: int = 40):
    rng = np.random.default_rng(seed)
    a = rng.normal(2.0, 0.3, size=(n_seeds, n_examples))
    b = a - shift + rng.normal(0.0, noise, size=a.shape)
    return a, b


def test_paired_comparison_matches_scipy_and_is_deterministic():
    a, b = _losses(1, shift=0.05, noise=0.2)
    result = paired_comparison(a, b, n_boot=N_BOOT, rng_seed=7)
    d = (a - b).mean(axis=0)
    assert result["p_value"] == pytest.approx(sps.wilcoxon(d).pvalue)
    assert result["mean_diff"] == pytest.approx(d.mean())
    assert result["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert result["examples_needed"] == examples_needed(d)
    assert (result["n_examples"], result["n_seeds"]) == (40, 3)
    assert result["ci_low"] < result["mean_diff"] < result["ci_high"]
    assert paired_comparison(a, b, n_boot=N_BOOT, rng_seed=7) == result
    other = paired_comparison(a, b, n_boot=N_BOOT, rng_seed=8)
    assert (other["ci_low"], other["ci_high"]) != (result["ci_low"], result["ci_high"])


def test_paired_comparison_all_zero_differences():
    a = np.ones((2, 5))
    result = paired_comparison(a, a.copy(), n_boot=N_BOOT)
    assert result["p_value"] == 1.0
    assert result["mean_diff"] == 0.0
    assert math.isnan(result["effect_size"])
    assert result["examples_needed"] is None


def test_strong_effect_resolved():
    a, b = _losses(2, shift=0.5, noise=0.05)
    per_example = {("base", s): a[s] for s in range(3)} | {("good", s): b[s] for s in range(3)}
    table = compare_strategies(per_example, ["base", "good"], reference="good", n_boot=N_BOOT)
    assert list(table.columns) == COMPARISON_COLUMNS
    row = table.iloc[0]
    assert (row["strategy_a"], row["strategy_b"]) == ("base", "good")
    assert row["mean_diff"] == pytest.approx(0.5, abs=0.05)
    assert row["p_adjusted"] < 0.05
    assert row["verdict"] == "good has lower eval loss than base"


def test_null_effect_not_resolved():
    rng = np.random.default_rng(4)
    per_example = {(name, s): rng.normal(2.0, 0.3, size=40) for name in "ab" for s in range(3)}
    table = compare_strategies(per_example, ["a", "b"], n_boot=N_BOOT)
    row = table.iloc[0]
    assert row["p_adjusted"] >= 0.05
    assert row["verdict"].startswith("not resolved at this sample size")
    assert row["verdict"] == (
        f"not resolved at this sample size (about {row['examples_needed']} examples would give "
        "80% power for the observed effect at the corrected level)"
    )


def test_reference_vs_all_pairs_row_counts_and_holm():
    rng = np.random.default_rng(5)
    names = ["x", "y", "z"]
    per_example = {(n, s): rng.normal(2.0, 0.3, size=20) for n in names for s in range(2)}
    ref = compare_strategies(per_example, names, reference="z", n_boot=N_BOOT)
    assert list(zip(ref["strategy_a"], ref["strategy_b"], strict=True)) == [("x", "z"), ("y", "z")]
    pairs = compare_strategies(per_example, names, n_boot=N_BOOT)
    assert list(zip(pairs["strategy_a"], pairs["strategy_b"], strict=True)) == [
        ("x", "y"),
        ("x", "z"),
        ("y", "z"),
    ]
    assert pairs["p_adjusted"].tolist() == pytest.approx(holm(pairs["p_value"].tolist()))
    assert (pairs["n_seeds"] == 2).all() and (pairs["n_examples"] == 20).all()


def test_only_common_seeds_used_and_disjoint_pairs_skipped():
    rng = np.random.default_rng(6)
    per_example = {
        ("a", 0): rng.normal(size=10),
        ("a", 1): rng.normal(size=10),
        ("b", 1): rng.normal(size=10),
        ("b", 2): rng.normal(size=10),
        ("c", 5): rng.normal(size=10),
    }
    table = compare_strategies(per_example, ["a", "b", "c"], n_boot=N_BOOT)
    assert list(zip(table["strategy_a"], table["strategy_b"], strict=True)) == [("a", "b")]
    assert table.loc[0, "n_seeds"] == 1
    d = per_example[("a", 1)] - per_example[("b", 1)]
    assert table.loc[0, "mean_diff"] == pytest.approx(d.mean())
    assert table.loc[0, "p_adjusted"] == pytest.approx(table.loc[0, "p_value"])
    empty = compare_strategies(per_example, ["a", "c"], n_boot=N_BOOT)
    assert empty.empty and list(empty.columns) == COMPARISON_COLUMNS
