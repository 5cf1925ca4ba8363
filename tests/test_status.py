"""`loraplace status OUT`: a study running, killed, copied, finished with a failed run; from the
files alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ALPACA_HEAD, REPO

from loraplace.cli import main
from loraplace.core.errors import UserError
from loraplace.core.lock import acquire, release
from loraplace.core.results import run_dir, write_json, write_result
from loraplace.study.status import read_status, render


def result(strategy: str, seed: int, ok: bool = True) -> dict:
    found = {"status": "ok" if ok else "failed", "strategy": strategy, "seed": seed,
             "timing": {"started": time.time() - 60, "finished": time.time()}}  # fmt: skip
    if ok:
        return found | {"metrics": {"eval_loss": 1.9, "train_time_s": 50.0, "tokens_per_s": 812.0}}
    return found | {"error": "FloatingPointError: train loss became nan at step 3"}


def progress(strategy: str, seed: int, step: int, eta_s: float, age_s: float = 0.0) -> dict:
    return {"strategy": strategy, "seed": seed, "phase": "training", "step": step,
            "total_steps": 75, "epoch": step / 25, "loss": 2.0131, "tokens_per_s": 790.0,
            "elapsed_s": 40.0, "eta_s": eta_s, "updated": time.time() - age_s, "events": []}  # fmt: skip


@pytest.fixture
def made(tmp_path):
    """A study folder written by hand: six runs, one done, one failed, two training."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = {"strategies": ["full", "attention", "ffn"], "seeds": [1, 2], "layer_study": None}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    todo = [["attention", 1], ["ffn", 1], ["full", 2], ["attention", 2], ["ffn", 2]]
    write_json(out / "progress.json", {"started": time.time() - 120, "at_once": 2, "runs": todo})
    write_result(run_dir(out, "full", 1) / "result.json", result("full", 1))
    write_result(run_dir(out, "attention", 1) / "result.json", result("attention", 1, ok=False))
    write_json(run_dir(out, "ffn", 1) / "progress.json", progress("ffn", 1, 30, 60.0))
    write_json(run_dir(out, "full", 2) / "progress.json", progress("full", 2, 15, 90.0, 10.0))
    return out


def test_a_running_study_s_table_and_eta(made):
    acquire(made, "study")  # as the study holds it; status opens the file on its own
    try:
        status = read_status(made)
    finally:
        release(made)
    assert status["state"] == "running"
    states = {(r["strategy"], r["seed"]): r["state"] for r in status["runs"]}
    assert states == {("full", 1): "done", ("attention", 1): "failed", ("ffn", 1): "running",
                      ("full", 2): "running", ("attention", 2): "waiting",
                      ("ffn", 2): "waiting"}  # fmt: skip
    full2 = next(r for r in status["runs"] if (r["strategy"], r["seed"]) == ("full", 2))
    assert full2["eta_s"] == pytest.approx(80.0, abs=1)  # 90 s left, written 10 s ago
    # two at a time: runs take 60 s (the one done); the two waiting begin as slots free,
    # at 60 and 80 s from now, and end 60 s later
    assert status["eta_s"] == pytest.approx(140.0, abs=1)
    text = render(status)
    lines = text.splitlines()
    assert lines[0].startswith(f"{made}: running (pid {os.getpid()}") and "2 runs at a time" in text
    assert lines[1].split() == ["run", "state", "progress", "loss", "tok/s", "time", "ETA"]
    assert lines[2].split() == [
        "full",
        "seed",
        "1",
        "done",
        "eval",
        "loss",
        "1.9000",
        "812",
        "1m00s",
    ]
    assert re.search(r"\nattention seed 1 +failed +FloatingPointError: train loss became nan", text)
    assert lines[4].split() == ["ffn", "seed", "1", "running", "training", "30/75", "(40%)",
                                "2.0131", "790", "40s", "1m00s"]  # fmt: skip
    assert lines[-1].startswith("study: 1 done, 2 running, 1 failed, 2 waiting of 6; elapsed 2m00s")


def test_a_stopped_study_has_interrupted_runs_not_running_ones(made):
    status = read_status(made)  # nobody holds the lock
    assert status["state"] == "stopped" and status["eta_s"] is None
    assert [r["state"] for r in status["runs"]] == [
        "done", "failed", "interrupted", "interrupted", "waiting", "waiting",
    ]  # fmt: skip
    assert render(status).splitlines()[0] == f"{made}: stopped before its runs ended"


