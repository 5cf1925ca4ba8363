"""`loraplace advise`: scores equal a direct computation, the recommendation plans as promised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ALPACA_HEAD, DIALOGPT, tiny_model

from loraplace.advise.scores import score_modules
from loraplace.analysis.stats import holm
from loraplace.cli import main
from loraplace.data.rows import IGNORE, Example
from loraplace.plan.budget import cost_per_rank
from loraplace.plan.roles import classify
from loraplace.plan.strategies import format_strategy, parse_strategy


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP waits that dominate on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_lora_b_score_is_the_b_gradient_peft_sees_at_init():
    from peft import LoraConfig, get_peft_model

    from loraplace.advise.scores import lora_a

    model = tiny_model("llama")
    modules = classify(model)
    examples = _examples()
    scores = score_modules(model, examples, modules, seed=0)
    scored = [m for m in modules if m.role != "other"]
    i = next(k for k, m in enumerate(scored) if m.role == "mlp.down")
    target, rank, alpha = scored[i], 4, 8.0
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=[target.path])
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.get_submodule(target.path)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a(rank, target.in_features, seed=i))
    n_targets = sum(len(e.input_ids) - 1 for e in examples)
    for e in examples:
        ids = torch.tensor([e.input_ids])
        logits = peft_model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        (loss / n_targets).backward()
    b_grad = layer.lora_B["default"].weight.grad
    expected = (alpha / rank) ** 2 * scores[target.path].lora_b[rank]
    assert b_grad.norm().item() ** 2 == pytest.approx(expected, rel=1e-4)


def test_rank_correlations_equal_scipy():
    from scipy import stats as sps

    from loraplace.advise.validate import _kendall, _spearman

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 9).astype(float)  # ties on purpose
    ys = rng.integers(0, 6, (4, 9)).astype(float)
    for y in ys:
        assert _spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic)
        assert _kendall(x, y) == pytest.approx(sps.kendalltau(x, y).statistic)
    assert np.allclose(_spearman(x, ys), [sps.spearmanr(x, y).statistic for y in ys])


def test_rank_syntax_round_trips():
    s = parse_strategy("adv=mlp.up:12,mlp.down:10,attn.q@block:1/3")
    assert s.rank_by_role == {"mlp.up": 12, "mlp.down": 10}
    again = parse_strategy(format_strategy(s))
    assert (again.roles, again.layers, again.rank_by_role) == (s.roles, s.layers, s.rank_by_role)
    with pytest.raises(Exception, match="positive whole number"):
        parse_strategy("x=mlp.up:0")
    plain = parse_strategy("top6=attn,mlp.down@top:6")  # strategies without ranks read as before
    assert plain.rank_by_role == {} and plain.layers == "top:6" and "mlp.down" in plain.roles
    assert parse_strategy("x=full:4@top:2").rank_by_role["mlp.up"] == 4


def test_advise_recommendation_round_trips_through_plan(tiny_gpt2_dir, capsys):
    argv = ["advise", "--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD), "--train-split",
            "train[:8]", "--max-length", "64", "--loss-on", "all", "--budget", "6000", "--json"]  # fmt: skip
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
            "train[:4]", "--max-length", "32", "--loss-on", "all", "--score", "plop"]  # fmt: skip
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


def _result(name: str, seed: int, gain: float, per_example: list[float]) -> dict:
    """A finished validation run: eval loss 2 - gain; per-example loss sums over 10 tokens."""
    return {
        "strategy": name,
        "seed": seed,
        "status": "ok",
        "metrics": {"base_eval_loss": 2.0, "eval_loss": 2.0 - gain},
        "per_example": {"loss_sum": per_example, "tokens": [10] * len(per_example)},
    }


def _validation(seeds=(1, 2, 3), n=12):
    """Twelve candidates whose gains fall with their index; grad follows the gains exactly,
    params loosely, lora_b says what params says and plop the opposite of grad."""
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(n)]
    true_gain = {name: 0.5 - 0.03 * i for i, name in enumerate(names)}
    loose = {name: g + rng.normal(0, 0.08) for name, g in true_gain.items()}
    advice = {
        "budget": 1000,
        "candidates": [
            {
                "name": name,
                "strategy": f"{name}=mlp",
                "trainable_params": 1000,
                "predicted": {"grad": g, "plop": -g, "lora_b": loose[name], "params": loose[name]},
            }
            for name, g in true_gain.items()
        ],
    }
    results = []
    for name, g in true_gain.items():
        for seed in seeds:
            shift = g + rng.normal(0, 0.005)  # the seed's
            loss = [10 * (2 - shift) + rng.normal(0, 0.05) for _ in range(8)]
            results.append(_result(name, seed, 2 - sum(loss) / (10 * len(loss)), loss))
    return advice, results, names


def test_validation_tests_each_score_against_parameter_count():
    from loraplace.advise.validate import analyze, render_validation

    advice, results, names = _validation()
    report = analyze(advice, results, names)
    rules = {r["rule"]: r for r in report["rules"]}
    assert report["best"] == "c0" and report["resampled"] == "candidates"
    assert rules["grad"]["spearman"] == pytest.approx(1.0) and rules["grad"]["regret"] == 0
    assert rules["plop"]["spearman"] == pytest.approx(-1.0) and rules["plop"]["recommends"] == "c11"
    assert rules["inverted plop"]["regret"] == 0 and rules["plop"]["regret"] > 0
    assert report["verdicts"]["grad"].startswith("beat parameter count")
    assert report["verdicts"]["plop"].startswith("lost to parameter count")
    assert report["verdicts"]["lora_b"].startswith(
        "not distinguishable from parameter count (Spearman difference +0.00"
    )
    against = {t["score"]: t for t in report["against_params"]}
    assert [against[s]["p_adjusted"] for s in ("grad", "lora_b", "plop")] == pytest.approx(
        holm([against[s]["p_value"] for s in ("grad", "lora_b", "plop")])
    )
    lo, hi = rules["params"]["spearman_ci"]  # over candidates: a real spread, not a point
    assert lo < rules["params"]["spearman"] < hi and hi - lo > 0.05
    assert "| grad | c0 | 1.00 |" in render_validation(report)


def test_regret_standard_errors_are_standard_errors():
    """Runs that differ from their strategy's mean by a seed offset alone: the regret's SE is
    the seeds' sqrt(sum c^2 s^2 / k), for one choice and for a random one alike."""
    from loraplace.advise.validate import regret
    from loraplace.analysis.metrics import METRICS, per_example

    offsets = {"a": [0.0, 0.2], "b": [0.1, 0.5], "c": [0.3, 0.3]}  # each candidate's two seeds
    results = [
        _result(name, seed, 0.0, [10 * (1 + off)] * 5)
        for name, offs in offsets.items()
        for seed, off in enumerate(offs)
    ]
    losses = per_example(results, METRICS[0])
    var = {n: np.var(o, ddof=1) for n, o in offsets.items()}
    loss, se = regret(losses, "a", {"b": 1.0})
    assert loss == pytest.approx(0.2) and se == pytest.approx(np.sqrt((var["a"] + var["b"]) / 2))
    loss, se = regret(losses, "a", dict.fromkeys(offsets, 1 / 3))
    coefs = {"a": 1 / 3 - 1, "b": 1 / 3, "c": 1 / 3}
    assert loss == pytest.approx(np.mean([0.1, 0.3, 0.3]) - 0.1)
    assert se == pytest.approx(np.sqrt(sum(coefs[n] ** 2 * var[n] / 2 for n in offsets)))


