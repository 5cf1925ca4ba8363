"""`loraplace study` through the real CLI on a tiny model, and the fast path against the plain one."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import replace

import pandas as pd
import pytest
from conftest import ALPACA_HEAD, tiny_model

from loraplace.cli import main
from loraplace.config import StudyConfig
from loraplace.core.results import SUMMARY_COLUMNS
from loraplace.fast.kernels import onednn_available
from loraplace.study.prepare import spec_for
from loraplace.train.run import train_run

TINY_ARGS = [
    "--data",
    str(ALPACA_HEAD),
    "--train-split",
    "train[:8]",
    "--eval-split",
    "train[100:104]",
    "--epochs",
    "1",
    "--set",
    "max_length=64",
    "--set",
    "loss_on=all",  # the tiny tokenizer is a character a token: the prompt fills max_length
    "--set",
    "generations=1",
    "--set",
    "max_new_tokens=4",
    "--set",
    "report_to=[]",
]


THREE_STRATEGIES = (
    "--strategy",
    "full",
    "--strategy",
    "seed-attention",
    "--strategy",
    "top=ffn@top:2",
)


def study(capsys, model_dir, out, *extra) -> tuple[int, str, str]:
    code = main(["study", "--model", str(model_dir), "--out", str(out), *TINY_ARGS, *extra])
    o, e = capsys.readouterr()
    return code, o, e


def test_study_end_to_end_then_skips_finished_runs(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, *THREE_STRATEGIES)
    assert code == 0, stdout
    assert "3 runs" in stdout and "0 already done" in stdout
    for name in (
        "summary.csv",
        "summary.md",
        "curves.png",
        "tradeoff.png",
        "report.html",
        "report.md",
        "aggregate.csv",
        "comparisons.csv",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["strategy"]) == ["full", "seed-attention", "top"]
    assert (summary["status"] == "ok").all()
    filled = summary.drop(columns=["efficiency_ratio"]).drop(
        columns=["relative_performance_pct", "param_reduction_pct"]
    )
    assert not filled.isna().any().any()
    full = summary.set_index("strategy").loc["full"]
    assert full["relative_performance_pct"] == 0 and full["param_reduction_pct"] == 0
    assert math.isclose(full["perplexity"], math.exp(full["eval_loss"]), rel_tol=1e-9)
    top = summary.set_index("strategy").loc["top"]
    assert top["trainable_params"] < full["trainable_params"] and top["param_reduction_pct"] > 0
    assert not math.isnan(top["efficiency_ratio"])
    result = json.loads((out / "runs/top/seed-42/result.json").read_text())
    assert result["status"] == "ok" and result["placement"]["layers"] == [2, 3]
    assert len(result["per_example"]["loss"]) == 4
    assert result["config"]["max_length"] == 64 and result["versions"]["peft"]
    assert (out / "runs/top/seed-42/adapter/adapter_model.safetensors").is_file()
    before = (out / "runs/full/seed-42/result.json").stat().st_mtime_ns

    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, *THREE_STRATEGIES)
    assert code == 0 and "3 already done" in stdout and "run 1/" not in stdout
    assert (out / "runs/full/seed-42/result.json").stat().st_mtime_ns == before


def _spec(model_dir, tmp_path, strategy="full", base_eval=None, **overrides):
    settings = {
        "model": str(model_dir),
        "data": str(ALPACA_HEAD),
        "train_split": "train[:8]",
        "eval_split": "train[100:104]",
        "epochs": 2,
        "max_length": 64,
        "loss_on": "all",
        "generations": 0,
    }
    cfg = StudyConfig(**(settings | {"strategies": [strategy]} | overrides))
    return spec_for(cfg, strategy, 42, tmp_path / "run", base_eval)


def test_same_seed_same_eval_loss(tiny_gpt2_dir, tmp_path):
    a = train_run(_spec(tiny_gpt2_dir, tmp_path))
    b = train_run(_spec(tiny_gpt2_dir, tmp_path))
    assert a["metrics"]["eval_loss"] == b["metrics"]["eval_loss"]
    assert a["curves"]["train"] == b["curves"]["train"]


@pytest.mark.parametrize(
    "switches",
    [
        {"packing": False},  # fused batch, padded to its longest
        {"packing": False, "fuse_accumulation": False},  # micro-batches, padded to their longest
        {},  # packed in chunks of at most max_length tokens, one chunk at a time (the default)
        {"pack_tokens": 128},  # two examples per chunk
        {"pack_tokens": 4096},  # the whole step in one packed row
        {"fused_head_loss": False},  # the model's own output head and loss, whole logits
        {"onednn_head": False},  # the fused head loss's products through the default BLAS
        {"release_memory": False},  # glibc's own mmap threshold
        {"fused_lora": False},  # PEFT's own LoRA forward (frozen products still oneDNN)
        {"onednn": True},  # frozen products through oneDNN
    ],
)
def test_fast_paths_equal_the_plain_pipeline(tiny_gpt2_dir, tmp_path, switches):
    """LoRA and model dropout off so runs are deterministic: every switch gives the plain curve.

    The plain pipeline is the seed's: batch 1 x grad-accum 4, every example padded to max_length.
    The fused LoRA layer is on unless switched off. Tolerance: 1e-4 relative, float32
    summation order only.
    """
    plain = train_run(
        _spec(
            tiny_gpt2_dir,
            tmp_path,
            dropout=0.0,
            pad_to="max_length",
            fuse_accumulation=False,
            packing=False,
            fused_lora=False,
            onednn=False,
            onednn_head=False,
            fused_mlp=False,
        )
    )
    fast = train_run(_spec(tiny_gpt2_dir, tmp_path, dropout=0.0, **switches))
    assert fast["packed"] == ("packing" not in switches)
    assert fast["fused_head_loss"] == (fast["packed"] and "fused_head_loss" not in switches)
    if not fast["fused_head_loss"] or "onednn_head" in switches or not onednn_available():
        assert fast["onednn_head"] == [False, False]
    if sys.platform == "linux":  # glibc: mallopt is there
        assert fast["release_memory"] == ("release_memory" not in switches)
    plain_curve = [p["loss"] for p in plain["curves"]["train"]]
    fast_curve = [p["loss"] for p in fast["curves"]["train"]]
    assert len(plain_curve) == len(fast_curve) == 4  # 8 rows / 4 per step x 2 epochs
    assert fast_curve == pytest.approx(plain_curve, rel=1e-4)
    assert fast["metrics"]["eval_loss"] == pytest.approx(plain["metrics"]["eval_loss"], rel=1e-4)


def test_runs_forked_from_one_server_give_what_fresh_processes_give(
    capsys, tiny_gpt2_dir, tmp_path
):
    found = {}
    for reuse in ("false", "true"):
        out = tmp_path / reuse
        code, stdout, _ = study(
            capsys, tiny_gpt2_dir, out, *THREE_STRATEGIES, "--set", f"reuse_process={reuse}",
            "--set", "runs_per_device=1",  # one server for all three, one after another
        )  # fmt: skip
        assert code == 0, stdout
        found[reuse] = [
            json.loads((out / f"runs/{s}/seed-42/result.json").read_text())
            for s in ("full", "seed-attention", "top")
        ]
    for fresh, reused in zip(found["false"], found["true"], strict=True):
        assert reused["metrics"]["eval_loss"] == fresh["metrics"]["eval_loss"]
        assert reused["curves"]["train"] == fresh["curves"]["train"]
        assert reused["metrics"]["peak_memory_mb"] > 0
    for runs in found.values():  # every run in a process of its own
        assert len({r["process"] for r in runs}) == 3
    assert {r["parent_process"] for r in found["false"]} == {os.getpid()}
    servers = {r["parent_process"] for r in found["true"]}
    assert len(servers) == 1 and os.getpid() not in servers


def test_a_failed_run_leaves_the_server_serving(capsys, tiny_gpt2_dir, tmp_path):
    from loraplace.study import worker as server

    broken = tmp_path / "spec.json"
    broken.write_text("{not json")  # its run dies before it can write a result
    assert server.run_spec(broken, dict(os.environ), reuse_process=True) != 0
    pid = server._idle[-1].proc.pid
    code, stdout, _ = study(
        capsys, tiny_gpt2_dir, tmp_path / "out", "--strategy", "full", "--set", "reuse_process=true"
    )
    assert code == 0 and "full seed 42: ok" in stdout
    result = json.loads((tmp_path / "out/runs/full/seed-42/result.json").read_text())
    assert result["parent_process"] == pid


def test_a_dead_server_is_replaced(capsys, tiny_gpt2_dir, tmp_path):
    from loraplace.study import worker as server

    broken = tmp_path / "spec.json"
    broken.write_text("{not json")
    server.run_spec(broken, dict(os.environ), reuse_process=True)
    server._idle[-1].proc.kill()
    server._idle[-1].proc.wait()
    code, stdout, _ = study(
        capsys, tiny_gpt2_dir, tmp_path / "out", "--strategy", "full", "--set", "reuse_process=true"
    )
    assert code == 0 and "full seed 42: ok" in stdout


def test_failed_run_is_recorded_and_the_study_goes_on(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = study(
        capsys,
        tiny_gpt2_dir,
        out,
        "--strategy",
        "full",
        "--strategy",
        "attention",
        "--set",
        "lr=1e38",
    )
    assert code == 1  # everything written, and scripts can tell that runs failed
    assert err.strip().splitlines()[-1] == "loraplace: 2 of 2 runs failed"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["status"]) == ["failed", "failed"]
    result = json.loads((out / "runs/full/seed-42/result.json").read_text())
    # alpha 1e30 makes the first update overflow; the reason is kept and the next run still runs
    assert "overflow" in result["error"] or "non-finite" in result["error"]
    assert "FAILED" in stdout and "run 2/2: attention" in stdout
    assert "Failed runs" in (out / "report.md").read_text()


BAD = [
    (["--data", "/nope/missing.json"], "does not exist"),
    (["--set", "rank=0"], "'rank' must be positive"),
    (["--epochs", "0"], "'epochs' must be positive"),
    (["--set", "epoch=2"], "did you mean 'epochs'"),
    (["--train-split", "train[5:5]"], "selects no rows"),
    (["--eval-split", "train[190:260]"], "has 200 rows"),
    (["--data", "nobody/no-such-dataset"], "cannot load dataset 'nobody/no-such-dataset'"),
    (["--strategy", "atention"], "did you mean 'attention'"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_sentence_nothing_written(capsys, tiny_gpt2_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    code, _, err = study(capsys, tiny_gpt2_dir, out, *extra)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_data_files(capsys, tiny_gpt2_dir, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps([{"instruction": "hi", "input": ""}] * 200))
    for path, message in (
        (broken, "is not valid JSON"),
        (lacking, "lacks the fields instruction, input, output"),
    ):
        code, _, err = study(capsys, tiny_gpt2_dir, tmp_path / "out", "--data", str(path))
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(capsys, tiny_gpt2_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    code, _, err = study(capsys, tiny_gpt2_dir, locked / "out")
    assert code == 2 and "cannot write to output directory" in err


def test_output_that_is_a_file(capsys, tiny_gpt2_dir, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, _, err = study(capsys, tiny_gpt2_dir, target)
    assert code == 2 and "cannot write to output directory" in err
    assert target.read_text() == "keep me"


def test_base_model_is_evaluated_once_per_study(tiny_gpt2_dir, tmp_path):
    base = tmp_path / "base.json"
    first = train_run(_spec(tiny_gpt2_dir, tmp_path, epochs=1, base_eval=base))
    assert base.is_file()
    second = train_run(_spec(tiny_gpt2_dir, tmp_path, "attention", base, epochs=1))
    assert second["metrics"]["base_eval_loss"] == first["metrics"]["base_eval_loss"]
    alone = train_run(_spec(tiny_gpt2_dir, tmp_path, epochs=1, reuse_base_eval=False))
    assert alone["metrics"]["base_eval_loss"] == pytest.approx(
        first["metrics"]["base_eval_loss"], rel=1e-6
    )
    other = train_run(
        _spec(tiny_gpt2_dir, tmp_path, epochs=1, eval_split="train[104:106]", base_eval=base)
    )
    assert other["metrics"]["base_eval_loss"] != first["metrics"]["base_eval_loss"]


def test_the_untrained_models_generations_are_made_once_per_study(tiny_gpt2_dir, tmp_path):
    base = tmp_path / "base.json"
    settings = {"epochs": 1, "generations": 2, "max_new_tokens": 4}
    first = train_run(_spec(tiny_gpt2_dir, tmp_path, base_eval=base, **settings))
    stored = tmp_path / "base_generations.json"
    made = json.loads(stored.read_text())
    assert made["generations"] == [g["base"] for g in first["generations"]]
    made["generations"] = ["stored 1", "stored 2"]  # what a later run must take, not remake
    stored.write_text(json.dumps(made))
    second = train_run(_spec(tiny_gpt2_dir, tmp_path, "attention", base, **settings))
    assert [g["base"] for g in second["generations"]] == ["stored 1", "stored 2"]
    longer = settings | {"max_new_tokens": 6}
    third = train_run(_spec(tiny_gpt2_dir, tmp_path, base_eval=base, **longer))  # made again
    assert [g["base"] for g in third["generations"]] != ["stored 1", "stored 2"]


def test_runs_at_once_compute_the_once_per_study_numbers_once(tmp_path):
    import threading
    import time

    from loraplace.train.once import once_per_study

    path = tmp_path / "base_eval.json"
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.3)  # long enough for the other runs to arrive meanwhile
        return [1.5, 2.5]

    got = []
    runs = [threading.Thread(target=lambda: got.append(once_per_study(path, {"k": 1}, "v", compute)))
            for _ in range(3)]  # fmt: skip
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert calls == [1] and got == [[1.5, 2.5]] * 3


def test_a_run_that_finds_the_base_generations_being_made_trains_and_takes_them_after(
    tiny_gpt2_dir, tmp_path
):
    import fcntl
    import threading

    base = tmp_path / "base.json"
    settings = {"epochs": 1, "generations": 2, "max_new_tokens": 4}
    train_run(_spec(tiny_gpt2_dir, tmp_path, base_eval=base, **settings))
    stored = tmp_path / "base_generations.json"
    made = json.loads(stored.read_text())
    stored.unlink()
    lock_file = stored.with_name(f".{stored.name}.lock")
    with open(lock_file, "a") as lock:  # another run of the study is making them
        fcntl.flock(lock, fcntl.LOCK_EX)

        def finish():  # ... and stores them once this run is training
            stored.write_text(json.dumps(made | {"generations": ["stored 1", "stored 2"]}))
            fcntl.flock(lock, fcntl.LOCK_UN)

        later = threading.Timer(1.0, finish)
        later.start()
        second = train_run(_spec(tiny_gpt2_dir, tmp_path, "attention", base, **settings))
        later.join()
    assert [g["base"] for g in second["generations"]] == ["stored 1", "stored 2"]


def test_a_run_attaches_the_plan_the_study_made_and_refuses_a_model_that_places_otherwise(
    tiny_gpt2_dir, tmp_path, monkeypatch
):
    from loraplace.plan.placement import place
    from loraplace.plan.roles import classify
    from loraplace.train import run as train

    spec = _spec(tiny_gpt2_dir, tmp_path, "attention", epochs=0.5)
    model = tiny_model("gpt2")
    train.check_plan(spec, model)  # the plan made on the meta device: the loaded model agrees
    plan = spec.plan
    shrunk = replace(plan, ranks=dict(list(plan.ranks.items())[1:]), trainable_params=1)
    with pytest.raises(RuntimeError, match="does not place 'attention' as planned"):
        train.check_plan(spec.with_(plan=shrunk), model)
    # what the run attaches is the plan's modules at the plan's ranks, not its own placement
    rank_two = place(classify(model), spec.strategy, 2).plan()
    monkeypatch.setattr(train, "check_plan", lambda spec, model: None)
    result = train_run(spec.with_(plan=rank_two))
    assert result["metrics"]["trainable_params"] == rank_two.trainable_params
    assert set(result["placement"]["ranks"].values()) == {2}


def test_without_the_inner_curve_points_a_run_ends_with_the_same_numbers(
    capsys, tiny_gpt2_dir, tmp_path
):
    two_epochs = ("--strategy", "full", "--epochs", "2")
    curve, final = tmp_path / "curve", tmp_path / "final"
    assert study(capsys, tiny_gpt2_dir, curve, *two_epochs)[0] == 0
    assert (
        study(capsys, tiny_gpt2_dir, final, *two_epochs, "--set", "eval_every_epoch=false")[0] == 0
    )
    a, b = (json.loads((o / "runs/full/seed-42/result.json").read_text()) for o in (curve, final))
    assert [p["epoch"] for p in a["curves"]["eval"]] == [1.0, 2.0]
    assert [p["epoch"] for p in b["curves"]["eval"]] == [2.0]
    assert b["metrics"]["eval_loss"] == a["metrics"]["eval_loss"]
    assert b["curves"]["train"] == a["curves"]["train"]  # one evaluation less, nothing else
