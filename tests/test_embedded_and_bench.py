"""The embedded model end to end (slow), and the benchmark command on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
from bench import main as bench_main
from conftest import ALPACA_HEAD

from loraplace.config import StudyConfig
from loraplace.core.results import summary_rows
from loraplace.fast.hardware import Machine
from loraplace.study.prepare import spec_for
from loraplace.train.run import train_run


@pytest.mark.slow
def test_a_few_steps_on_the_embedded_model(tmp_path):
    cfg = StudyConfig(model="embedded", data=str(ALPACA_HEAD), train_split="train[:8]", eval_split="train[100:102]",
                      epochs=1, max_length=128, generations=1, max_new_tokens=8,
                      strategies=["attention"])  # fmt: skip
    result = train_run(spec_for(cfg, "attention", 42, tmp_path))
    m = result["metrics"]
    assert m["trainable_params"] == 1_843_200 and m["optimizer_steps"] == 2
    assert result["packed"] is True  # the block-diagonal packing was verified exact on SmolLM2
    assert 0.3 < m["eval_loss"] < 5 and 0.3 < m["base_eval_loss"] < 5
    assert math.isclose(m["perplexity"], math.exp(m["eval_loss"]))
    assert len(result["per_example"]["loss"]) == 2 and result["generations"][0]["base"]
    # the task metric: a greedy answer to each evaluation row against its reference
    assert set(result["task"]) == {"rouge_l", "exact_match"} and "task" in result["phases_s"]
    assert len(result["task"]["rouge_l"]) == 2 and all(
        0 <= v <= 1 for v in result["task"]["rouge_l"]
    )
    # the response's loss (the default) and the seed's all-token loss beside it
    (row,) = summary_rows([result | {"strategy": "attention", "seed": 42, "status": "ok"}])
    assert (
        math.isfinite(row["eval_loss_all_tokens"]) and row["eval_loss_all_tokens"] != m["eval_loss"]
    )
    assert sum(result["per_example"]["all_tokens"]) > sum(result["per_example"]["tokens"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    here = Machine.here()
    low = "bfloat16" if here.native_bf16 and here.bf16_products else "float32"  # auto
    assert result["product_dtype"] == low


def test_bench_runs_both_paths_side_by_side(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD), "--train-split", "train[:8]",
            "--eval-split", "train[100:104]", "--epochs", "1", "--strategy", "full", "--strategy", "attention",
            "--set", "max_length=64", "--set", "loss_on=all", "--out", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["strategy"] for r in report["rows"]] == ["full", "attention"]
    for row in report["rows"]:
        assert row["plain_wall_s"] > 0 and row["loraplace_wall_s"] > 0
        assert 0 < row["loraplace_mfu_pct"] and 0 < row["plain_mfu_pct"]
        assert abs(row["eval_loss_diff_pct"]) < 2  # same study, same evaluation code
    assert report["peak_gflops"] > 0 and report["total"]["speedup"] > 0
    if report["loraplace_runs_at_once"] > 1:  # one study, runs sharing the machine
        assert all(r["speedup"] is None for r in report["rows"])
        assert "runs at once" in (out / "bench.md").read_text()
    table = (out / "bench.md").read_text()
    assert "| total |" in table
    for row in report["rows"]:  # the fixed cost of each run, part by part
        line = next(
            x for x in table.splitlines() if x.startswith(f"| {row['strategy']} | loraplace |")
        )
        assert line.endswith(f"| {row['loraplace_outside_train_s']:.2f} |")
        assert row["loraplace_phases_s"]["epoch_evals"] > 0
    assert "epoch evaluations" in table and "| other |" in table
    assert (out / "plain/runs/full/seed-42/result.json").is_file()
    plain = json.loads((out / "plain/runs/full/seed-42/result.json").read_text())
    assert plain["config"]["pad_to"] == "max_length" and plain["packed"] is False
    assert plain["product_dtype"] == "float32"  # the plain path never rounds to bfloat16
    assert {r["plain_product_dtype"] for r in report["rows"]} == {"float32"}


def test_training_flops_counts_each_part_once():
    from bench import training_flops

    # one frozen 4x8 linear (32 MACs per token) with a rank-2 adapter, 1 layer, attention width 4
    result = {
        "architecture": {
            "linear_macs_per_token": 32,
            "n_layers": 1,
            "attn_dim": 4,
            "adapters": [["l", 4, 8, 2]],
        }
    }
    frozen = 4 * 32 * 10  # forward and input gradient, 10 tokens
    adapter = (2 + 4) * 2 * (4 + 8) * 10  # forward, then input and weight gradients
    attention = 3 * 4 * 4 * (6 * 6 / 2 + 4 * 4 / 2)  # two sequences, 6 and 4 tokens
    assert training_flops(result, [6, 4], epochs=2) == 2 * (frozen + adapter + attention)
