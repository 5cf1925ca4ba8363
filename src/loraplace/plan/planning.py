"""`loraplace plan`: what each strategy adapts on a model, and what it costs, without weights.

loraplace plan --model ../shared/models/dialogpt-medium
loraplace plan --model embedded --strategy top6=attn@top:6 --json
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplace.core.errors import UserError
from loraplace.plan.budget import equalize
from loraplace.plan.memory import Shape, run_memory, shape_of, weights_mb
from loraplace.plan.models import ModelSource, base_params, meta_model
from loraplace.plan.placement import Placement, place
from loraplace.plan.roles import ROLES, LinearModule, classify, hidden_size, num_layers
from loraplace.plan.strategies import Strategy


@dataclass(frozen=True)
class ModelPlan:
    model: str
    base_params: int
    n_layers: int
    modules: list[LinearModule]
    placements: list[Placement]
    shape: Shape


def plan_model(
    source: ModelSource,
    strategies: list[Strategy],
    rank: int,
    bias: str = "none",
    equal_budget: str | None = None,
) -> ModelPlan:
    """Plan every strategy on the model's architecture; with `equal_budget`, ranks are solved
    so each strategy trains as many parameters as that one."""
    model = meta_model(source)
    modules = classify(model)
    if equal_budget:
        if equal_budget not in [s.name for s in strategies]:
            raise UserError(f"equal budget reference {equal_budget!r} is not among the strategies")
        strategies = equalize(modules, strategies, equal_budget, rank)
    placements = [place(modules, s, rank, bias) for s in strategies]
    return ModelPlan(
        source.name, base_params(model), num_layers(modules), modules, placements,
        shape_of(model, modules),
    )  # fmt: skip


def to_json(plan: ModelPlan) -> dict:
    return {
        "model": plan.model,
        "base_params": plan.base_params,
        "base_memory_mb": {
            f"{p}{'' if q == 'none' else '+' + q}": round(base_memory_mb(plan, p, q), 1)
            for p in ("float32", "bf16")
            for q in ("none", "8bit", "4bit")
        },
        "n_layers": plan.n_layers,
        "strategies": [
            {
                "name": p.strategy.name,
                "roles": list(p.strategy.roles),
                "layers": p.layers,
                "literal_targets": list(p.strategy.seed_targets) if p.literal else None,
                "modules": p.paths,
                "ranks": p.ranks,
                "trainable_params": p.trainable_params,
                "percent_of_base": 100 * p.trainable_params / plan.base_params,
                "trainable_by_role": p.trainable_by_role,
                "trainable_by_layer": {str(k): v for k, v in sorted(p.trainable_by_layer.items())},
            }
            for p in plan.placements
        ],
    }


def seed_notes(plan: ModelPlan) -> list[str]:
    """Say what the seed's literal lists really select on this model."""
    notes = []
    for p in plan.placements:
        targets = p.strategy.seed_targets
        if not targets:
            continue
        listed = "[" + ", ".join(repr(t) for t in targets) + "]"
        if p.literal and "mlp.down" in p.trainable_by_role and "mlp.up" not in p.trainable_by_role:
            n = sum(1 for m in p.modules if m.role == "mlp.down")
            notes.append(
                f"{p.strategy.name}: PEFT matches {listed} by suffix, so 'c_proj' also adapts the MLP "
                f"output projection mlp.c_proj in every layer ({n} modules, "
                f"{p.trainable_by_role['mlp.down']:,} parameters): it is not attention-only; "
                "use 'attention' for attention alone"
            )
        elif p.literal:
            notes.append(f"{p.strategy.name}: {listed} matched by suffix exactly as PEFT does")
        else:
            notes.append(
                f"{p.strategy.name}: this model has no modules named {listed}; selecting the roles the "
                f"list selects on GPT-2: {', '.join(p.strategy.roles)}"
            )
    return notes


def base_memory_mb(plan: ModelPlan, precision: str, quantize: str = "none") -> float:
    return weights_mb(plan.shape, precision, quantize)


