"""Comparisons of one metric (analysis/compare.py), the power plan (power.py) and how a
metric is read from results (metrics.py): synthetic per-example values, no training."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from synthetic import losses

from loraplace.analysis import levels
from loraplace.analysis.compare import COMPARISON_COLUMNS, compare
from loraplace.analysis.metrics import METRICS, PerExample, per_example
from loraplace.analysis.power import MAX_EXAMPLES, Components, design, plan, power
from loraplace.analysis.stats import holm
from loraplace.core.errors import UserError

LOSS, ROUGE = METRICS[0], METRICS[1]


def study(shifts: dict[str, float], seeds: dict[str, int], examples=30, seed_sd=0.01, rng=0):
    return losses(shifts, seeds, examples, seed_sd, rng)


def found(values, metric=LOSS, weights=None) -> PerExample:
    seeds = {s: list(range(v.shape[0])) for s, v in values.items()}
    return PerExample(metric, values, seeds, weights, 0)


def test_a_clear_difference_is_resolved_with_its_level_named():
    values = study({"base": 0.3, "good": 0.0}, {"base": 3, "good": 3})
    result = compare(found(values), reference="good")
    assert list(result.table.columns) == COMPARISON_COLUMNS
    row = result.table.iloc[0]
    assert (row["strategy_a"], row["strategy_b"]) == ("base", "good")
    assert row["mean_diff"] == pytest.approx(0.3, abs=0.05)
    assert row["ci_low"] < row["mean_diff"] < row["ci_high"] and row["ci_low"] > 0
    assert row["p_adjusted"] < 0.05
    assert row["verdict"] == (
        "good has lower eval loss than base across training seeds and evaluation examples"
    )
    assert row["adapters_verdict"] == (
        "good has lower eval loss than base for these trained adapters, on new evaluation examples"
    )


def test_higher_is_better_for_a_task_metric():
    values = study({"a": 0.3, "b": 0.0}, {"a": 3, "b": 3})
    row = compare(found(values, ROUGE)).table.iloc[0]
    assert row["metric"] == "rouge_l"
    assert row["verdict"].startswith("a has higher ROUGE-L than b")


def test_no_difference_is_not_resolved_and_the_plan_is_stated():
    values = study({"a": 0.0, "b": 0.0}, {"a": 3, "b": 3}, examples=200, seed_sd=0.005, rng=4)
    result = compare(found(values), smallest_effect=0.01)
    row = result.table.iloc[0]
    assert row["p_adjusted"] >= 0.05
    assert row["verdict"].startswith(
        "eval loss not resolved across training seeds and evaluation examples; at these 200 "
        f"examples, {row['seeds_needed']} seeds per strategy would detect a 1 % difference in "
        "eval loss with 80 % power"
    )
    assert row["seeds_needed"] > 3  # more seeds than ran
    assert pd.isna(row["examples_needed"])  # these seeds vary too much for any examples to do
    assert row["verdict"].endswith(
        "(at 3 seeds no number of examples would: the seeds vary too much)"
    )
    assert result.delta == pytest.approx(0.01 * np.mean([v.mean() for v in values.values()]))


def test_a_strategy_with_one_seed_gets_no_verdict_and_no_silent_fallback():
    values = study({"a": 0.3, "b": 0.0, "c": 0.0}, {"a": 1, "b": 3, "c": 3})
    table = compare(found(values)).table.set_index(["strategy_a", "strategy_b"])
    lone = table.loc[("a", "b")]
    assert math.isnan(lone["p_value"]) and math.isnan(lone["p_adjusted"])
    assert lone["verdict"] == (
        "no verdict on eval loss across training seeds and evaluation examples: a ran one seed, "
        "and the seed-to-seed variance needs two or more"
    )
    assert lone["adapters_p_adjusted"] < 0.05  # these adapters do differ on the examples
    # Holm counts the tests that ran: b vs c alone
    assert table.loc[("b", "c"), "p_adjusted"] == pytest.approx(table.loc[("b", "c"), "p_value"])


def test_reference_and_all_pairs_and_holm_across_the_table():
    values = study({"x": 0.0, "y": 0.01, "z": 0.02}, {"x": 2, "y": 3, "z": 2})
    ref = compare(found(values), reference="z").table
    assert ref[["strategy_a", "strategy_b"]].values.tolist() == [["x", "z"], ["y", "z"]]
    pairs = compare(found(values)).table
    assert pairs[["strategy_a", "strategy_b"]].values.tolist() == [
        ["x", "y"],
        ["x", "z"],
        ["y", "z"],
    ]
    assert pairs["p_adjusted"].tolist() == pytest.approx(holm(pairs["p_value"].tolist()))
    assert pairs["seeds_a"].tolist() == [2, 2, 3] and pairs["seeds_b"].tolist() == [3, 2, 2]
    assert compare(found(values), reference="nope").table.shape[0] == 3  # unknown: all pairs


def test_the_plan_reaches_its_power_in_simulated_studies():
    """The plan's design, simulated with the components it was made from, finds the smallest
    effect in about 80 % of studies, and one example fewer would not reach 80 % by its own
    formula."""
    comp = Components(
        seed=2e-5, residual=4e-4, interaction=5e-3, difficulty=0.2, seed_df=6, pairs=1
    )
    delta, alpha = 0.02, 0.05
    found_plan = plan(comp, delta, alpha, concentration=1.0, n_examples=40, n_seeds=3)
    k, m = found_plan.options[0]
    assert power(delta, *design(comp, k, m, 1.0), alpha) >= 0.8
    assert power(delta, *design(comp, k, m - 1, 1.0), alpha) < 0.8 or m == 2
    k, m = 4, plan(comp, delta, alpha, 1.0, n_examples=40, n_seeds=4).examples_at_current
    rng = np.random.default_rng(5)
    studies = 3000
    difficulty = rng.standard_normal((studies, 1, m)) * 0.45
    groups = []
    for shift in (delta, 0.0):
        cell = np.sqrt(comp.interaction / 2) * rng.standard_normal((studies, 1, m))
        seed = np.sqrt(comp.seed) * rng.standard_normal((studies, k, 1))
        resid = np.sqrt(comp.residual) * rng.standard_normal((studies, k, m))
        groups.append(2 + difficulty + cell + seed + resid + shift)
    est = levels.contrast(groups, [1, -1])
    assert 0.74 <= np.mean(levels.two_level_p(est) < alpha) <= 0.9


def test_the_plan_says_when_seeds_alone_are_too_noisy_and_when_it_cannot_be_made():
    noisy = Components(
        seed=1e-3, residual=1e-4, interaction=1e-4, difficulty=0.1, seed_df=4, pairs=1
    )
    p = plan(noisy, delta=0.02, alpha=0.05, concentration=1.0, n_examples=50, n_seeds=3)
    assert p.examples_at_current is None  # 3 seeds: no number of examples is enough
    assert p.seeds_at_current is not None and p.seeds_at_current > 3
    unknown = Components(math.nan, math.nan, 1e-3, 0.1, seed_df=0, pairs=0)
    assert not plan(unknown, 0.02, 0.05, 1.0, 50, 1).known


def _result(strategy, seed, loss, tokens, **extra):
    sums = [v * t for v, t in zip(loss, tokens, strict=True)]
    per = {"loss_sum": sums, "tokens": tokens, "loss": loss}
    return {"strategy": strategy, "seed": seed, "status": "ok", "per_example": per, **extra}


def test_per_example_reads_losses_token_weighted_and_task_metrics_where_present():
    results = [
        _result("a", 2, [1.0, 2.0, 3.0], [10, 0, 30], task={"rouge_l": [0.1, 0.2, 0.3]}),
        _result("a", 1, [1.5, 2.0, 3.5], [10, 0, 30], task={"rouge_l": [0.2, 0.2, 0.4]}),
        _result("b", 1, [1.2, 2.0, 3.1], [10, 0, 30], task={"rouge_l": [0.3, 0.1, 0.5]}),
        {"strategy": "c", "seed": 1, "status": "failed"},
    ]
    loss = per_example(results, LOSS)
    assert list(loss.values) == ["a", "b"] and loss.seeds == {"a": [1, 2], "b": [1]}
    assert loss.dropped == 1  # no target tokens
    assert loss.values["a"].tolist() == [[1.5, 3.5], [1.0, 3.0]]  # seed order
    assert loss.weights.tolist() == [10, 30]
    rouge = per_example(results, ROUGE)
    assert rouge.weights is None and rouge.values["b"].tolist() == [[0.3, 0.1, 0.5]]
    assert per_example(results, METRICS[2]) is None  # no run has exact match


def test_runs_on_different_examples_are_one_sentence():
    results = [_result("a", 1, [1.0, 2.0], [10, 20]), _result("b", 1, [1.0, 2.0, 3.0], [10, 20, 5])]
    with pytest.raises(UserError, match="were evaluated on different examples"):
        per_example(results, LOSS)
    other_tokens = [_result("a", 1, [1.0, 2.0], [10, 20]), _result("b", 1, [1.0, 2.0], [10, 21])]
    with pytest.raises(UserError, match="other token counts"):
        per_example(other_tokens, LOSS)


def test_more_seeds_never_need_more_examples_where_power_is_near_one():
    """scipy's noncentral t gives NaN far in its tails; the plan must not read that as no
    power (it once asked 3 seeds for more examples than 2)."""
    comp = Components(seed=0.0, residual=2e-4, interaction=0.0, difficulty=0.1, seed_df=2, pairs=1)
    found_plan = plan(comp, delta=0.003, alpha=0.05 / 3, concentration=1.0, n_examples=6, n_seeds=2)
    examples = [m for _, m in found_plan.options]
    assert examples == sorted(examples, reverse=True) and examples[0] < MAX_EXAMPLES
