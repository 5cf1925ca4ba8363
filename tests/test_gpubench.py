"""`make bench-gpu`'s CPU dry run: the GPU benchmark script is known to work before a GPU sees it."""

from __future__ import annotations

import json
import math

import pytest
from gpubench import main, render

MODELS = ["embedded", "dialogpt-medium", "llama-3.2-1b"]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--dry-run", "--work", str(tmp_path / "work")]) == 0
    found = records(out)
    env = found[0]
    assert env["part"] == "environment" and env["torch"] and env["gpu_count"] >= 0
    # (b) throughput for each model, (c) its peak memory; no MFU without a known GPU peak
    throughput = [r for r in found if r["part"] == "throughput"]
    assert [r["model"] for r in throughput] == MODELS
    for r in throughput:
        assert r["status"] == "ok", r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["peak_memory_mb"] > 0 and r["mfu_pct"] is None
        assert 0 < r["trainable_params"] < r["params"]
    assert [r["weights"] for r in throughput] == ["pretrained", "random weights", "random weights"]
    # (a) the study, plain and loraplace, with (c) both peaks
    (study,) = [r for r in found if r["part"] == "study"]
    assert study["status"] == "ok" and study["strategy"] == "full"
    assert study["plain_wall_s"] > 0 and study["loraplace_wall_s"] > 0
    assert study["plain_peak_memory_mb"] > 0 and study["loraplace_peak_memory_mb"] > 0
    assert abs(study["eval_loss_diff_pct"]) < 2  # same study, same evaluation
    table = (out / "results.md").read_text()
    assert table == render(found)
    assert table.count("| random weights |") == 2 and "| full |" in table
    assert "dry run" in table and (out / "bench.log").is_file()


def test_a_part_that_fails_is_recorded_and_the_rest_still_run(tmp_path):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--dry-run", "--parts", "throughput",
            "--model", f"dialogpt-medium={tmp_path / 'missing'}"]  # fmt: skip
    assert main(argv) == 0
    by_model = {r["model"]: r for r in records(out) if r["part"] == "throughput"}
    assert list(by_model) == MODELS  # the model after the failed one was measured too
    failed = by_model["dialogpt-medium"]
    assert failed["status"] == "failed" and "tokens_per_s" not in failed
    assert failed["error"].startswith("OSError")
    assert by_model["llama-3.2-1b"]["status"] == "ok"
    assert by_model["llama-3.2-1b"]["tokens_per_s"] > 0
    assert "| dialogpt-medium | – |" in (out / "results.md").read_text()
    assert "failed: OSError" in (out / "results.md").read_text()
    assert not [r for r in records(out) if r["part"] == "study"]  # left out by --parts


def test_results_are_whole_after_every_measurement(tmp_path, monkeypatch):
    """A benchmark killed after its first measurement still leaves both files, readable."""
    import gpubench

    def killed(spec, plan):
        raise KeyboardInterrupt  # what a timeout's signal looks like in Python

    monkeypatch.setattr(gpubench, "measure_throughput", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(tmp_path), "--dry-run", "--parts", "throughput"])
    (env,) = records(tmp_path)  # the environment was written before the first measurement
    assert env["part"] == "environment"
    assert "## (b, c)" in (tmp_path / "results.md").read_text()


def test_the_gpu_bench_states_tf32_and_counts_attention_and_adapter_flops():
    from gpubench import environment_record, flops_per_token

    env = environment_record("cpu")
    assert {"tf32_matmul", "tf32_cudnn", "float32_matmul_precision"} <= set(env)
    facts = {"frozen_linear_params": 1000, "adapter_macs_per_token": 10, "n_layers": 2,
             "attn_dim": 8}  # fmt: skip
    # frozen 4 x 1000, adapters 6 x 10, causal attention 3 x 2 x layers x dim x seq
    assert flops_per_token(facts, 64) == 4000 + 60 + 3 * 2 * 2 * 8 * 64
    assert flops_per_token(facts, 128) - flops_per_token(facts, 64) == 3 * 2 * 2 * 8 * 64


def test_a_failed_side_gives_no_speedup_and_the_plain_side_takes_loraplaces_precision(
    tmp_path, monkeypatch
):
    import bench

    from loraplace.config import StudyConfig
    from loraplace.plan.strategies import resolve_strategies

    ok = {"status": "ok", "wall_s": 100.0, "metrics": {"train_time_s": 90.0, "eval_loss": 1.0}}
    failed = {"status": "failed", "wall_s": 5.0, "error": "RuntimeError: CUDA error"}
    row = bench._row("full", ok, failed, 1e12, (1e12, 0.0))
    assert row["speedup"] is None and row["status"].startswith("failed: loraplace RuntimeError")
    assert bench._total([row], 1e12, 1000, 5.0, False)["speedup"] is None
    seen = []

    def run_study(cfg, out, log=print):
        seen.append((out.name, cfg.precision))
        return [{"strategy": s, "seed": 42, "timing": {}} for s in cfg.strategies]

    monkeypatch.setattr("loraplace.study.runner.run_study", run_study)
    cfg = StudyConfig(strategies=["full"])
    bench._run_both(cfg, resolve_strategies(["full"]), tmp_path, print, "bf16")
    assert ("plain", "bf16") in seen and ("loraplace", "auto") in seen