def memory_lines(plan: ModelPlan, precision: str, quantize: str, tokens: int | None) -> list[str]:
    """The base's weights in memory, and what a GPU run of the largest placement needs with
    `tokens` tokens a step (estimated: `plan.memory`)."""
    if precision == "auto":  # resolved per device: float32 on CPU, bf16 (or fp16) on a GPU
        f32, half = (base_memory_mb(plan, p, quantize) for p in ("float32", "bf16"))
        how = f"{f32:,.0f} MB in float32 (CPU), {half:,.0f} MB in bf16 (GPU)"
    else:
        how = f"{base_memory_mb(plan, precision, quantize):,.0f} MB in {precision}"
    bits = f", decoder linear weights in {quantize}" if quantize != "none" else ""
    lines = [f"base weights in memory: {how}{bits} (precision {precision}, quantize {quantize})"]
    if tokens and plan.placements:
        largest = max(p.trainable_params for p in plan.placements)
        gpu = "bf16" if precision == "auto" else precision
        need = run_memory(plan.shape, largest, tokens, gpu, quantize)
        lines.append(f"a GPU run ({gpu}, {tokens:,} tokens a step) needs {need.describe()}")
    return lines


def render(
    plan: ModelPlan, rank: int, alpha: float, dropout: float, bias: str,
    precision: str = "auto", quantize: str = "none", tokens: int | None = None,
) -> str:  # fmt: skip
    roles_present = [r for r in ROLES if any(m.role == r for m in plan.modules)]
    other = [m.path for m in plan.modules if m.role == "other"]
    full = next((p.trainable_params for p in plan.placements if p.strategy.name == "full"), None)
    # columns as wide as their longest entry (a layer study's names run to 30 characters)
    w_name = max([18] + [len(p.strategy.name) + 2 for p in plan.placements])
    w_layers = max([12] + [len(p.strategy.layers or "all") + 2 for p in plan.placements])
    lines = [
        f"model: {plan.model}",
        f"base parameters: {plan.base_params:,} (tied embeddings counted once); "
        f"{plan.n_layers} layers; roles: {', '.join(roles_present)}",
        f"not adapted (role other): {', '.join(other) if other else 'none'}",
        *memory_lines(plan, precision, quantize, tokens),
        f"LoRA: r={rank} alpha={alpha:g} dropout={dropout:g} bias={bias}",
        "",
        f"{'strategy':<{w_name}}{'layers':<{w_layers}}{'modules':>8}{'trainable':>13}{'% base':>9}{'vs full':>9}  by role",
    ]
    for p in plan.placements:
        layers = p.strategy.layers or "all"
        reduction = f"{100 * (1 - p.trainable_params / full):.1f}%" if full else "-"
        ranks = p.strategy.rank_by_role
        by_role = "  ".join(
            f"{r} {n:,}" + (f" (r={ranks[r]})" if r in ranks else "")
            for r, n in p.trainable_by_role.items()
        )
        lines.append(
            f"{p.strategy.name:<{w_name}}{layers:<{w_layers}}{len(p.modules):>8}{p.trainable_params:>13,}"
            f"{100 * p.trainable_params / plan.base_params:>8.3f}%{reduction:>9}  {by_role}"
        )
    notes = seed_notes(plan)
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    if full:
        lines += ["", "'vs full' is the parameter reduction against the full placement."]
    return "\n".join(lines)


def architecture(model, ranks: dict[str, int]) -> dict:
    """What the FLOP count needs to know about a model and its adapters (module path -> rank),
    from the run itself."""
    modules = classify(model)
    head = model.get_output_embeddings()
    macs = sum(m.in_features * m.out_features for m in modules if m.layer is not None)
    macs += head.weight.shape[0] * head.weight.shape[1]
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or hidden_size(model) // (heads or 1)
    return {
        "linear_macs_per_token": macs,
        "n_layers": num_layers(modules),
        "attn_dim": (heads or 1) * head_dim,
        "adapters": [
            [m.path, m.in_features, m.out_features, ranks[m.path]]
            for m in modules
            if m.path in ranks
        ],
    }
