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
