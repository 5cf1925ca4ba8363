"""`loraplace plan`: what each strategy adapts on a model, and what it costs, without weights.

loraplace plan --model ../shared/models/dialogpt-medium
loraplace plan --model embedded --strategy top6=attn@top:6 --json
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplace.core.errors import UserError
from loraplace.plan.budget import equalize
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
    return ModelPlan(source.name, base_params(model), num_layers(modules), modules, placements)


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


# Bytes per weight. NF4 with double quantization: 4 bits, plus one 8-bit scale per 64 weights
# and one float32 scale per 256 of those (QLoRA, section 2); LLM.int8: 1 byte (its per-row
# scales are negligible). Only the decoder layers' linear weights are quantized.
BYTES = {"float32": 4.0, "bf16": 2.0, "fp16": 2.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256),
         "8bit": 1.0}  # fmt: skip


def base_memory_mb(plan: ModelPlan, precision: str, quantize: str = "none") -> float:
    """The base's weights in memory, in MB: in `precision`, with the decoder's linear weights
    in `quantize`'s bits where it is not none."""
    linear = sum(m.in_features * m.out_features for m in plan.modules if m.layer is not None)
    if quantize == "none":
        return plan.base_params * BYTES[precision] / 2**20
    return (linear * BYTES[quantize] + (plan.base_params - linear) * BYTES[precision]) / 2**20


def memory_line(plan: ModelPlan, precision: str = "auto", quantize: str = "none") -> str:
    if precision == "auto":  # resolved per device: float32 on CPU, bf16 (or fp16) on a GPU
        f32, half = (base_memory_mb(plan, p, quantize) for p in ("float32", "bf16"))
        how = f"{f32:,.0f} MB in float32 (CPU), {half:,.0f} MB in bf16 (GPU)"
    else:
        how = f"{base_memory_mb(plan, precision, quantize):,.0f} MB in {precision}"
    bits = f", decoder linear weights in {quantize}" if quantize != "none" else ""
    return f"base weights in memory: {how}{bits} (precision {precision}, quantize {quantize})"


def render(
    plan: ModelPlan, rank: int, alpha: float, dropout: float, bias: str,
    precision: str = "auto", quantize: str = "none",
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
        memory_line(plan, precision, quantize),
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


def architecture(model, placement) -> dict:
    """What the FLOP count needs to know about a model and its adapters, from the run itself."""
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
            [m.path, m.in_features, m.out_features, placement.ranks[m.path]]
            for m in placement.modules
        ],
    }
