"""Two-level comparison of strategies: training seeds and evaluation examples both vary.

    from loraplace.analysis import levels

    # values[s]: (runs of strategy s, examples), one row per seed; w: tokens per example
    est = levels.contrast([values_a, values_b], [1, -1], weights=tokens)
    t = est.estimate / np.sqrt(est.var)      # ~ Student-t with est.df degrees of freedom

A study trains every strategy with a few seeds and evaluates every run on the same examples,
so a per-example value (loss, ROUGE-L, ...) varies at two crossed levels:

    v[s, r, i] = mu[s] + seed[s, r] + example[i] + (strategy x example)[s, i] + resid[s, r, i]

The table's number for a run is its weighted mean over examples, y[r] = sum_i w[i] v[r, i]
(token-weighted eval loss: w = tokens / total tokens), and a strategy's number is the mean of
its runs. The difference of two strategies' numbers then varies from one study to the next
through three terms, and `contrast` estimates each from the data:

- seed: the runs of a strategy scatter; `var_seed` = sum_s c_s^2 S_s^2 / n_s, with S_s^2 the
  variance of y over the runs of strategy s (Welch's estimate, no equal-variance assumption).
  It holds the residual's share of each run's mean too. It needs two runs of every strategy.
- example: the strategies' difference changes from example to example; a new evaluation set
  draws other examples. The paired per-example differences d[i] give, by the ratio estimator's
  linearisation, V_ex = n / (n - 1) * sum_i w_i^2 (d_i - D)^2. V_ex also holds the residual
  (seed x example) scatter of the per-example run means, which `var_seed` already counts, so
  `contrast` subtracts its unbiased estimate from the double-centred run x example residuals
  and keeps `var_example` = max(0, V_ex - V_resid).
- Example difficulty (the example term) is shared by all strategies and cancels.

The test statistic D / sqrt(var_seed + var_example) is referred to Student's t with
Satterthwaite's degrees of freedom (each strategy's S_s^2 with n_s - 1, the example term with
n - 1). With 3 seeds per strategy that is about 4 degrees of freedom where the seed term
dominates, which is what keeps the false-positive rate at its nominal level
(tests/test_levels.py simulates it); a Wilcoxon test over examples of seed-averaged
differences treats the seeds' spread as fixed and rejected 29 % of null studies at a seed
spread of 0.05 (issue 28).

Why this and not the alternatives: with equal weights and equal seed counts these are the
REML estimates of a crossed mixed model (statsmodels MixedLM with run, example and
strategy x example variance components) and the same standard error (tests/test_levels.py
checks both); the closed form also takes token weights, which MixedLM has no place for, runs
thousands of simulated studies in a second, and comes with small-sample degrees of freedom,
where MixedLM's Wald z test would reject 11 % of null studies at 5 degrees of freedom. A
hierarchical bootstrap over 3 seeds has 10 distinct resamples and underestimates the seed
variance by a third. Runs are not paired by seed across strategies: a seed fixes the data
order for both, but not their adapters' initialisation, and an unpaired comparison stays
valid (conservative where same-seed runs correlate) with unequal seed counts.

`adapters` is the secondary test: the same difference for these trained adapters, on new
examples (V_ex alone, n - 1 degrees of freedom). It says nothing about another training seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Contrast:
    """A weighted contrast of strategy means and its variance at each level (arrays over any
    leading batch axes; NaN where not estimable)."""

    estimate: np.ndarray  # sum_s c_s * mean over runs of y
    var_seed: np.ndarray  # run level: between seeds of each strategy (NaN with one seed)
    var_example: np.ndarray  # example level, net of the seed x example residual
    var_adapters: np.ndarray  # example level for these runs (V_ex): the secondary test's
    df: np.ndarray  # Satterthwaite's, for estimate / sqrt(var_seed + var_example)
    df_example: np.ndarray  # the example level's: effective examples - 1
    n_examples: int

    @property
    def var(self) -> np.ndarray:
        """The two-level variance of the estimate."""
        return self.var_seed + self.var_example


def normalised(weights: np.ndarray | None, n: int) -> np.ndarray:
    """Weights that sum to 1 (equal weights for None)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=float)
    return w / w.sum(axis=-1, keepdims=True)


def unbias(w: np.ndarray) -> np.ndarray:
    """The factor that makes sum_i w_i^2 (x_i - sum_j w_j x_j)^2 unbiased for the variance of
    sum_i w_i x_i when the x_i are independent with one variance: 1 / (1 - 2 sum w^3 / sum w^2
    + sum w^2); n / (n - 1) for equal weights. With unequal weights n / (n - 1) falls short
    (6.3 % false positives at 20 examples of 5 to 80 tokens; 4.9 % with this factor)."""
    s2, s3 = (w**2).sum(axis=-1), (w**3).sum(axis=-1)
    return 1 / (1 - 2 * s3 / s2 + s2)


