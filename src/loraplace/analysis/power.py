"""Design-based power: the seeds and examples a two-level comparison needs.

    from loraplace.analysis.power import Components, plan

    comp = Components(seed=4e-4, residual=2.5e-3, interaction=1e-2)   # variances
    p = plan(comp, delta=0.02, alpha=0.05 / 3, concentration=1.2, n_examples=100)
    print(p.seeds, p.examples, p.seeds_at_current)   # e.g. 4 seeds x 180 examples; 7 at 100

For k seeds per strategy and m evaluation examples, the difference of two strategies' means
varies with (levels.py gives the model)

    var = 2 (seed + c / m * residual) / k  +  c / m * interaction

where c = n * sum w^2 is how unevenly the current examples are weighted (1 for equal
weights; token weights make it larger), assumed to hold for m examples too. The test is the
one the report runs: Student's t with Satterthwaite's degrees of freedom (2 (k - 1) for the
seed part, m / c - 1 for the example part), power from the noncentral t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

MAX_SEEDS = 100
MAX_EXAMPLES = 10**7


@dataclass(frozen=True)
class Components:
    """Variance components of one metric, pooled over a study's strategies.

    seed: variance between training seeds of a strategy's whole-evaluation value, net of the
        residual's share. residual: seed x example variance of one run's value on one example.
    interaction: variance over examples of the difference between two strategies (per
        example). difficulty: variance of the examples' mean values (cancels in comparisons).
    seed_df: degrees of freedom behind `seed` (sum over strategies of seeds - 1); 0 where no
        strategy ran two seeds, and then `seed` and `residual` are NaN.
    """

    seed: float
    residual: float
    interaction: float
    difficulty: float
    seed_df: int
    pairs: int  # strategy pairs behind `interaction`

    @property
    def known(self) -> bool:
        """Whether every component a plan needs was measured."""
        needed = (self.seed, self.residual, self.interaction)
        return self.seed_df > 0 and self.pairs > 0 and all(math.isfinite(x) for x in needed)


@dataclass(frozen=True)
class Plan:
    """What detects the smallest effect of interest: the seeds per strategy that would at the
    current examples, the examples that would at the current seeds, and the trade-off between
    them (seeds, examples) from the fewest seeds that can; None where nothing up to
    MAX_SEEDS or MAX_EXAMPLES would."""

    seeds_at_current: int | None
    examples_at_current: int | None
    options: tuple[tuple[int, int], ...] = ()
    known: bool = True  # False: the components it needs were not measured


def design(comp: Components, k, m, concentration: float) -> tuple[np.ndarray, np.ndarray]:
    """(variance, degrees of freedom) of a two-strategy difference at k seeds per strategy
    and m examples."""
    k, m = np.asarray(k, dtype=float), np.asarray(m, dtype=float)
    share = concentration / m
    runs = 2 * (comp.seed + share * comp.residual) / k
    examples = share * comp.interaction
    var = runs + examples
    with np.errstate(invalid="ignore", divide="ignore"):
        df = var**2 / (runs**2 / (2 * (k - 1)) + examples**2 / np.maximum(m / concentration - 1, 1))
    return var, df


def power(delta: float, var, df, alpha: float) -> np.ndarray:
    """Power of the two-sided t test at level alpha against a true difference delta."""
    var, df = np.asarray(var, dtype=float), np.asarray(df, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        nc = abs(delta) / np.sqrt(var)
        crit = sps.t.ppf(1 - alpha / 2, df)
        upper = sps.nct.sf(crit, df, nc)
        upper = np.where(np.isfinite(upper), upper, sps.t.sf(crit - nc, df))
        lower = np.nan_to_num(sps.nct.cdf(-crit, df, nc))  # far tail: scipy gives NaN for ~0
    return np.where(var > 0, upper + lower, 1.0)


def examples_needed(
    comp: Components, k: np.ndarray, delta: float, alpha: float, concentration: float,
    target: float = 0.8,
) -> np.ndarray:  # fmt: skip
    """For each seed count in k, the fewest examples reaching `target` power (0 where none up
    to MAX_EXAMPLES does). Power grows with m, so a bisection per k, all k at once."""
    k = np.asarray(k, dtype=float)
    lo = np.full(k.shape, 2.0)
    hi = np.full(k.shape, float(MAX_EXAMPLES))
    reach = power(delta, *design(comp, k, hi, concentration), alpha) >= target
    first = power(delta, *design(comp, k, lo, concentration), alpha) >= target
    for _ in range(int(math.log2(MAX_EXAMPLES)) + 2):  # hi: enough; lo: not enough
        mid = np.floor((lo + hi) / 2)
        ok = power(delta, *design(comp, k, mid, concentration), alpha) >= target
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return np.where(first, lo, np.where(reach, hi, 0)).astype(int)


def plan(
    comp: Components, delta: float, alpha: float, concentration: float, n_examples: int,
    n_seeds: int, target: float = 0.8,
) -> Plan:  # fmt: skip
    """The designs that detect `delta` with `target` power at level `alpha`, around the
    current one (`n_seeds` per strategy, `n_examples`)."""
    if not comp.known or not math.isfinite(delta) or delta == 0:
        return Plan(None, None, known=False)
    k = np.arange(2, MAX_SEEDS + 1)
    m = examples_needed(comp, k, delta, alpha, concentration, target)
    fits = np.flatnonzero(m > 0)
    at_current = np.flatnonzero((m > 0) & (m <= n_examples))
    options = ()
    if fits.size:
        low = int(k[fits[0]])
        wanted = sorted({low, low + 1, low + 2, math.ceil(1.5 * low), 2 * low, 3 * low})
        options = tuple((j, int(m[j - 2])) for j in wanted if j <= MAX_SEEDS)
    current = examples_needed(
        comp, np.array([max(2, n_seeds)]), delta, alpha, concentration, target
    )
    return Plan(
        int(k[at_current[0]]) if at_current.size else None,
        int(current[0]) if n_seeds >= 2 and current[0] > 0 else None,
        options,
    )
