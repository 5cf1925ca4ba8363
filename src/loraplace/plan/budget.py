"""Equal-budget placements: solve LoRA ranks so each strategy trains as many parameters as a reference.

    ranks = solve_ranks(modules, BUILTINS["ffn"], target=1_843_200)   # {'mlp.up': 9, 'mlp.down': 11}

A role's LoRA cost is linear in its rank (r * sum of in + out over its modules), so the solver
takes the best uniform rank and then tries every per-role choice of that rank or one either side,
keeping the one closest to the target (ties: the more uniform). Ranks reach PEFT as `rank_pattern`.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from loraplace.plan.placement import place
from loraplace.plan.roles import LinearModule
from loraplace.plan.strategies import Strategy


def cost_per_rank(modules: list[LinearModule], strategy: Strategy) -> dict[str, int]:
    """LoRA parameters per unit of rank, by role, for the modules `strategy` selects."""
    placement = place(modules, replace(strategy, rank_by_role={}), rank=1)
    return dict(placement.trainable_by_role)


def solve_ranks(modules: list[LinearModule], strategy: Strategy, target: int) -> dict[str, int]:
    per_rank = cost_per_rank(modules, strategy)
    uniform = max(1, round(target / sum(per_rank.values())))
    roles = sorted(per_rank)
    best = None
    for choice in itertools.product(*[(uniform - 1, uniform, uniform + 1)] * len(roles)):
        if min(choice) < 1:
            continue
        total = sum(r * per_rank[role] for r, role in zip(choice, roles, strict=True))
        key = (abs(total - target), max(choice) - min(choice))
        if best is None or key < best[0]:
            best = (key, dict(zip(roles, choice, strict=True)))
    return best[1]


def equalize(
    modules: list[LinearModule], strategies: list[Strategy], reference: str, rank: int
) -> list[Strategy]:
    """Every strategy but the reference gets per-role ranks matching the reference's size at `rank`."""
    ref = next(s for s in strategies if s.name == reference)
    target = place(modules, ref, rank).trainable_params
    return [
        s if s.name == reference else replace(s, rank_by_role=solve_ranks(modules, s, target))
        for s in strategies
    ]
