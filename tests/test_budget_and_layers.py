"""Equal-budget rank solving and depth strategies, on the seed's and the embedded model's configs."""

from __future__ import annotations

import pytest
from conftest import DIALOGPT

from loraplace.cli import main
from loraplace.plan.budget import cost_per_rank, equalize, solve_ranks
from loraplace.plan.models import meta_model, resolve_model
from loraplace.plan.placement import place
from loraplace.plan.roles import classify
from loraplace.plan.strategies import BUILTINS, layer_study, parse_strategy


@pytest.fixture(scope="module")
def dialogpt_modules():
    return classify(meta_model(resolve_model(str(DIALOGPT))))


@pytest.fixture(scope="module")
def smollm_modules():
    return classify(meta_model(resolve_model("embedded")))


@pytest.mark.parametrize("model", ["dialogpt_modules", "smollm_modules"])
@pytest.mark.parametrize(
    "reference,other",
    [
        ("attention", "ffn"),
        ("ffn", "attention"),
        ("full", "seed-ffn"),
        ("attention", "top=attn,mlp@top:6"),
    ],
)
def test_equal_budget_within_one_rank_step(request, model, reference, other):
    modules = request.getfixturevalue(model)
    ref, strategy = parse_strategy(reference), parse_strategy(other)
    target = place(modules, ref, rank=16).trainable_params
    ranks = solve_ranks(modules, strategy, target)
    achieved = place(
        modules, strategy.__class__(**{**strategy.__dict__, "rank_by_role": ranks}), rank=16
    ).trainable_params
    one_step = sum(cost_per_rank(modules, strategy).values())  # raising every role's rank by one
    assert abs(achieved - target) <= one_step
    assert set(ranks) == set(cost_per_rank(modules, strategy))


def test_equal_budget_attention_vs_ffn_on_smollm(smollm_modules):
    att, ffn = equalize(smollm_modules, [BUILTINS["attention"], BUILTINS["ffn"]], "attention", 16)
    assert att.rank_by_role == {}
    target = place(smollm_modules, att, 16).trainable_params
    achieved = place(smollm_modules, ffn, 16).trainable_params
    assert target == 1_843_200
    # ffn at a uniform r 10 would be 1,900,800; per-role ranks get within 0.5 % of the target
    assert abs(achieved - target) / target < 0.005
    assert place(smollm_modules, ffn, 16).ranks != {}


def test_layer_study_strategies(dialogpt_modules):
    strategies = layer_study("attn,mlp", blocks=4, top_k=(2, 6))
    layers = {s.name: place(dialogpt_modules, s, 16).layers for s in strategies}
    assert layers["attn+mlp-bottom-third"] == list(range(0, 8))
    assert layers["attn+mlp-middle-third"] == list(range(8, 16))
    assert layers["attn+mlp-top-third"] == list(range(16, 24))
    assert layers["attn+mlp-top6"] == list(range(18, 24))
    assert layers["attn+mlp-every2"] == list(range(0, 24, 2))
    assert [layers[f"attn+mlp-block{i}of4"] for i in range(4)] == [
        list(range(6 * i, 6 * i + 6)) for i in range(4)
    ]


def test_plan_shows_layer_study_and_equal_budget(capsys):
    assert (
        main(["plan", "--model", str(DIALOGPT), "--layer-study", "attn", "--strategy", "full"]) == 0
    )
    out = capsys.readouterr().out
    assert "attn-top-third" in out and "block:2/3" in out and "attn-block3of4" in out
    assert (
        main(
            [
                "plan",
                "--model",
                str(DIALOGPT),
                "--strategy",
                "attention",
                "--strategy",
                "ffn",
                "--equal-budget",
                "attention",
                "--json",
            ]
        )
        == 0
    )
    import json

    data = json.loads(capsys.readouterr().out)
    att, ffn = data["strategies"]
    assert (
        abs(ffn["trainable_params"] - att["trainable_params"]) <= 16 * 1024 * 24
    )  # one rank step of one role
    assert len(set(ffn["ranks"].values())) >= 1 and ffn["trainable_params"] != 3_932_160
