"""Strategy comparisons for one metric: the two-level test, its variance components, a plan.

    from loraplace.analysis import compare, metrics

    found = metrics.per_example(results, metrics.METRICS[0])     # eval loss
    result = compare.compare(found, reference=None, smallest_effect=0.01)
    print(result.table[["strategy_a", "strategy_b", "mean_diff", "p_adjusted", "verdict"]])

A positive `mean_diff` means strategy_a has the higher value (for a loss: strategy_b is
better). It is the difference of the two strategies' means in the results table (for eval
loss: token-weighted over the examples, averaged over seeds). The headline test
(`p_value`, `p_adjusted`, `ci_*`, levels.py) generalises to new training seeds and new
evaluation examples; the `adapters_*` columns test the same difference for these trained
adapters on new examples only. p-values are Holm-adjusted across the rows of the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from loraplace.analysis import levels
from loraplace.analysis.metrics import PerExample
from loraplace.analysis.power import MAX_SEEDS, Components, Plan, plan
from loraplace.analysis.stats import holm

ALPHA = 0.05
POWER = 0.8
TWO_LEVEL = "across training seeds and evaluation examples"
ADAPTERS = "for these trained adapters, on new evaluation examples"

COMPARISON_COLUMNS = (
    "metric strategy_a strategy_b mean_diff ci_low ci_high p_value p_adjusted df seeds_a seeds_b"
    " n_examples se_seed se_example seeds_needed examples_needed verdict adapters_ci_low"
    " adapters_ci_high adapters_p_value adapters_p_adjusted adapters_verdict"
).split()


@dataclass(frozen=True)
class Comparison:
    """One metric's comparisons, its variance components and the power plan at the smallest
    effect of interest (`delta`, in the metric's units)."""

    found: PerExample
    table: pd.DataFrame
    components: Components
    plan: Plan
    delta: float
    smallest_effect: float
    alpha: float  # the level each comparison's plan aims at (Bonferroni over the table)

    @property
    def n_examples(self) -> int:
        return next(iter(self.found.values.values())).shape[1]


def pairs(strategies: list[str], reference: str | None) -> list[tuple[str, str]]:
    """Each strategy against the reference, or every pair in display order."""
    if reference is not None:
        return [(s, reference) for s in strategies if s != reference]
    return list(combinations(strategies, 2))


def components(found: PerExample) -> Components:
    """The variance components of `found`, pooled over its strategies (seed, residual) and
    over every pair of them (interaction); per-example variances are on one example's scale
    (their weighted share divided by sum w^2)."""
    values = list(found.values.values())
    n = values[0].shape[1]
    w = levels.normalised(found.weights, n)
    s2 = (w**2).sum()
    groups = [levels.group(v, w) for v in values]
    many = [g for g in groups if g.n_runs > 1]
    df = sum(g.n_runs - 1 for g in many)
    if df:
        run_var = sum((g.n_runs - 1) * g.run_var for g in many) / df
        resid = sum((g.n_runs - 1) * g.resid for g in many) / df
        seed, residual = max(0.0, float(run_var - resid)), float(resid / s2)
    else:
        seed = residual = math.nan
    two = [v for v in values if v.shape[0] > 1]  # a single run's residual is not known
    inter = [levels.contrast([a, b], [1, -1], found.weights) for a, b in combinations(two, 2)]
    interaction = float(np.mean([c.var_example for c in inter]) / s2) if inter else math.nan
    # example difficulty: the spread of the examples' means over strategies, net of what the
    # strategy x example and the residual add to it where they are known
    means = np.mean([g.example_means for g in groups], axis=0)
    spread = float(levels.unbias(w) * (w**2 * (means - w @ means) ** 2).sum() / s2)
    k = len(groups)
    share = interaction / 2 / k + residual * sum(1 / g.n_runs for g in groups) / k**2
    difficulty = max(0.0, spread - share) if math.isfinite(share) else spread
    return Components(seed, residual, interaction, difficulty, df, len(inter))


def compare(
    found: PerExample, reference: str | None = None, smallest_effect: float = 0.01
) -> Comparison:
    """Compare the strategies of one metric (`reference`: each against it; else all pairs).

    Args:
        found: The metric's per-example values by strategy.
        reference: A strategy to compare every other one with, or None for all pairs.
        smallest_effect: The smallest relative difference of interest for the power plan
            (0.01: 1 % of the metric's mean over the compared strategies).

    Returns:
        The `Comparison`; its table has one row per pair, columns COMPARISON_COLUMNS.
    """
    names = list(found.values)
    chosen = pairs(names, reference if reference in names else None)
    comp = components(found)
    n = next(iter(found.values.values())).shape[1]
    w = levels.normalised(found.weights, n)
    mean = float(np.mean([v.mean(axis=0) @ w for v in found.values.values()]))
    delta = abs(smallest_effect * mean)
    alpha = ALPHA / max(1, len(chosen))  # Bonferroni: what Holm asks of the hardest row
    concentration = n * float((w**2).sum())
    rows, plans = [], []
    for a, b in chosen:
        row, needed = _row(found, a, b, comp, delta, alpha, concentration)
        rows.append(row)
        plans.append(needed)
    table = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if "verdict" not in c])
    table["p_adjusted"] = holm(table["p_value"].tolist())
    table["adapters_p_adjusted"] = holm(table["adapters_p_value"].tolist())
    for col in ("seeds_needed", "examples_needed"):
        table[col] = pd.array(table[col].tolist(), dtype="Int64")
    metric = found.metric
    table["verdict"] = [
        _verdict(r, metric, smallest_effect, p)
        for r, p in zip(table.itertuples(), plans, strict=True)
    ]
    table["adapters_verdict"] = [_adapters_verdict(r, metric) for r in table.itertuples()]
    fewest = min(v.shape[0] for v in found.values.values())
    study_plan = plan(comp, delta, alpha, concentration, n, fewest, POWER)
    return Comparison(
        found, table[COMPARISON_COLUMNS], comp, study_plan, delta, smallest_effect, alpha
    )


