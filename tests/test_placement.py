"""Placement tables: (architecture, strategy) -> module set and exact parameter count."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from loraplace.core.errors import UserError
from loraplace.plan.adapters import adapted_paths, attach
from loraplace.plan.models import base_params
from loraplace.plan.placement import lora_config, place
from loraplace.plan.roles import classify, num_layers
from loraplace.plan.strategies import BUILTINS, parse_strategy, select_layers

# Layer-0 modules (name after the block prefix) and their roles, per architecture.
EXPECTED_ROLES = {
    "gpt2": {
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.out",
        "mlp.c_fc": "mlp.up",
        "mlp.c_proj": "mlp.down",
    },
    "llama": {
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.o_proj": "attn.out",
        "mlp.gate_proj": "mlp.up",
        "mlp.up_proj": "mlp.up",
        "mlp.down_proj": "mlp.down",
    },
    "gpt_neox": {
        "attention.query_key_value": "attn.qkv",
        "attention.dense": "attn.out",
        "mlp.dense_h_to_4h": "mlp.up",
        "mlp.dense_4h_to_h": "mlp.down",
    },
    "opt": {
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.q_proj": "attn.q",
        "self_attn.out_proj": "attn.out",
        "fc1": "mlp.up",
        "fc2": "mlp.down",
    },
    "falcon": {
        "self_attention.query_key_value": "attn.qkv",
        "self_attention.dense": "attn.out",
        "mlp.dense_h_to_4h": "mlp.up",
        "mlp.dense_4h_to_h": "mlp.down",
    },
    "phi": {
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.dense": "attn.out",
        "mlp.fc1": "mlp.up",
        "mlp.fc2": "mlp.down",
    },
}
EXPECTED_ROLES["mistral"] = EXPECTED_ROLES["qwen2"] = EXPECTED_ROLES["gemma"] = EXPECTED_ROLES[
    "llama"
]

STRATEGIES = [
    "full",
    "attention",
    "ffn",
    "seed-attention",
    "seed-ffn",
    "seed-full",
    "mix=attn.v,mlp.down@top:2",
    "sparse=attn@every:2",
]


def meta_modules(kind: str):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(kind))
    return model, classify(model)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_roles_by_architecture(kind):
    _, modules = meta_modules(kind)
    layer0 = {m.path.split(".0.", 1)[1]: m.role for m in modules if m.layer == 0}
    assert layer0 == EXPECTED_ROLES[kind]
    assert num_layers(modules) == 4
    assert [m.path for m in modules if m.role == "other"] == ["lm_head"]  # reported, not dropped
    assert all(m.layer is not None for m in modules if m.role != "other")


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_meta_accounting_equals_peft(kind, strategy):
    """The plan made on the meta device is exactly what PEFT builds and trains."""
    meta, modules = meta_modules(kind)
    placement = place(modules, parse_strategy(strategy), rank=4)
    model = tiny_model(kind)
    assert base_params(meta) == base_params(model)
    peft_model = attach(model, placement, alpha=8, dropout=0.0)  # raises if PEFT disagrees
    assert adapted_paths(peft_model) == set(placement.paths)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == placement.trainable_params == sum(placement.trainable_by_role.values())
    assert sum(placement.trainable_by_layer.values()) == trainable


def test_gpt2_counts_by_hand():
    # hidden 32, 4 layers, r 4: c_attn 4*(32+96), c_proj 4*(32+32), c_fc 4*(32+128), mlp.c_proj 4*(128+32)
    _, modules = meta_modules("gpt2")
    per_layer = {"attn.qkv": 512, "attn.out": 256, "mlp.up": 640, "mlp.down": 640}
    expected = {
        "full": sum(per_layer.values()) * 4,
        "attention": (512 + 256) * 4,
        "ffn": (640 + 640) * 4,
        "seed-attention": (512 + 256 + 640) * 4,  # c_proj also hits mlp.c_proj
        "seed-ffn": 640 * 4,
    }
    for name, n in expected.items():
        assert place(modules, BUILTINS[name], rank=4).trainable_params == n, name


def test_seed_lists_on_gpt2_match_peft_suffix_and_roles():
    _, modules = meta_modules("gpt2")
    seed_att = place(modules, BUILTINS["seed-attention"], rank=4)
    assert seed_att.literal
    assert {
        m.path.rsplit(".", 2)[-2] + "." + m.path.rsplit(".", 1)[-1] for m in seed_att.modules
    } == {"attn.c_attn", "attn.c_proj", "mlp.c_proj"}
    # the literal list selects exactly the roles loraplace uses for it on other models
    by_roles = [m for m in modules if m.role in BUILTINS["seed-attention"].roles]
    assert list(seed_att.modules) == by_roles
    assert place(modules, BUILTINS["seed-ffn"], rank=4).paths == [
        m.path for m in modules if m.role == "mlp.up"
    ]


def test_seed_lists_on_llama_fall_back_to_roles():
    _, modules = meta_modules("llama")
    p = place(modules, BUILTINS["seed-attention"], rank=4)
    assert not p.literal
    assert set(p.trainable_by_role) == {"attn.q", "attn.k", "attn.v", "attn.out", "mlp.down"}
    assert set(place(modules, BUILTINS["seed-ffn"], rank=4).trainable_by_role) == {"mlp.up"}


def test_dialogpt_medium_from_config_alone(capsys):
    from conftest import DIALOGPT

    from loraplace.plan.models import meta_model, resolve_model

    model = meta_model(resolve_model(str(DIALOGPT)))
    modules = classify(model)
    assert base_params(model) == 354_823_168  # tied lm_head counted once
    assert place(modules, BUILTINS["full"]).trainable_params == 24 * 16 * (
        4096 + 2048 + 5120 + 5120
    )
    assert len(place(modules, BUILTINS["seed-attention"]).paths) == 72


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("0:2", [0, 1]),
        ("2:", [2, 3]),
        ("-1:", [3]),
        ("top:2", [2, 3]),
        ("bottom:1", [0]),
        ("every:2", [0, 2]),
        ("block:1/2", [2, 3]),
        ("block:0/3", [0]),
        ("block:2/3", [2, 3]),
        (None, [0, 1, 2, 3]),
    ],
)
def test_layer_selections(spec, expected):
    assert select_layers(spec, 4) == expected


@pytest.mark.parametrize(
    "spec", ["0:9", "top:5", "top:0", "every:x", "block:3/3", "5:6", "nonsense"]
)
def test_bad_layer_selections(spec):
    with pytest.raises(UserError):
        select_layers(spec, 4)


def test_parse_strategy_roles_and_errors():
    s = parse_strategy("qv=attn.q,attn.v@top:2")
    assert (s.name, s.roles, s.layers) == ("qv", ("attn.q", "attn.v"), "top:2")
    assert parse_strategy("a=attn").roles == ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.out")
    assert parse_strategy("deep=full@top:2").roles == BUILTINS["full"].roles
    with pytest.raises(UserError, match="did you mean 'attention'"):
        parse_strategy("atention")
    with pytest.raises(UserError, match="did you mean 'mlp.up'"):
        parse_strategy("x=mlp.upp")


def test_selection_matching_nothing_says_what_the_model_has():
    _, modules = meta_modules("gpt2")
    with pytest.raises(UserError, match="attn.qkv, attn.out, mlp.up, mlp.down in 4 layers"):
        place(modules, parse_strategy("q=attn.q"), rank=4)


def test_where_ranks_differ_alpha_grows_with_rank_unless_asked_otherwise():
    model = tiny_model("llama")
    strategy = parse_strategy("mixed=attn.q:4,attn.v:16")
    placement = place(classify(model), strategy, rank=8)

    def scales(scaling):
        peft_model = attach(tiny_model("llama"), placement, alpha=16, dropout=0.0, scaling=scaling,
                            rank=8)  # fmt: skip
        found = {}
        for name, module in peft_model.named_modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict) and module.scaling:
                found[name.rsplit(".", 1)[-1]] = module.scaling["default"]
        return found

    # the config's alpha / rank = 2 for every module, whatever its rank
    assert set(scales("rank").values()) == {2.0}
    assert set(scales("constant").values()) == {16 / 4, 16 / 16}  # PEFT's default
    assert set(scales("rslora").values()) == {16 / 4**0.5, 16 / 16**0.5}
    uniform = place(classify(model), BUILTINS["attention"], rank=8)
    assert (
        lora_config(uniform, 16, 0.0, scaling="rank", rank=8).to_dict()
        == lora_config(uniform, 16, 0.0, scaling="constant", rank=8).to_dict()
    )  # one rank: the rules agree
