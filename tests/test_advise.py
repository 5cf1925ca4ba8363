"""`loraplace advise`: scores equal a direct computation, the recommendation plans as promised."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALPACA_HEAD, DIALOGPT, tiny_model

from loraplace.budget import cost_per_rank
from loraplace.cli import main
from loraplace.data import IGNORE, Example
from loraplace.roles import classify
from loraplace.scores import score_modules
from loraplace.strategies import format_strategy, parse_strategy


def _examples(n: int = 5) -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (6 + 3 * i,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE] + ids[1:]))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scores_equal_a_direct_computation(kind):
    model = tiny_model(kind)
    modules = classify(model)
    examples = _examples()
    scores = score_modules(model, examples, modules, max_tokens=16)  # several padded batches

    # Direct: one example at a time, no padding; inputs captured, gradient by autograd.
    layers = {m.path: model.get_submodule(m.path) for m in modules if m.role != "other"}
    inputs = {p: [] for p in layers}
    hooks = [
        layers[p].register_forward_hook(lambda mod, i, o, p=p: inputs[p].append(i[0][0].detach()))
        for p in layers
    ]
    model.zero_grad()
    n_targets = sum(len(e.input_ids) - 1 for e in examples)
    for e in examples:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        (loss / n_targets).backward()
    for h in hooks:
        h.remove()
    for path, layer in layers.items():
        w = layer.weight if isinstance(layer, torch.nn.Linear) else layer.weight.T  # (out, in)
        z = torch.cat(inputs[path])  # (tokens, in)
        ratio = (z @ w.T).norm(dim=-1) / (z.norm(dim=-1) * w.norm() / w.shape[1] ** 0.5)
        grad = layer.weight.grad if isinstance(layer, torch.nn.Linear) else layer.weight.grad.T
        sv2 = torch.linalg.svdvals(grad.double()) ** 2
        got = scores[path]
        assert got.nfn == pytest.approx(ratio.mean().item(), rel=1e-4)
        for k in (1, 2, 4):
            assert got.grad_energy[k] == pytest.approx(sv2[:k].sum().item(), rel=1e-3, abs=1e-12)
        assert got.grad_energy[-1] == pytest.approx(grad.double().norm().item() ** 2, rel=1e-4)
        assert got.lora_b[4] > 0


def test_rank_syntax_round_trips():
    s = parse_strategy("adv=mlp.up:12,mlp.down:10,attn.q@block:1/3")
    assert s.rank_by_role == {"mlp.up": 12, "mlp.down": 10}
    again = parse_strategy(format_strategy(s))
    assert (again.roles, again.layers, again.rank_by_role) == (s.roles, s.layers, s.rank_by_role)
    with pytest.raises(Exception, match="positive whole number"):
        parse_strategy("x=mlp.up:0")


def test_advise_recommendation_round_trips_through_plan(tiny_gpt2_dir, capsys):
    argv = ["advise", "--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD), "--train-split",
            "train[:8]", "--max-length", "64", "--budget", "6000", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["best_by_score"]) == {"grad", "lora_b", "plop", "params"}
    assert {"attn.qkv", "attn.out", "mlp.up", "mlp.down"} <= set(report["by_role"])
    assert list(report["by_band"]) == ["bottom", "middle", "top"]
    text = report["recommended"]
    assert main(["plan", "--model", str(tiny_gpt2_dir), "--strategy", text, "--json"]) == 0
    (planned,) = json.loads(capsys.readouterr().out)["strategies"]
    modules = classify(tiny_model("gpt2"))
    one_step = sum(cost_per_rank(modules, parse_strategy(text)).values())
    assert abs(planned["trainable_params"] - 6000) <= one_step
    assert planned["trainable_params"] == report["recommended_params"]


def test_advise_text_names_the_recommendation(tiny_gpt2_dir, capsys):
    argv = ["advise", "--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD), "--train-split",
            "train[:4]", "--max-length", "32", "--score", "plop"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended by plop" in out and "--strategy '" in out and "peak memory" in out


def test_advise_without_weights_says_why(capsys):
    assert main(["advise", "--model", str(DIALOGPT), "--data", str(ALPACA_HEAD)]) == 2
    err = capsys.readouterr().err
    assert "no weight files" in err and "plan" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_advise_unknown_score_is_one_sentence(tiny_gpt2_dir, capsys):
    assert (
        main(["advise", "--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD), "--score", "x"])
        == 2
    )
    assert "unknown score" in capsys.readouterr().err