def test_seeds_are_resampled_only_where_there_are_enough():
    from loraplace.advise.validate import MIN_SEEDS_TO_RESAMPLE, resample

    gain = np.arange(12.0)[:, None] + np.arange(5.0)[None, :] / 10  # (candidates, seeds)
    idx, means = resample(gain[:, :3], np.random.default_rng(0))
    assert np.array_equal(means, gain[:, :3].mean(axis=1)[idx])  # candidates only
    idx, means = resample(gain[:, :MIN_SEEDS_TO_RESAMPLE], np.random.default_rng(0))
    assert not np.allclose(means, gain.mean(axis=1)[idx])  # each candidate's seeds drawn too
    assert np.all(np.floor(means) == idx)  # a candidate's own seeds only


def test_dependent_correlations_hold_their_level_and_see_a_real_difference():
    """Simulated candidates: two scores correlated 0.5 with each other and equally (0.6) with
    the gains are told apart in about 5 % of studies; a score at 0.9 against one at 0.3 in
    most."""
    from loraplace.advise.validate import _spearman, dependent_correlations

    def rate(r1, r2, r12, n=12, studies=1500):
        cov = np.array([[1, r1, r2], [r1, 1, r12], [r2, r12, 1]])
        x = np.random.default_rng(1).multivariate_normal(np.zeros(3), cov, size=(studies, n))
        g, s1, s2 = x[..., 0], x[..., 1], x[..., 2]
        rho1, rho2, rho12 = _spearman(s1, g), _spearman(s2, g), _spearman(s1, s2)
        p = [dependent_correlations(*r, n)[1] for r in zip(rho1, rho2, rho12, strict=True)]
        return np.mean(np.array(p) < 0.05)

    assert 0.02 <= rate(0.6, 0.6, 0.5) <= 0.08
    assert rate(0.9, 0.3, 0.4) > 0.6
    z, p = dependent_correlations(0.9, 0.5, 0.6, 12)
    assert z > 0 and dependent_correlations(0.5, 0.9, 0.6, 12)[0] == pytest.approx(-z)


@pytest.mark.slow
def test_validate_end_to_end_on_a_tiny_model(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "val"
    argv = ["advise", "--validate", "--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD),
            "--train-split", "train[:4]", "--eval-split", "train[100:104]", "--epochs", "1",
            "--seed", "1", "--seed", "2", "--examples", "4", "--candidates", "full,attention,ffn",
            "--max-length", "32", "--loss-on", "all", "--set", "generations=0", "--rank", "4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "validation.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["attention", "ffn", "full"]
    assert (report["config"]["rank"], report["config"]["max_length"]) == (4, 32)  # flags reach it
    assert len({c["trainable_params"] for c in report["candidates"]}) <= 3
    assert (out / "validation.md").read_text().strip() in text
    assert {"grad", "params", "always full", "random (expected)"} <= {
        r["rule"] for r in report["rules"]
    }
    assert all(r["regret_se"] >= 0 for r in report["rules"])
