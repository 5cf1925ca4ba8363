"""Synthetic per-example losses for the statistics tests (no training).

values = losses({"a": 0.0, "b": 0.02}, {"a": 3, "b": 3}, seed_sd=0.01, rng=0)
values["a"]   # (seeds, examples)
"""

from __future__ import annotations

import numpy as np


def losses(shifts: dict[str, float], seeds: dict[str, int], examples: int = 30,
           seed_sd: float = 0.01, rng: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Shared example difficulty, strategy x example SD 0.05, seed SD `seed_sd`, residual SD
    0.02; `shifts` moves a strategy's every example."""
    gen = np.random.default_rng(rng)
    difficulty = 2 + 0.4 * gen.standard_normal(examples)
    return {
        name: difficulty
        + shift
        + 0.05 * gen.standard_normal(examples)
        + seed_sd * gen.standard_normal((seeds[name], 1))
        + 0.02 * gen.standard_normal((seeds[name], examples))
        for name, shift in shifts.items()
    }