def _row(found: PerExample, a: str, b: str, comp: Components, delta, alpha, concentration):
    est = levels.contrast([found.values[a], found.values[b]], [1, -1], found.weights)
    d, var = float(est.estimate), float(est.var)
    ci = levels.interval(d, var, est.df) if math.isfinite(var) else (math.nan, math.nan)
    adapters_ci = levels.interval(d, est.var_adapters, est.df_example)
    pair = Components(
        comp.seed, comp.residual, float(est.var_example / (levels.normalised(found.weights,
        est.n_examples) ** 2).sum()), comp.difficulty, comp.seed_df, 1,
    )  # fmt: skip
    k = min(found.values[a].shape[0], found.values[b].shape[0])
    needed = plan(pair, delta, alpha, concentration, est.n_examples, k, POWER)
    return {
        "metric": found.metric.name,
        "strategy_a": a,
        "strategy_b": b,
        "mean_diff": d,
        "ci_low": float(ci[0]),
        "ci_high": float(ci[1]),
        "p_value": float(levels.two_level_p(est)),
        "df": float(est.df),
        "seeds_a": found.values[a].shape[0],
        "seeds_b": found.values[b].shape[0],
        "n_examples": est.n_examples,
        "se_seed": math.sqrt(est.var_seed) if math.isfinite(est.var_seed) else math.nan,
        "se_example": math.sqrt(est.var_example),
        "seeds_needed": needed.seeds_at_current,
        "examples_needed": needed.examples_at_current,
        "adapters_ci_low": float(adapters_ci[0]),
        "adapters_ci_high": float(adapters_ci[1]),
        "adapters_p_value": float(levels.adapters_p(est)),
    }, needed


def better_worse(row, metric) -> tuple[str, str]:
    """(the better strategy, the worse) by the sign of mean_diff and the metric's direction."""
    a_higher = row.mean_diff > 0
    return (row.strategy_b, row.strategy_a) if a_higher == metric.lower_is_better else (
        row.strategy_a, row.strategy_b)  # fmt: skip


def resolved_text(row, metric, level: str) -> str:
    """'B has lower eval loss than A <level>'."""
    better, worse = better_worse(row, metric)
    way = "lower" if metric.lower_is_better else "higher"
    return f"{better} has {way} {metric.label} than {worse} {level}"


def one_seed(row) -> list[str]:
    """The strategies of a row with fewer than two seeds."""
    return [s for s, k in ((row.strategy_a, row.seeds_a), (row.strategy_b, row.seeds_b)) if k < 2]


def plan_text(found_plan: Plan, n_examples: int, n_seeds: int, what: str) -> str:
    """'at these 40 examples, 7 seeds per strategy would detect {what} (at 3 seeds, 900
    examples would)'; '' where not measured."""
    if not found_plan.known:
        return ""
    seeds, examples = found_plan.seeds_at_current, found_plan.examples_at_current
    if seeds is not None:
        first = f"at these {n_examples:,} examples, {seeds} seeds per strategy would detect {what}"
    else:
        first = (
            f"at these {n_examples:,} examples no number of seeds up to {MAX_SEEDS} per "
            f"strategy would detect {what}"
        )
    if n_seeds < 2:
        return first
    if examples is not None:
        return first + f" (at {n_seeds} seeds, {examples:,} examples would)"
    return first + f" (at {n_seeds} seeds no number of examples would: the seeds vary too much)"


def _verdict(row, metric, smallest_effect: float, needed: Plan) -> str:
    if one_seed(row):
        who = " and ".join(one_seed(row))
        return (
            f"no verdict on {metric.label} {TWO_LEVEL}: {who} ran one seed, and the "
            "seed-to-seed variance needs two or more"
        )
    if row.p_adjusted < ALPHA:
        return resolved_text(row, metric, TWO_LEVEL)
    text = f"{metric.label} not resolved {TWO_LEVEL}"
    seeds = min(row.seeds_a, row.seeds_b)
    what = (
        f"a {smallest_effect * 100:g} % difference in {metric.label} with {POWER * 100:g} % power"
    )
    more = plan_text(needed, row.n_examples, seeds, what)
    return text + ("; " + more if more else "")


def _adapters_verdict(row, metric) -> str:
    if row.adapters_p_adjusted < ALPHA:
        return resolved_text(row, metric, ADAPTERS)
    return f"{metric.label} not resolved {ADAPTERS}"
