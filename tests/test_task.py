"""Task metrics: greedy answers scored against the rows' references, one score per example."""

from __future__ import annotations

import math

import pytest

from loraplace.train.task import METRICS, exact_match, normalize, rouge_l, score


def test_rouge_l_is_the_longest_common_subsequence_f1():
    # "the cat on the mat": 5 of the answer's 6 words and of the reference's 6, in order
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("completely different words", "the cat is on the mat") == 0.0
    assert rouge_l("Cats are running", "cat is run") > 0  # stemmed: cat, run


def test_exact_match_after_normalization():
    assert normalize("  The Answer: 42! ") == "answer 42"
    assert exact_match("The answer: 42.", "answer 42") == 1.0
    assert exact_match("answer 43", "answer 42") == 0.0


def test_scores_come_per_example_in_order_and_nan_without_a_reference():
    got = score(["Paris.", "a dog"], ["Paris", None], ("rouge_l", "exact_match"))
    assert got["exact_match"][0] == 1.0 and got["rouge_l"][0] == 1.0
    assert math.isnan(got["rouge_l"][1]) and math.isnan(got["exact_match"][1])
    assert set(METRICS) >= {"rouge_l", "exact_match"}
