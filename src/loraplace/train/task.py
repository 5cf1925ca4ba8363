"""Task metrics: the model's greedy answers to the evaluation rows, scored against the rows'
references, one score per example (so the report's two-level test applies to them as to loss).

    scores = score(["The cat sat."], ["the cat sat on the mat"], ("rouge_l", "exact_match"))
    scores["rouge_l"]        # [0.75]   ROUGE-L F1 (rouge-score, Porter stemming)
    scores["exact_match"]    # [0.0]    1.0 where the answers agree after normalization

A metric is a function (answer, reference) -> float in `METRICS`; higher is better. An
example without a reference (plain text) scores NaN, which the report leaves out and counts.
"""

from __future__ import annotations

import math
import re
import string
from functools import lru_cache


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 between the answer and the reference (Lin 2004, as `rouge-score` computes it:
    lowercased, punctuation dropped, Porter-stemmed words)."""
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def normalize(text: str) -> str:
    """Lowercased, without punctuation, articles and extra spaces (SQuAD's normalization)."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


METRICS = {"rouge_l": rouge_l, "exact_match": exact_match}


def score(answers: list[str], references: list[str | None], metrics: tuple[str, ...]) -> dict:
    """{metric: [score per example]} in the examples' order; NaN where there is no reference."""
    return {
        name: [
            METRICS[name](a, r) if r is not None else math.nan
            for a, r in zip(answers, references, strict=True)
        ]
        for name in metrics
    }