def test_a_study_from_before_progress_files_reads_as_stopped_or_not_started(made):
    (made / "progress.json").unlink()  # as a study of an earlier loraplace left it
    for path in made.glob("runs/*/seed-*/progress.json"):
        path.unlink()
    status = read_status(made)
    assert status["state"] == "stopped"
    assert [r["state"] for r in status["runs"]] == ["done", "failed"] + ["waiting"] * 4
    for path in made.glob("runs/*/seed-*/result.json"):
        path.unlink()
    assert read_status(made)["state"] == "not started"


def test_a_result_left_by_an_earlier_start_is_waiting_while_the_study_runs(made):
    stale = run_dir(made, "attention", 2) / "result.json"
    write_result(stale, result("attention", 2, ok=False))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # before this start began
    acquire(made, "study")
    try:
        running = read_status(made)
    finally:
        release(made)
    stopped = read_status(made)
    state = {r["state"] for r in running["runs"] if (r["strategy"], r["seed"]) == ("attention", 2)}
    assert state == {"waiting"}  # to be run again, not yet begun
    state = {r["state"] for r in stopped["runs"] if (r["strategy"], r["seed"]) == ("attention", 2)}
    assert state == {"failed"}  # what the files say, the study not running


def test_a_folder_that_is_no_study_is_one_sentence(tmp_path, capsys):
    with pytest.raises(UserError, match="is not a study's output folder"):
        read_status(tmp_path)
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "is not a study's output folder" in capsys.readouterr().err


ARGS = ["--data", str(ALPACA_HEAD), "--train-split", "train[:160]", "--eval-split",
        "train[180:184]", "--epochs", "2", "--strategy", "full", "--strategy", "attention",
        *[a for s in ["max_length=64", "loss_on=all", "generations=0", "report_to=[]", "threads=1",
                      "runs_per_device=1"] for a in ("--set", s)]]  # fmt: skip


def wait_for_training(out, proc, timeout_s: float = 300) -> dict:
    path = run_dir(out, "full", 42) / "progress.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = {}
        if found.get("phase") == "training" and 5 <= (found.get("step") or 0) < 60:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never saw the run training (study exit {proc.poll()})")


@pytest.mark.slow
def test_status_of_a_study_running_then_killed_then_copied_then_finished(
    tiny_gpt2_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    argv = ["study", "--model", str(tiny_gpt2_dir), "--out", str(out), *ARGS]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "loraplace.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_training(out, proc)
        running = read_status(out)
        assert main(["status", str(out), "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
    finally:
        proc.send_signal(signal.SIGKILL)  # as the OOM killer or a lost session would
        proc.wait()
    assert running["state"] == "running" and running["holder"]["pid"] == proc.pid
    full, attention = running["runs"]
    assert full["state"] == "running" and full["phase"] == "training" and full["total_steps"] == 80
    assert attention["state"] == "waiting" and running["eta_s"] > 0
    assert as_json["state"] == "running" and as_json["runs"][0]["state"] == "running"

    time.sleep(0.5)  # the run dies with the study (die_with_parent)
    killed = read_status(out)
    assert killed["state"] == "stopped" and killed["holder"]["pid"] == proc.pid
    assert [r["state"] for r in killed["runs"]] == ["interrupted", "waiting"]
    assert killed["runs"][0]["step"] >= full["step"] and killed["eta_s"] is None
    text = render(killed)
    assert f"stopped; its study (pid {proc.pid} on" in text and "no longer running (killed)" in text
    assert "carry on" in text.splitlines()[-1]

    copy = tmp_path / "copy"  # on another machine, or after the fact
    shutil.copytree(out, copy)
    copied = read_status(copy)
    assert [r["state"] for r in copied["runs"]] == ["interrupted", "waiting"]

    monkeypatch.setenv("LORAPLACE_FAULTS", json.dumps({"attention seed 42": {"lr": 1e38}}))
    assert main(argv) == 1  # the same study again: it finishes, one run fails
    capsys.readouterr()
    finished = read_status(out)
    assert finished["state"] == "finished" and finished["holder"] is None
    assert [r["state"] for r in finished["runs"]] == ["done", "failed"]
    text = render(finished)
    assert text.splitlines()[0] == f"{out}: finished"
    assert "attention seed 42  failed" in text and "eval loss" in text
    assert text.splitlines()[-1] == "study: 1 done, 1 failed of 2"
    assert main(["status", str(out), "--watch", "0.1"]) == 0  # an ended study: printed once
    assert capsys.readouterr().out.count(f"{out}: finished") == 1
