"""What the report says about the comparisons: the headline and the sections behind it.

    from loraplace.analysis.answer import headline_sentences, comparison_blocks

    for sentence in headline_sentences(agg, comparisons):   # comparisons: compare.Comparison
        print(sentence)

Every sentence names the quantity it is about (eval loss, ROUGE-L, ...) and the level it
generalises to: "in these runs" (a description, no test), "across training seeds and
evaluation examples" (the two-level test: another seed and another evaluation set from the
same distribution), or "for these trained adapters, on new evaluation examples" (the per-example
test: these adapters only). tests/test_answer.py checks that on synthetic studies.
"""

from __future__ import annotations

import pandas as pd

from loraplace.analysis.compare import (
    ADAPTERS,
    ALPHA,
    POWER,
    TWO_LEVEL,
    Comparison,
    better_worse,
    one_seed,
    plan_text,
)

IN_THESE_RUNS = "in these runs"
LEVELS = (IN_THESE_RUNS, TWO_LEVEL, "across training seeds", ADAPTERS)


def _s(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def best_sentence(agg: pd.DataFrame) -> str | None:
    """The lowest mean eval loss in the results table, described, not tested."""
    ran = agg[agg["n_seeds"] > 0].dropna(subset=["eval_loss_mean"])
    if ran.empty:
        return None
    best = ran.loc[ran["eval_loss_mean"].idxmin()]
    params = best.get("trainable_params")
    size = "" if pd.isna(params) else f"; {int(params):,} trainable parameters"
    return (
        f"Lowest mean eval loss {IN_THESE_RUNS}: {best['strategy']} "
        f"({best['eval_loss_mean']:.4f}, token-weighted, over {_s(int(best['n_seeds']), 'seed')}"
        f"{size})."
    )


def _task_best(c: Comparison) -> str:
    """The best mean of a metric other than eval loss, described, not tested."""
    means = {s: float(v.mean()) for s, v in c.found.values.items()}  # unweighted metrics
    pick = min if c.found.metric.lower_is_better else max
    best = pick(means, key=means.get)
    if len(set(means.values())) == 1:  # every strategy the same (exact match 0 everywhere)
        value = next(iter(means.values()))
        return f"Mean {c.found.metric.label} {IN_THESE_RUNS}: {value:.4f} for every strategy."
    way = "Lowest" if c.found.metric.lower_is_better else "Highest"
    seeds = c.found.values[best].shape[0]
    return (
        f"{way} mean {c.found.metric.label} {IN_THESE_RUNS}: {best} ({means[best]:.4f} over "
        f"{_s(seeds, 'seed')})."
    )


def _claim(row, metric, interval: bool = True) -> str:
    """'B has lower eval loss than A (by 0.031, 95 % interval 0.012 to 0.050)'."""
    better, worse = better_worse(row, metric)
    way = "lower" if metric.lower_is_better else "higher"
    text = f"{better} has {way} {metric.label} than {worse}"
    if not interval:
        return text
    lo, hi = sorted((abs(row.ci_low), abs(row.ci_high)))
    return text + f" (by {abs(row.mean_diff):.4g}, 95 % interval {lo:.4g} to {hi:.4g})"


def metric_sentences(c: Comparison) -> list[str]:
    """The headline's sentences about one metric's comparisons."""
    metric, table = c.found.metric, c.table
    label = metric.label
    if table.empty:
        return []
    untestable = table[[bool(one_seed(r)) for r in table.itertuples()]]
    testable = table.drop(untestable.index)
    resolved = testable[testable["p_adjusted"] < ALPHA]
    out = []
    if testable.empty:
        single = sorted({s for r in table.itertuples() for s in one_seed(r)})
        who = "every strategy" if len(single) == len(c.found.values) else ", ".join(single)
        out.append(
            f"No difference in {label} can be tested across training seeds: {who} ran one seed, "
            "and the seed-to-seed variance needs at least two seeds per strategy "
            "(--seed 42 --seed 43 --seed 44)."
        )
    elif resolved.empty:
        out.append(
            f"No difference in {label} is resolved {TWO_LEVEL} (two-level test, Holm-corrected "
            f"p >= {ALPHA} in {_s(len(testable), 'comparison')}), so the ranking {IN_THESE_RUNS} "
            "may be seed or example noise."
        )
    else:
        claims = "; ".join(_claim(r, metric) for r in resolved.itertuples())
        out.append(
            f"{TWO_LEVEL[0].upper() + TWO_LEVEL[1:]} (two-level test, Holm-corrected over "
            f"{_s(len(testable), 'comparison')}, p < {ALPHA}): {claims}."
        )
        if len(resolved) < len(testable):
            rest = len(testable) - len(resolved)
            out.append(
                f"The other {_s(rest, 'difference')} in {label} {'is' if rest == 1 else 'are'} "
                f"not resolved {TWO_LEVEL}."
            )
    if not untestable.empty and not testable.empty:
        pairs = ", ".join(f"{r.strategy_a} vs {r.strategy_b}" for r in untestable.itertuples())
        single = ", ".join(sorted({s for r in untestable.itertuples() for s in one_seed(r)}))
        out.append(
            f"No verdict on {label} across training seeds for {pairs}: {single} ran one seed, "
            "and the seed-to-seed variance needs two or more."
        )
    only_adapters = table[
        (table["adapters_p_adjusted"] < ALPHA) & ~table.index.isin(resolved.index)
    ]
    if not only_adapters.empty:
        claims = "; ".join(_claim(r, metric, interval=False) for r in only_adapters.itertuples())
        it = "it" if len(only_adapters) == 1 else "them"
        out.append(
            f"Only {ADAPTERS} (a per-example test that holds the seeds' adapters fixed): "
            f"{claims}; another training seed might not repeat {it}."
        )
    if len(resolved) < len(table):
        out.append(plan_sentence(c))
    return out


def plan_sentence(c: Comparison) -> str:
    """The power plan for one metric, as one sentence."""
    label = c.found.metric.label
    if not c.plan.known:
        return (
            f"No power plan for {label} {TWO_LEVEL}: it needs the seed-to-seed variance, "
            "measured only where at least two strategies ran two seeds or more."
        )
    fewest = min(v.shape[0] for v in c.found.values.values())
    text = plan_text(c.plan, c.n_examples, fewest, f"it with {POWER * 100:g} % power")
    return (
        f"Power plan {TWO_LEVEL} for a {c.smallest_effect * 100:g} % difference in {label} "
        f"({c.delta:.3g}), from the measured variance components: {text}."
    )


def headline_sentences(agg: pd.DataFrame, comparisons: list[Comparison]) -> list[str]:
    """The answer, sentence by sentence, claiming only what each test supports."""
    first = best_sentence(agg)
    if first is None:
        return ["No run finished, so there is no answer yet in these runs."]
    out = [first]
    if not any(len(c.table) for c in comparisons):
        return out + [
            "No pair of strategies has per-example eval loss, so nothing is tested across "
            "training seeds or evaluation examples."
        ]
    for c in comparisons:  # each metric's description, then its tests
        if c.found.metric.name != "eval_loss":
            out.append(_task_best(c))
        out += metric_sentences(c)
    return out


def headline(agg: pd.DataFrame, comparisons: list[Comparison]) -> str:
    return " ".join(headline_sentences(agg, comparisons))


TWO_LEVEL_COLUMNS = [
    "strategy_a", "strategy_b", "mean_diff", "ci_low", "ci_high", "p_value", "p_adjusted", "df",
    "seeds_a", "seeds_b", "se_seed", "se_example", "seeds_needed", "examples_needed",
]  # fmt: skip
ADAPTERS_COLUMNS = [
    "strategy_a", "strategy_b", "mean_diff", "adapters_ci_low", "adapters_ci_high",
    "adapters_p_value", "adapters_p_adjusted", "n_examples",
]  # fmt: skip


def comparison_blocks(comparisons: list[Comparison]) -> list[tuple[str, object]]:
    """The report's sections behind the headline, per metric: the two-level comparisons, the
    variance components, the power plan, and the per-example test for these adapters."""
    shown = [c for c in comparisons if len(c.table)]
    if not shown:
        return [
            ("h2", "Comparisons across training seeds and evaluation examples"),
            ("p", "No pair of strategies with per-example values on the same examples."),
        ]
    blocks: list[tuple[str, object]] = []
    for c in shown:
        blocks += _two_level_blocks(c) + _component_blocks(c) + _plan_blocks(c)
        blocks += _adapters_blocks(c)
    return blocks


def _two_level_blocks(c: Comparison) -> list[tuple[str, object]]:
    m = c.found.metric
    how = f", weighted by {m.weighted_by}" if m.weighted_by else ""
    text = (
        f"mean_diff is strategy_a's mean {m.label} minus strategy_b's: the difference of the "
        f"strategies' means over their seeds ({c.n_examples} evaluation examples{how}). The "
        "two-level test treats the training seeds and the evaluation examples both as draws: "
        "its standard error adds the spread between the seeds of each strategy (se_seed) to how "
        "the difference varies from example to example (se_example); ci is its 95 % interval, "
        "p_value refers it to Student's t with Satterthwaite's degrees of freedom (df), "
        "p_adjusted is Holm-corrected over the rows. A strategy with one seed gets no verdict: "
        "its seed-to-seed variance cannot be measured. seeds_needed: seeds per strategy that "
        f"would detect a {c.smallest_effect * 100:g} % difference with {POWER * 100:g} % power "
        "at these examples; examples_needed: examples that would at these seeds."
    )
    rows = [("p", f"{r.strategy_a} vs {r.strategy_b}: {r.verdict}.") for r in c.table.itertuples()]
    return [
        ("h2", f"{_title(m.label)} {TWO_LEVEL}"),
        ("p", text),
        ("table", c.table[TWO_LEVEL_COLUMNS]),
        *rows,
    ]


def _title(label: str) -> str:
    return label[0].upper() + label[1:]


def _sd(variance: float) -> float:
    return variance**0.5 if variance == variance else variance  # NaN stays


def _component_blocks(c: Comparison) -> list[tuple[str, object]]:
    comp, label = c.components, c.found.metric.label
    rows = [
        ("seed", _sd(comp.seed), f"a strategy's {label} over all examples, between training "
         f"seeds ({comp.seed_df} degrees of freedom)", "se_seed: shrinks only with more seeds"),
        ("seed x example", _sd(comp.residual), "a run's value on one example beyond its seed's "
         "and the example's", "se_seed: shrinks with more seeds or examples"),
        ("strategy x example", _sd(comp.interaction), "the difference between two strategies "
         f"from one example to the next (mean over {_s(comp.pairs, 'pair')})",
         "se_example: shrinks with more examples"),
        ("example", _sd(comp.difficulty), "how hard the examples are", "cancels: every run "
         "sees the same examples"),
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=["component", "SD", "what varies", "in a comparison"])
    text = (
        f"Standard deviations of {label} at each level, pooled over the strategies (seed and "
        "seed x example need two seeds of a strategy; strategy x example two such strategies). "
        "The seed component is on the scale of a run's whole-evaluation value, the others on "
        "one example's."
    )
    return [("h2", f"Variance components: {label}"), ("p", text), ("table", table)]


def _plan_blocks(c: Comparison) -> list[tuple[str, object]]:
    label = c.found.metric.label
    blocks: list[tuple[str, object]] = [
        ("h2", f"Power plan: {label}"),
        ("p", plan_sentence(c)),
    ]
    if c.plan.options:
        text = (
            f"Designs that would detect a {c.smallest_effect * 100:g} % difference ({c.delta:.3g}) "
            f"with {POWER * 100:g} % power at level {c.alpha:.3g} ({ALPHA} over "
            f"{_s(len(c.table), 'comparison')}, the most Holm can ask), from the measured "
            "components; with few seeds these are "
            "rough. Set the smallest effect with `loraplace report --smallest-effect` or the "
            "config key smallest_effect."
        )
        options = pd.DataFrame(c.plan.options, columns=["seeds per strategy", "examples"])
        blocks += [("p", text), ("table", options)]
    return blocks


def _adapters_blocks(c: Comparison) -> list[tuple[str, object]]:
    label = c.found.metric.label
    text = (
        f"The same differences in {label}, tested over evaluation examples only: each "
        "strategy's per-example values averaged over its seeds, the adapters held fixed, a t "
        "test on the weighted difference with the effective number of examples minus one "
        "degrees of freedom, Holm-corrected. It says whether these trained adapters differ on "
        "new examples from the same distribution, not whether another training seed would."
    )
    rows = [
        ("p", f"{r.strategy_a} vs {r.strategy_b}: {r.adapters_verdict}.")
        for r in c.table.itertuples()
    ]
    return [
        ("h2", f"{_title(label)} {ADAPTERS}"),
        ("p", text),
        ("table", c.table[ADAPTERS_COLUMNS]),
        *rows,
    ]
