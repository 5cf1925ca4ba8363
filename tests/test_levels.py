"""The two-level test (analysis/levels.py): its false-positive rate under a seed spread, by
simulation of synthetic per-example losses (no training), and its agreement with a crossed
mixed model."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from loraplace.analysis import levels
from loraplace.analysis.compare import components
from loraplace.analysis.metrics import METRICS, PerExample

STUDIES = 4000  # per setting: the false-positive rate's standard error is 0.0035 at 0.05


def simulate(rng, seeds=(3, 3), examples=20, seed_sd=0.05, diff=0.0, studies=STUDIES):
    """Per-example losses of two strategies in `studies` synthetic studies, and target tokens.

    loss = 2 + difficulty (SD 0.5, shared) + strategy x example (SD 0.07) + seed (seed_sd,
    shared by a run's examples) + residual (SD 0.05 at 20 tokens, larger on short examples);
    strategy a is worse by `diff`. Tokens 5 to 79 per example, as in instruction data.
    """
    tokens = rng.integers(5, 80, size=(studies, examples)).astype(float)
    difficulty = 2 + 0.5 * rng.standard_normal((studies, 1, examples))
    values = []
    for s, k in enumerate(seeds):
        interaction = 0.07 * rng.standard_normal((studies, 1, examples))
        seed = seed_sd * rng.standard_normal((studies, k, 1))
        noise = (
            0.05 * np.sqrt(20 / tokens)[:, None, :] * rng.standard_normal((studies, k, examples))
        )
        values.append(difficulty + interaction + seed + noise + (diff if s == 0 else 0.0))
    return values, tokens


SETTINGS = [
    (seeds, sd) for seeds in [(3, 3), (2, 2), (5, 5), (2, 4), (3, 5)] for sd in (0, 0.02, 0.05)
]


@pytest.mark.parametrize(
    "seeds,seed_sd", SETTINGS, ids=[f"{a}+{b}seeds-spread{sd}" for (a, b), sd in SETTINGS]
)
def test_no_true_difference_gives_at_most_7_percent_false_positives(seeds, seed_sd):
    """Issue 28: the per-example test rejected 29 % of null studies at a seed spread of 0.05
    with 3 seeds and 20 examples. The two-level test stays near 5 % at every spread and seed
    count; the same studies show the example-only test's excess where seeds vary, so a
    headline test that dropped the seed level would fail here."""
    rng = np.random.default_rng(28 + SETTINGS.index((seeds, seed_sd)))
    (a, b), tokens = simulate(rng, seeds, seed_sd=seed_sd)
    est = levels.contrast([a, b], [1, -1], tokens)
    rate = float(np.mean(levels.two_level_p(est) < 0.05))
    assert 0.03 <= rate <= 0.07, rate
    if seed_sd == 0.05:  # the seed level dropped: the secondary test, or the example term alone
        assert np.mean(levels.adapters_p(est) < 0.05) > 0.15
        without_seeds = levels.t_test(est.estimate, est.var_example, est.df_example)
        assert np.mean(without_seeds < 0.05) > 0.15


def test_a_true_difference_is_found():
    """Not a test that never rejects: a difference of 0.1 (5 % of the loss) is found in most
    studies of 3 seeds and 20 examples at a seed spread of 0.02."""
    (a, b), tokens = simulate(np.random.default_rng(1), (3, 3), seed_sd=0.02, diff=0.1)
    est = levels.contrast([a, b], [1, -1], tokens)
    assert np.mean(levels.two_level_p(est) < 0.05) > 0.6
    assert np.all(est.estimate[levels.two_level_p(est) < 0.05] > 0)  # right direction


def test_the_estimate_is_the_difference_of_token_weighted_losses():
    (a, b), tokens = simulate(np.random.default_rng(2), (2, 4), studies=1)
    est = levels.contrast([a[0], b[0]], [1, -1], tokens[0])
    loss_sum_a, loss_sum_b = a[0] * tokens[0], b[0] * tokens[0]
    table_a = (loss_sum_a.sum(axis=1) / tokens[0].sum()).mean()  # eval_loss of each run, mean
    table_b = (loss_sum_b.sum(axis=1) / tokens[0].sum()).mean()
    assert est.estimate == pytest.approx(table_a - table_b)


def test_one_seed_gives_no_two_level_test_but_an_example_level_one():
    rng = np.random.default_rng(3)
    a, b = rng.normal(2, 0.3, (1, 20)), rng.normal(2, 0.3, (3, 20))
    est = levels.contrast([a, b], [1, -1])
    assert np.isnan(levels.two_level_p(est)) and np.isnan(est.var_seed)
    assert 0 <= levels.adapters_p(est) <= 1


def test_a_balanced_study_matches_a_crossed_mixed_model():
    """Equal weights and seed counts: the variance components and the difference's standard
    error are statsmodels MixedLM's REML estimates (run, example and strategy x example
    effects), the model the issue asks for."""
    smf = pytest.importorskip("statsmodels.formula.api")
    (a, b), _ = simulate(np.random.default_rng(11), (3, 3), seed_sd=0.05, studies=1)
    a, b = a[0], b[0]
    rows = [
        {"strategy": name, "run": f"{name}{r}", "example": i, "cell": f"{name}:{i}", "y": v[r, i]}
        for name, v in (("a", a), ("b", b))
        for r in range(3)
        for i in range(20)
    ]
    vc = {"run": "0 + C(run)", "example": "0 + C(example)", "cell": "0 + C(cell)"}
    data = pd.DataFrame(rows).assign(one=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        fit = smf.mixedlm("y ~ strategy", data, groups="one", re_formula="0", vc_formula=vc).fit()
    fitted = dict(zip(fit.model.exog_vc.names, fit.vcomp, strict=True))
    found = components(PerExample(METRICS[0], {"a": a, "b": b}, {"a": [1, 2, 3]}, None, 0))
    assert found.seed == pytest.approx(fitted["run"], rel=1e-3)
    assert found.interaction / 2 == pytest.approx(fitted["cell"], rel=1e-3)  # per strategy
    assert found.residual == pytest.approx(fit.scale, rel=1e-3)
    assert found.difficulty == pytest.approx(fitted["example"], rel=1e-3)
    est = levels.contrast([a, b], [1, -1])
    assert np.sqrt(est.var) == pytest.approx(fit.bse["strategy[T.b]"], rel=1e-3)
