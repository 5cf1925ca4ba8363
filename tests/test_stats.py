import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from loraplace.analysis.stats import DEFAULT_METRICS, aggregate, holm, t_interval


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
    assert len(table.columns) == 2 + 4 * len(DEFAULT_METRICS)


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
