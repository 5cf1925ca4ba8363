"""Which layer and which role each adaptable linear module of a causal LM plays.

    from loraplace.plan.roles import classify
    modules = classify(model)        # model may live on the meta device
    [(m.path, m.layer, m.role) for m in modules][:2]
    # [('transformer.h.0.attn.c_attn', 0, 'attn.qkv'), ('transformer.h.0.attn.c_proj', 0, 'attn.out')]

Roles come from the module tree, the modules' types and their shapes, never from a list of
model names: the decoder blocks are the longest `ModuleList`; inside a block, a container whose
class or attribute name says attention (or MLP) holds the attention (or MLP) projections; the
output projection is the one that writes back to the hidden size; an MLP's up projections read
the hidden size and its down projection writes it. Whatever does not fit is `other`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

ATTN_ROLES = ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.out")
MLP_ROLES = ("mlp.up", "mlp.down")
ROLES = ATTN_ROLES + MLP_ROLES + ("other",)

_ATTN_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_NAME = re.compile(r"mlp|feed_?forward|ffn", re.IGNORECASE)
_QKV_TOKENS = {
    "q": "attn.q",
    "query": "attn.q",
    "k": "attn.k",
    "key": "attn.k",
    "v": "attn.v",
    "value": "attn.v",
}


@dataclass(frozen=True)
class LinearModule:
    """One adaptable linear module: its full path, shape, decoder layer (None outside) and role."""

    path: str
    in_features: int
    out_features: int
    layer: int | None
    role: str
    bias: bool = False


def is_adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear | Conv1D)


def _has_bias(module: torch.nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _shape(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):  # GPT-2 stores the weight as (in, out)
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def _decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList)
        and len(mod) > 0
        and any(is_adaptable(m) for m in mod[0].modules())
        and not is_adaptable(mod[0])
    ]
    return max(lists, key=lambda item: len(item[1]), default=None)


def hidden_size(model: torch.nn.Module) -> int:
    size = getattr(model.config, "hidden_size", None)
    return int(size) if size else int(model.get_input_embeddings().embedding_dim)


def _group(block: torch.nn.Module, rel_path: str) -> str | None:
    """'attn' or 'mlp' from the containers between the block and the module, else None."""
    parts = rel_path.split(".")[:-1]
    for i in range(len(parts)):
        container = block.get_submodule(".".join(parts[: i + 1]))
        label = f"{parts[i]} {type(container).__name__}"
        if _ATTN_NAME.search(label):
            return "attn"
        if _MLP_NAME.search(label):
            return "mlp"
    return None


def _attn_roles(members: list[tuple[str, int, int]], hidden: int) -> dict[str, str]:
    """Roles inside one attention block; members are (rel_path, in, out) in registration order."""
    outs = [m for m in members if m[2] == hidden]
    if len(members) < 2 or not outs:
        return {m[0]: "other" for m in members}
    out = outs[-1][0]  # the output projection is registered after the input projections
    inputs = [m for m in members if m[0] != out]
    roles = {out: "attn.out"}
    if len(inputs) == 1:
        roles[inputs[0][0]] = "attn.qkv"
        return roles
    for rel, _, _ in inputs:
        tokens = re.split(r"[._]", rel.rsplit(".", 1)[-1].lower())
        found = {_QKV_TOKENS[t] for t in tokens if t in _QKV_TOKENS}
        roles[rel] = found.pop() if len(found) == 1 else ("attn.qkv" if found else "other")
    return roles


def _mlp_roles(members: list[tuple[str, int, int]], hidden: int) -> dict[str, str]:
    """Roles inside one MLP: up projections read the hidden size, the down projection writes it."""
    roles = {}
    for rel, n_in, n_out in members:
        if n_in == hidden and n_out != hidden:
            roles[rel] = "mlp.up"
        elif n_out == hidden and n_in != hidden:
            roles[rel] = "mlp.down"
    square = [m for m in members if m[0] not in roles and m[1] == m[2] == hidden]
    for i, (rel, _, _) in enumerate(square):  # ambiguous by shape: the last one is the down
        roles[rel] = "mlp.down" if i == len(square) - 1 else "mlp.up"
    return {m[0]: roles.get(m[0], "other") for m in members}


def classify(model: torch.nn.Module) -> list[LinearModule]:
    """Every `nn.Linear` / `Conv1D` of `model`, in module order, with its layer and role."""
    hidden = hidden_size(model)
    found = _decoder_blocks(model)
    roles: dict[str, tuple[int, str]] = {}
    if found is not None:
        prefix, blocks = found
        for layer, block in enumerate(blocks):
            groups: dict[str | None, list[tuple[str, int, int]]] = {}
            for rel, mod in block.named_modules():
                if is_adaptable(mod):
                    groups.setdefault(_group(block, rel), []).append((rel, *_shape(mod)))
            block_roles = {
                **_mlp_roles(groups.get(None, []), hidden),
                **_mlp_roles(groups.get("mlp", []), hidden),
                **_attn_roles(groups.get("attn", []), hidden),
            }
            for rel, role in block_roles.items():
                roles[f"{prefix}.{layer}.{rel}"] = (layer, role)
    return [
        LinearModule(name, *_shape(mod), *roles.get(name, (None, "other")), _has_bias(mod))
        for name, mod in model.named_modules()
        if is_adaptable(mod)
    ]


def num_layers(modules: list[LinearModule]) -> int:
    layers = [m.layer for m in modules if m.layer is not None]
    return max(layers) + 1 if layers else 0
