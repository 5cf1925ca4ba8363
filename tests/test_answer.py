"""The headline never claims more than its test (issue 28, item 7): on synthetic studies, every
sentence names the quantity and the level it generalises to, and a difference is claimed at a
level only where that level's test resolved it."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from synthetic import losses

from loraplace.analysis.answer import LEVELS, headline, headline_sentences
from loraplace.analysis.compare import ADAPTERS, TWO_LEVEL, compare
from loraplace.analysis.metrics import METRICS, PerExample

LOSS, ROUGE = METRICS[0], METRICS[1]


def _study(shifts, seeds, seed_sd=0.005, rng=0, metrics=(LOSS,)):
    """(aggregate table, comparisons) of a synthetic study."""
    comparisons = []
    for i, metric in enumerate(metrics):
        values = losses(shifts, seeds, 40, seed_sd, rng + i)
        if not metric.lower_is_better:
            values = {s: 1 - v / 4 for s, v in values.items()}  # a score: higher is better
        found = PerExample(metric, values, {s: list(range(k)) for s, k in seeds.items()}, None, 0)
        comparisons.append(compare(found))
    loss = comparisons[0].found.values
    agg = pd.DataFrame(
        {
            "strategy": list(loss),
            "n_seeds": [v.shape[0] for v in loss.values()],
            "trainable_params": [1000 * (i + 1) for i in range(len(loss))],
            "eval_loss_mean": [float(v.mean()) for v in loss.values()],
        }
    )
    return agg, comparisons


def _claims(sentence: str) -> list[tuple[str, str]]:
    """(better, worse) of every 'X has lower/higher M than Y' in a sentence."""
    return re.findall(r"(\S+) has (?:lower|higher) [\w -]+? than ([^\s;,.(]+)", sentence)


def check(agg, comparisons) -> list[str]:
    """Every sentence names a metric and a level; a claim at the two-level level only for a
    pair that test resolved, any other claim only at the adapters' level."""
    sentences = headline_sentences(agg, comparisons)
    assert headline(agg, comparisons) == " ".join(sentences)
    labels = [m.label for m in METRICS]
    resolved = set()
    for c in comparisons:
        for r in c.table.itertuples():
            if r.p_adjusted < 0.05:
                resolved |= {(r.strategy_a, r.strategy_b), (r.strategy_b, r.strategy_a)}
    for sentence in sentences:
        assert any(label in sentence for label in labels), sentence
        assert any(level in sentence.lower() for level in LEVELS), sentence
        claims = _claims(sentence)
        if not claims:
            continue
        if sentence.lower().startswith(TWO_LEVEL):
            assert set(claims) <= resolved, sentence
        else:
            assert ADAPTERS in sentence and "might not repeat" in sentence, sentence
    return sentences


def test_resolved_differences_are_claimed_across_seeds_and_examples():
    agg, comparisons = _study({"full": 0.0, "attention": 0.3, "ffn": 0.15}, dict.fromkeys(
        ("full", "attention", "ffn"), 3))  # fmt: skip
    sentences = check(agg, comparisons)
    assert sentences[0].startswith("Lowest mean eval loss in these runs: full (")
    assert sentences[1].startswith(
        "Across training seeds and evaluation examples (two-level test, Holm-corrected over 3 "
        "comparisons, p < 0.05): full has lower eval loss than attention (by 0."
    )
    assert len(_claims(sentences[1])) == 3
    assert not any("Power plan" in s for s in sentences)  # nothing left to resolve


def test_unresolved_says_so_and_gives_the_plan():
    agg, comparisons = _study({"a": 0.0, "b": 0.0}, {"a": 3, "b": 3}, rng=2)
    sentences = check(agg, comparisons)
    assert sentences[1] == (
        "No difference in eval loss is resolved across training seeds and evaluation examples "
        "(two-level test, Holm-corrected p >= 0.05 in 1 comparison), so the ranking in these "
        "runs may be seed or example noise."
    )
    assert sentences[-1].startswith(
        "Power plan across training seeds and evaluation examples for a 1 % difference in eval loss"
    )


def test_mixed_seed_counts_name_the_strategy_without_a_verdict():
    agg, comparisons = _study(
        {"full": 0.0, "attention": 0.3, "ffn": 0.3}, {"full": 3, "attention": 3, "ffn": 1}
    )
    sentences = check(agg, comparisons)
    assert any(s.startswith("Across training seeds and evaluation examples") for s in sentences)
    assert (
        "No verdict on eval loss across training seeds for full vs ffn, attention vs ffn: ffn ran "
        "one seed, and the seed-to-seed variance needs two or more."
    ) in sentences
    # ffn's adapters are worse on these examples, which is all its one seed can say
    only = [s for s in sentences if s.startswith("Only for these trained adapters")]
    assert only and ("full", "ffn") in _claims(only[0])


def test_one_seed_everywhere_says_nothing_is_tested_across_seeds():
    agg, comparisons = _study({"a": 0.0, "b": 0.3}, {"a": 1, "b": 1})
    sentences = check(agg, comparisons)
    assert sentences[1].startswith(
        "No difference in eval loss can be tested across training seeds: every strategy ran "
        "one seed"
    )
    assert "No power plan for eval loss" in sentences[-1]


def test_a_difference_only_these_adapters_show_is_not_claimed_across_seeds():
    """Seeds scatter far more than the shift: the example-level test resolves it for these
    adapters, the two-level test does not, and the headline keeps the two apart."""
    agg, comparisons = _study({"a": 0.0, "b": 0.06}, {"a": 2, "b": 2}, seed_sd=0.06, rng=6)
    row = comparisons[0].table.iloc[0]
    assert row["adapters_p_adjusted"] < 0.05 <= row["p_adjusted"]  # the scenario holds
    sentences = check(agg, comparisons)
    assert sentences[1].startswith("No difference in eval loss is resolved across training seeds")
    assert sentences[2].startswith(
        "Only for these trained adapters, on new evaluation examples (a per-example test that "
        "holds the seeds' adapters fixed): a has lower eval loss than b; another training seed "
        "might not repeat it."
    )


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_a_task_metric_gets_its_own_sentences(shift):
    agg, comparisons = _study({"a": 0.0, "b": shift}, {"a": 3, "b": 3}, metrics=(LOSS, ROUGE))
    sentences = check(agg, comparisons)
    rouge = [s for s in sentences if "ROUGE-L" in s]
    assert rouge[0].startswith("Highest mean ROUGE-L in these runs: a (") or shift == 0
    if shift:
        assert any("a has higher ROUGE-L than b" in s for s in rouge)


def test_a_task_metric_the_same_everywhere_names_no_best_strategy():
    import numpy as np

    from loraplace.analysis.answer import _task_best

    zeros = {s: np.zeros((3, 20)) for s in ("full", "attention")}
    found = PerExample(METRICS[2], zeros, {s: [1, 2, 3] for s in zeros}, None, 0)
    sentence = _task_best(compare(found))
    assert sentence == "Mean exact match in these runs: 0.0000 for every strategy."
