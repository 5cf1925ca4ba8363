"""Attach LoRA adapters exactly where a placement says, and prove it.

    peft_model = attach(model, placement, alpha=32, dropout=0.1)

PEFT receives explicit full module names; after wrapping, the set of modules that really carry
a LoRA layer is compared with the plan, and their trainable parameter count with the plan's.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from loraplace.plan.placement import AdapterPlan, Placement, lora_config

PEFT_PREFIX = "base_model.model."


def adapted_paths(peft_model: torch.nn.Module) -> set[str]:
    return {
        name.removeprefix(PEFT_PREFIX)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attach(
    model: torch.nn.Module,
    placement: Placement | AdapterPlan,
    alpha: float,
    dropout: float,
    bias: str = "none",
    scaling: str = "rank",
    rank: int | None = None,
) -> torch.nn.Module:
    """Wrap `model` with PEFT LoRA on the placement's modules at their ranks (alpha scaled
    with them: `placement.lora_config`); raise if PEFT did otherwise."""
    config = lora_config(placement, alpha, dropout, bias, scaling, rank)
    peft_model = get_peft_model(model, config)
    got, want = adapted_paths(peft_model), set(placement.paths)
    if got != want:
        raise RuntimeError(
            f"PEFT adapted {len(got)} modules but the plan has {len(want)}: "
            f"extra {sorted(got - want)[:3]}, missing {sorted(want - got)[:3]}"
        )
    if trainable_params(peft_model) != placement.trainable_params:
        raise RuntimeError(
            f"PEFT trains {trainable_params(peft_model):,} parameters, the plan says "
            f"{placement.trainable_params:,}"
        )
    return peft_model
