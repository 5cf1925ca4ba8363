"""Placement as a pure function: classified modules + strategy -> exact module paths and cost.

    from loraplace.plan.placement import place
    p = place(classify(meta_model), BUILTINS["attention"], rank=16)
    p.trainable_params, p.trainable_by_role, p.paths[:1]

Nothing here touches weights: the modules come from `roles.classify`, which works on the meta
device. The LoRA cost of a linear module with `in` inputs and `out` outputs at rank r is
r * (in + out) (A is r x in, B is out x r); biases are added when `bias` asks for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from loraplace.core.errors import UserError
from loraplace.plan.roles import ROLES, LinearModule, num_layers
from loraplace.plan.strategies import Strategy, select_layers


@dataclass(frozen=True)
class Placement:
    """What a strategy adapts on one model, and what that costs in trainable parameters."""

    strategy: Strategy
    modules: tuple[LinearModule, ...]
    ranks: dict[str, int]  # full module path -> LoRA rank
    layers: list[int] | None  # None: all layers
    literal: bool  # the seed's target list, matched by suffix as PEFT does
    trainable_params: int
    trainable_by_role: dict[str, int]
    trainable_by_layer: dict[int, int]

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.modules]

    def plan(self) -> AdapterPlan:
        """What a run attaches: these modules at these ranks, this many parameters, and the
        placement's record for result.json."""
        return AdapterPlan(dict(self.ranks), self.trainable_params, self.record())

    def record(self) -> dict:
        return {
            "modules": self.paths,
            "ranks": self.ranks,
            "map": [[m.path, m.layer, m.role, self.ranks[m.path]] for m in self.modules],
            "layers": self.layers,
            "literal": self.literal,
            "trainable_by_role": self.trainable_by_role,
            "trainable_by_layer": {str(k): v for k, v in sorted(self.trainable_by_layer.items())},
        }


@dataclass(frozen=True)
class AdapterPlan:
    """A placement as a run needs it (planned on the meta device, before any weights): each
    adapted module's full path and rank, the trainable count PEFT must reach, and the
    placement's record (roles, layers, counts) for result.json."""

    ranks: dict[str, int]
    trainable_params: int
    record: dict

    @property
    def paths(self) -> list[str]:
        return list(self.ranks)

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "trainable_params": self.trainable_params,
                "record": self.record}  # fmt: skip

    @staticmethod
    def from_dict(data: dict) -> AdapterPlan:
        return AdapterPlan(dict(data["ranks"]), data["trainable_params"], data["record"])


def _literal_matches(
    modules: list[LinearModule], targets: tuple[str, ...]
) -> list[LinearModule] | None:
    """The modules PEFT's own suffix matching selects, or None if a target names nothing here."""
    config = LoraConfig(target_modules=list(targets))
    if not all(any(m.path == t or m.path.endswith("." + t) for m in modules) for t in targets):
        return None
    return [m for m in modules if check_target_module_exists(config, m.path)]


def lora_params(module: LinearModule, rank: int) -> int:
    return rank * (module.in_features + module.out_features)


def place(
    modules: list[LinearModule],
    strategy: Strategy,
    rank: int = 16,
    bias: str = "none",
) -> Placement:
    """Select the modules `strategy` adapts and count the LoRA parameters exactly.

    Args:
        modules: every adaptable module of the model, from `roles.classify`.
        strategy: roles, layer selection, optional seed literal list and per-role ranks.
        rank: the LoRA rank of roles without their own entry in `strategy.rank_by_role`.
        bias: PEFT's bias mode; "lora_only" adds the adapted modules' biases.

    Returns:
        The placement; raises `UserError` when the selection matches no module.
    """
    if rank < 1:
        raise UserError(f"LoRA rank must be a positive whole number, got {rank}")
    n_layers = num_layers(modules)
    layers = None if strategy.layers is None else select_layers(strategy.layers, n_layers)
    chosen = None
    if strategy.seed_targets and layers is None:
        chosen = _literal_matches(modules, strategy.seed_targets)
    literal = chosen is not None
    if chosen is None:
        chosen = [
            m
            for m in modules
            if m.role in strategy.roles
            and m.layer is not None
            and (layers is None or m.layer in layers)
        ]
    if not chosen:
        present = [r for r in ROLES if r != "other" and any(m.role == r for m in modules)]
        raise UserError(
            f"strategy {strategy.name!r} matches no module of this model, which has roles "
            f"{', '.join(present) or 'none'} in {n_layers} layers"
        )
    ranks = {m.path: strategy.rank_by_role.get(m.role, rank) for m in chosen}
    by_role: dict[str, int] = {}
    by_layer: dict[int, int] = {}
    for m in chosen:
        n = lora_params(m, ranks[m.path]) + (
            m.out_features if bias == "lora_only" and m.bias else 0
        )
        by_role[m.role] = by_role.get(m.role, 0) + n
        by_layer[m.layer] = by_layer.get(m.layer, 0) + n
    return Placement(
        strategy, tuple(chosen), ranks, layers, literal, sum(by_role.values()), by_role, by_layer
    )


def lora_config(
    placement: Placement | AdapterPlan,
    alpha: float,
    dropout: float,
    bias: str = "none",
    scaling: str = "rank",
    rank: int | None = None,
) -> LoraConfig:
    """The PEFT config for a placement: explicit full module names, never suffixes.

    `scaling`: how a module's LoRA update is scaled where ranks differ (equal-budget and
    per-role ranks). "rank": alpha grows with the rank, so alpha / r, the update's scale, is
    the config's alpha / `rank` for every module (PEFT's `alpha_pattern`); "constant": the same
    alpha everywhere, so higher-rank modules get smaller updates (PEFT's default); "rslora":
    alpha / sqrt(r) (rsLoRA). Where every module has `rank`, all three but rslora agree."""
    ranks = list(placement.ranks.values())
    default = max(set(ranks), key=ranks.count)
    pattern = {re.escape(p): r for p, r in placement.ranks.items() if r != default}
    alphas = alpha_by_rank(set(ranks), alpha, scaling, rank or default)
    return LoraConfig(
        r=default,
        lora_alpha=alphas[default],
        lora_dropout=dropout,
        bias=bias,
        target_modules=placement.paths,
        rank_pattern=pattern,
        alpha_pattern={p: alphas[r] for p, r in pattern.items()},
        use_rslora=scaling == "rslora",
        task_type="CAUSAL_LM",
    )


def alpha_by_rank(ranks: set[int], alpha: float, scaling: str, rank: int) -> dict[int, float]:
    """Each rank's LoRA alpha under `scaling` (see `lora_config`), `rank` the config's."""
    if scaling == "rank":
        return {r: alpha * r / rank for r in ranks}
    return dict.fromkeys(ranks, alpha)
