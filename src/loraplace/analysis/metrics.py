"""The per-example metrics a report compares, and how each is read from a run's result.

    from loraplace.analysis.metrics import METRICS, per_example

    for metric in METRICS:
        found = per_example(results, metric)   # None where no run has it
        if found:
            found.values["full"]               # (seeds, examples)

A metric is compared only where some run has it; a new one is one line in METRICS (a task
metric the runs write as `task: {"rouge_l": [one value per example, ...]}` already is).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from loraplace.core.errors import UserError


@dataclass(frozen=True)
class Metric:
    """A per-example metric: its column name, its words in sentences, which way is better,
    and how to read (values, weights or None) from one result (None where it has none)."""

    name: str
    label: str
    lower_is_better: bool
    read: Callable[[dict], tuple[list, list | None] | None]
    weighted_by: str | None = None  # what the weights are, in words


def _loss(result: dict) -> tuple[list, list] | None:
    """Per-example mean loss and target tokens: the table's eval_loss is their token-weighted
    mean (sum of loss sums over sum of tokens)."""
    found = result.get("per_example") or {}
    if "loss_sum" not in found or "tokens" not in found:
        return None
    loss = [
        s / t if t else math.nan for s, t in zip(found["loss_sum"], found["tokens"], strict=True)
    ]
    return loss, found["tokens"]


def _task(key: str) -> Callable[[dict], tuple[list, None] | None]:
    """A task metric the run stored per example under result["task"][key], unweighted."""

    def read(result: dict) -> tuple[list, None] | None:
        values = (result.get("task") or {}).get(key)
        return (values, None) if isinstance(values, list) else None

    return read


METRICS = (
    Metric("eval_loss", "eval loss", True, _loss, weighted_by="target tokens"),
    Metric("rouge_l", "ROUGE-L", False, _task("rouge_l")),
    Metric("exact_match", "exact match", False, _task("exact_match")),
)


@dataclass(frozen=True)
class PerExample:
    """One metric's per-example values of every run that has it, by strategy."""

    metric: Metric
    values: dict[str, np.ndarray]  # strategy -> (runs, examples), runs in seed order
    seeds: dict[str, list[int]]
    weights: np.ndarray | None  # (examples,), shared by every run
    dropped: int  # examples left out: no weight, or a missing value in some run


def per_example(results: list[dict], metric: Metric) -> PerExample | None:
    """The metric's per-example values of the finished runs that have it, strategies in the
    results' order; None where no run has it. UserError where runs were evaluated on
    different examples (their counts or weights differ)."""
    found: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = {}
    for r in results:
        read = metric.read(r) if r.get("status") == "ok" else None
        if read is not None:
            values, weights = read
            w = None if weights is None else np.asarray(weights, dtype=float)
            found[(r["strategy"], r["seed"])] = (np.asarray(values, dtype=float), w)
    if not found:
        return None
    (first, (v0, w0)), *rest = found.items()
    for run, (v, w) in rest:
        if v.shape != v0.shape or (w is not None and not np.array_equal(w, w0)):
            raise UserError(
                f"{run[0]} seed {run[1]} and {first[0]} seed {first[1]} were evaluated on "
                f"different examples ({v.size} against {v0.size} {metric.label} values"
                f"{'' if w is None else ', or other token counts'}); a study's runs must share "
                "one evaluation set, so run the odd ones again or report them apart"
            )
    keep = np.all([np.isfinite(v) for v, _ in found.values()], axis=0)
    if w0 is not None:
        keep &= w0 > 0
    values: dict[str, list] = {}
    seeds: dict[str, list[int]] = {}
    for (strategy, seed), (v, _) in sorted(found.items(), key=lambda item: item[0][1]):
        values.setdefault(strategy, []).append(v[keep])
        seeds.setdefault(strategy, []).append(seed)
    order = list(dict.fromkeys(s for s, _ in found))
    return PerExample(
        metric,
        {s: np.stack(values[s]) for s in order},
        {s: seeds[s] for s in order},
        None if w0 is None else w0[keep],
        int((~keep).sum()),
    )