def effective_examples(w: np.ndarray) -> np.ndarray:
    """Kish's effective number of examples, 1 / sum w^2 (n for equal weights)."""
    return 1 / (w**2).sum(axis=-1)


@dataclass(frozen=True)
class Group:
    """One strategy's runs summarised for `contrast` (arrays over leading batch axes)."""

    n_runs: int
    mean: np.ndarray  # mean over runs of the run's weighted mean, y
    example_means: np.ndarray  # (..., n) per-example mean over runs
    run_var: np.ndarray  # S^2: variance of y over runs, ddof 1 (NaN with one run)
    resid: np.ndarray  # estimate of sum_i w_i^2 var(resid_i): the residual's share of S^2


def group(values: np.ndarray, w: np.ndarray) -> Group:
    """Summarise one strategy's runs: values (..., runs, examples), w (..., examples) summing
    to 1."""
    v = np.asarray(values, dtype=float)
    k = v.shape[-2]
    y = np.einsum("...ri,...i->...r", v, w)  # each run's weighted mean
    example_means = v.mean(axis=-2)
    if k < 2:
        nan = np.full(y.shape[:-1], np.nan)
        return Group(k, y.mean(axis=-1), example_means, nan, nan)
    # double-centred: what is left of a run on an example once the run's and the example's
    # means are taken out
    r = v - example_means[..., None, :] - (y - y.mean(axis=-1, keepdims=True))[..., :, None]
    per_example = (r**2).sum(axis=-2) / (k - 1)  # (..., n)
    resid = unbias(w) * (w**2 * per_example).sum(axis=-1)
    return Group(k, y.mean(axis=-1), example_means, y.var(axis=-1, ddof=1), resid)


def contrast(
    values: Sequence[np.ndarray], coefs: Sequence[float], weights: np.ndarray | None = None
) -> Contrast:
    """Estimate sum_s coefs[s] * (strategy s's mean) and its two-level variance.

    Args:
        values: Per strategy, its per-example values, shape (..., runs, examples); every run
            on the same examples, in the same order.
        coefs: One coefficient per strategy, summing to 0 (a difference: [1, -1]).
        weights: Per-example weights (..., examples), e.g. target tokens; None: equal.

    Returns:
        The `Contrast`; `var_seed` and `df` are NaN where a strategy with a non-zero
        coefficient has a single run.
    """
    n = np.shape(values[0])[-1]
    w = normalised(weights, n)
    groups = [group(v, w) for v in values]
    c = np.asarray(coefs, dtype=float)
    estimate = sum(ci * g.mean for ci, g in zip(c, groups, strict=True))
    d = sum(ci * g.example_means for ci, g in zip(c, groups, strict=True))
    v_ex = unbias(w) * (w**2 * (d - estimate[..., None]) ** 2).sum(axis=-1)
    used = [(ci, g) for ci, g in zip(c, groups, strict=True) if ci != 0]
    seed_parts = [ci**2 * g.run_var / g.n_runs for ci, g in used]
    var_seed = sum(seed_parts)
    v_resid = sum(ci**2 * g.resid / g.n_runs for ci, g in used)
    var_example = np.maximum(0.0, v_ex - v_resid)
    total = var_seed + var_example
    df_example = effective_examples(w) - 1
    spread = sum(p**2 / (g.n_runs - 1) for p, (_, g) in zip(seed_parts, used, strict=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        df = total**2 / (spread + var_example**2 / df_example)
    df = np.where(total > 0, df, np.nan)
    return Contrast(estimate, var_seed, var_example, v_ex, df, df_example, n)


def t_test(estimate, var, df) -> np.ndarray:
    """Two-sided p-value of estimate / sqrt(var) against Student's t with df (NaN stays)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.abs(estimate) / np.sqrt(var)
    p = 2 * sps.t.sf(t, df)
    return np.where(np.asarray(var) == 0, np.where(np.asarray(estimate) == 0, 1.0, 0.0), p)


def interval(estimate, var, df, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval estimate +- t_{df} * sqrt(var)."""
    half = sps.t.ppf(0.5 + confidence / 2, df) * np.sqrt(var)
    return estimate - half, estimate + half


def two_level_p(est: Contrast) -> np.ndarray:
    """The headline test's p-value: across training seeds and evaluation examples."""
    return t_test(est.estimate, est.var, est.df)


def adapters_p(est: Contrast) -> np.ndarray:
    """The secondary test's p-value: these trained adapters, new examples (n - 1 df)."""
    return t_test(est.estimate, est.var_adapters, est.df_example)
