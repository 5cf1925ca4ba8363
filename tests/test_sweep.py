"""`--lr-sweep`: each strategy's learning rate picked on a development split kept apart from
the evaluation rows, then the seeds at the shared rate and at the picked rates."""

from __future__ import annotations

import json

import pytest
from conftest import ALPACA_HEAD

from loraplace.cli import main
from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import load_results
from loraplace.study.sweep import choose, dev_splits

ARGS = ["--data", str(ALPACA_HEAD), "--train-split", "train[:10]", "--eval-split",
        "train[100:104]", "--epochs", "1", "--strategy", "full", "--strategy", "attention",
        "--seed", "1", "--seed", "2", "--set", "max_length=48", "--set", "loss_on=all",
        "--set", "generations=0"]  # fmt: skip


def test_the_development_rows_are_the_training_rows_last_fifth_or_as_set():
    cfg = StudyConfig(data=str(ALPACA_HEAD), train_split="train[:100]", eval_split="train[100:120]")
    assert dev_splits(cfg) == ("train[0:80]", "train[80:100]")
    own = StudyConfig(data=str(ALPACA_HEAD), train_split="train[:100]", dev_split="train[150:170]")
    assert dev_splits(own) == ("train[0:100]", "train[150:170]")  # outside: all training rows
    with pytest.raises(UserError, match="shares rows with eval_split"):
        dev_splits(StudyConfig(data=str(ALPACA_HEAD), dev_split="train[110:130]"))
    with pytest.raises(UserError, match="must be the start or the end of train_split"):
        dev_splits(StudyConfig(data=str(ALPACA_HEAD), dev_split="train[40:60]"))


def test_each_strategy_takes_its_lowest_development_loss():
    def run(strategy, lr, loss, status="ok"):
        return {"strategy": strategy, "status": status, "config": {"lr": lr},
                "metrics": {"eval_loss": loss}}  # fmt: skip

    picked = choose([run("a", 1e-4, 2.0), run("a", 1e-3, 1.5), run("b", 1e-4, 1.2),
                     run("b", 1e-3, float("nan")), run("c", 1e-4, 9.0, "failed")])  # fmt: skip
    assert picked["a"]["lr"] == 1e-3 and picked["b"]["lr"] == 1e-4 and "c" not in picked
    assert picked["a"]["curve"] == {"0.0001": 2.0, "0.001": 1.5}


@pytest.mark.slow
def test_a_sweep_study_runs_at_the_shared_and_at_the_picked_rates(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["study", "--model", str(tiny_gpt2_dir), *ARGS, "--lr-sweep", "1e-4,3e-2",
                 "--out", str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert (sweep["train_split"], sweep["dev_split"]) == ("train[0:8]", "train[8:10]")
    assert set(sweep["strategies"]) == {"full", "attention"}
    for entry in sweep["strategies"].values():
        assert set(entry["curve"]) == {"0.0001", "0.03"} and entry["lr"] in (1e-4, 3e-2)
    swept = load_results(out / "sweep" / "lr-0.0001") + load_results(out / "sweep" / "lr-0.03")
    assert len(swept) == 4 and {r["seed"] for r in swept} == {1}  # the first seed only
    assert {r["config"]["eval_split"] for r in swept} == {"train[8:10]"}  # never the eval rows
    shared = load_results(out)
    assert len(shared) == 4 and {r["config"]["lr"] for r in shared} == {2e-4}
    tuned = load_results(out / "tuned")
    assert len(tuned) == 4
    for r in tuned:
        assert r["config"]["lr"] == sweep["strategies"][r["strategy"]]["lr"]
        assert r["config"]["eval_split"] == "train[100:104]"
    report = (out / "report.md").read_text()
    assert "Each strategy at its own learning rate" in report and (out / "lr_sweep.png").is_file()
    assert "At the shared rate (0.0002):" in report and "At each strategy's own rate" in report
    assert "with seed 1 on train[0:8]" in report
    assert (out / "tuned" / "report.md").is_file()
    # `status` goes through the three studies in the order they ran
    from loraplace.study.status import study_parts

    parts = [p.relative_to(out).as_posix() for p in study_parts(out)]
    assert parts == ["sweep/lr-0.0001", "sweep/lr-0.03", ".", "tuned"]
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.count(": finished") == 4 and "lr-0.03: finished" in shown
