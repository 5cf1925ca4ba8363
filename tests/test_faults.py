"""The faults a long study meets, one test each, on the tiny model (README, "What survives what").

    PYTHONPATH=src python -m pytest -q tests/test_faults.py

Faults are made on purpose: kill -9 (from outside, or by the run itself in the middle of a step
through `loraplace.core.faults`), a file-size limit for a full disk, an address-space limit for out
of memory, a huge learning rate for NaN, a truncated or edited result.json, a second study.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ALPACA_HEAD

from loraplace.cli import main

ARGS = [
    "--data",
    str(ALPACA_HEAD),
    "--train-split",
    "train[:12]",
    "--eval-split",
    "train[100:104]",
    "--epochs",
    "2",
    "--set",
    "max_length=64",
    "--set",
    "loss_on=all",
    "--set",
    "generations=0",
    "--set",
    "threads=1",
]  # 3 optimizer steps an epoch (12 rows, 4 a step), 6 in all; LoRA dropout on (0.1). One
# thread: on a busy 2-core machine two OpenMP threads made a tiny model's step 80 times slower


def study(capsys, model, out, *extra) -> tuple[int, str, str]:
    code = main(["study", "--model", str(model), "--out", str(out), *ARGS, *extra])
    o, e = capsys.readouterr()
    return code, o, e


def result(out: Path, strategy: str = "full", seed: int = 42) -> dict:
    return json.loads((out / f"runs/{strategy}/seed-{seed}/result.json").read_text())


def same_training(a: dict, b: dict) -> None:
    """Bit for bit: eval loss, every example's loss, every step's train loss, every evaluation."""
    assert a["status"] == b["status"] == "ok"
    assert a["metrics"]["eval_loss"] == b["metrics"]["eval_loss"]
    assert a["per_example"] == b["per_example"]
    assert a["curves"] == b["curves"]


def faults(monkeypatch, **per_run) -> None:
    monkeypatch.setenv("LORAPLACE_FAULTS", json.dumps(per_run))


@pytest.fixture(scope="module")
def uninterrupted_out(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """`full` seed 42 trained without a stop, without checkpoints."""
    out = tmp_path_factory.mktemp("uninterrupted")
    argv = ["study", "--model", str(tiny_gpt2_dir), "--out", str(out), *ARGS]
    argv += ["--strategy", "full", "--set", "checkpoint_minutes=null"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_out) -> dict:
    return result(uninterrupted_out)


@pytest.mark.parametrize(
    "every,kill_at,resumed_from",
    [(2, 5, 4), (3, 5, 3)],  # a checkpoint in the middle of epoch 2; one at the end of epoch 1
)
def test_kill_9_mid_step_resumes_with_the_same_result(
    capsys, monkeypatch, tiny_gpt2_dir, tmp_path, uninterrupted, every, kill_at, resumed_from
):
    out = tmp_path / "out"
    checkpointing = ("--strategy", "full", "--set", f"checkpoint_every={every}")
    faults(monkeypatch, **{"full seed 42": {"kill_at_step": kill_at}})
    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, *checkpointing)
    assert "FAILED" in stdout and str(-signal.SIGKILL) in stdout
    run = out / "runs/full/seed-42"
    assert [p.name for p in run.glob("checkpoint-*")] == [f"checkpoint-{resumed_from}"]

    monkeypatch.delenv("LORAPLACE_FAULTS")
    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, *checkpointing)
    assert code == 0 and f"resumed from step {resumed_from}" in stdout, stdout
    resumed = result(out)
    same_training(resumed, uninterrupted)
    assert resumed["resumed_from_step"] == resumed_from
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".*"))  # deleted when done


def test_a_checkpoint_of_other_settings_is_not_resumed(
    capsys, monkeypatch, tiny_gpt2_dir, tmp_path
):
    out = tmp_path / "out"
    faults(monkeypatch, **{"full seed 42": {"kill_at_step": 5}})
    study(capsys, tiny_gpt2_dir, out, "--strategy", "full", "--set", "checkpoint_every=2")
    assert (out / "runs/full/seed-42/checkpoint-4").is_dir()
    monkeypatch.delenv("LORAPLACE_FAULTS")
    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, "--strategy", "full", "--set", "lr=1e-3")
    assert code == 0 and "resumed" not in stdout
    assert result(out)["resumed_from_step"] is None
    assert not list((out / "runs/full/seed-42").glob("checkpoint-*"))


def test_the_same_seed_twice_gives_the_same_eval_loss_bit_for_bit(
    capsys, tiny_gpt2_dir, tmp_path, uninterrupted
):
    out = tmp_path / "again"
    code, _, _ = study(capsys, tiny_gpt2_dir, out, "--strategy", "full")
    assert code == 0
    same_training(result(out), uninterrupted)


@pytest.fixture(scope="module")
def faulty_study(tiny_gpt2_dir, tmp_path_factory) -> tuple[Path, str]:
    """Four runs: a full disk, NaN from a huge learning rate, out of memory, and one clean."""
    out = tmp_path_factory.mktemp("faulty") / "out"
    injected = {
        "full seed 42": {"file_size": 64 * 1024},  # the adapter is 128 KB; result.json fits
        "attention seed 42": {"lr": 1e38},
        "ffn seed 42": {"memory_mb": 0},
    }
    os.environ["LORAPLACE_FAULTS"] = json.dumps(injected)
    try:
        argv = ["study", "--model", str(tiny_gpt2_dir), "--out", str(out), *ARGS]
        argv += ["--strategy", "full", "--strategy", "attention", "--strategy", "ffn"]
        argv += ["--strategy", "clean=ffn@top:2", "--epochs", "1"]
        with _captured() as lines:
            assert main(argv) == 1  # all written; 3 runs failed, and the exit status says so
    finally:
        del os.environ["LORAPLACE_FAULTS"]
    return out, "".join(lines)


class _captured:
    """stdout of an in-process CLI call, outside pytest's per-test capture (module fixture)."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self.write, sys.stdout.write = sys.stdout.write, self.lines.append
        return self.lines

    def __exit__(self, *exc) -> None:
        sys.stdout.write = self.write


def _no_partial_files(run: Path) -> None:
    """Nothing half-written: no temporary files or folders, every JSON file whole."""
    assert not [p for p in run.rglob(".*")], list(run.rglob(".*"))
    for path in run.rglob("*.json"):
        json.loads(path.read_text())


def test_disk_full_while_saving_fails_that_run_with_the_reason(faulty_study):
    out, stdout = faulty_study
    failed = result(out, "full")
    assert failed["status"] == "failed" and "File too large" in failed["error"], failed["error"]
    assert "full seed 42: FAILED" in stdout and "File too large" in stdout
    run = out / "runs/full/seed-42"
    assert not (run / "adapter").exists()  # no truncated adapter file
    _no_partial_files(run)
    assert result(out, "clean")["status"] == "ok"  # the others finish


def test_nan_from_a_huge_learning_rate_fails_that_run_and_the_others_go_on(faulty_study):
    out, stdout = faulty_study
    failed = result(out, "attention")
    assert failed["status"] == "failed"
    assert "non-finite" in failed["error"] or "overflow" in failed["error"], failed["error"]
    assert "attention seed 42: FAILED" in stdout and "run 4/4: clean" in stdout
    assert result(out, "clean")["status"] == "ok"
    assert "attention seed 42" in (out / "report.md").read_text()


def test_out_of_memory_fails_that_run_with_the_reason_and_the_others_go_on(faulty_study):
    out, stdout = faulty_study
    failed = result(out, "ffn")
    assert failed["status"] == "failed", failed
    assert "MemoryError" in failed["error"] or "memory" in failed["error"], failed["error"]
    assert "ffn seed 42: FAILED" in stdout
    _no_partial_files(out / "runs/ffn/seed-42")
    assert result(out, "clean")["status"] == "ok"


def test_a_truncated_or_edited_result_is_named_and_run_again(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    two = ("--strategy", "full", "--strategy", "attention", "--epochs", "1")
    assert study(capsys, tiny_gpt2_dir, out, *two)[0] == 0
    first = {s: result(out, s) for s in ("full", "attention")}
    full, attention = (out / f"runs/{s}/seed-42/result.json" for s in ("full", "attention"))
    full.write_text(full.read_text()[:500])  # truncated
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "full seed 42: result.json is truncated" in report
    edited = json.loads(attention.read_text())
    edited["metrics"]["eval_loss"] = 0.5  # by hand
    attention.write_text(json.dumps(edited))

    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, *two)
    assert code == 0 and "0 already done" in stdout
    assert "full seed 42: result.json is truncated" in stdout
    assert "attention seed 42: result.json was changed after it was written" in stdout
    for s in ("full", "attention"):  # run again, to the same numbers
        same_training(result(out, s), first[s])


def test_a_result_cut_anywhere_reads_as_truncated(tmp_path):
    from loraplace.core.results import read_result, write_result

    path = tmp_path / "result.json"
    write_result(
        path, {"strategy": "full", "seed": 42, "status": "ok", "path": "/a/b c", "x": [1.5]}
    )
    text = path.read_text()
    for cut in range(1, len(text.rstrip()) - 1):
        path.write_text(text[:cut])
        assert read_result(path)[1].startswith("is truncated"), (cut, text[:cut])
    path.write_text(text.replace('"seed": 42', '"seed": 42,,'))
    assert read_result(path)[1].startswith("is not valid JSON")


def test_files_are_written_as_the_umask_says(tmp_path):
    from loraplace.core.results import write_json, write_result

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        write_result(tmp_path / "result.json", {"strategy": "full", "seed": 1, "status": "ok"})
    finally:
        os.umask(old)
    for name in ("summary.json", "result.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640


def test_a_study_writes_every_file_as_the_umask_says(uninterrupted_out):
    mask = os.umask(0)
    os.umask(mask)
    for path in uninterrupted_out.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, path


def _holder(out: Path) -> subprocess.Popen:
    """Another process that holds OUT's lock until killed."""
    code = "import sys, time; from loraplace.core.lock import acquire; acquire(sys.argv[1]); "
    code += "print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_study_per_folder_and_a_dead_holder_is_taken_over(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    try:
        code, _, err = study(capsys, tiny_gpt2_dir, out, "--strategy", "full")
        host = socket.gethostname()
        assert code == 2 and f"pid {holder.pid} on host {host}" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (out / "runs").exists()
        assert main(["report", str(out)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", str(out)]) == 2  # no results yet, but the lock is taken
    stdout = capsys.readouterr().out
    assert f"took over a study (pid {holder.pid} on host {host}" in stdout
    assert "no longer running" in stdout


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _start_study(model: Path, out: Path, *extra) -> subprocess.Popen:
    argv = [sys.executable, "-m", "loraplace", "study", "--model", str(model), "--out", str(out)]
    return subprocess.Popen(
        [*argv, *ARGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # Ctrl-C reaches it even where this test runs with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(check, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_killing_the_study_driver_loses_no_finished_run(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    two = ("--strategy", "full", "--strategy", "attention", "--set", "checkpoint_every=2")
    driver = _start_study(tiny_gpt2_dir, out, *two)
    second = out / "runs/attention/seed-42"
    _wait_for(lambda: any(second.glob("checkpoint-*")), driver)
    family = _descendants(driver.pid)  # its run server and the run in hand
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 5  # SIGKILL on the parent's death is at once; reaping is not
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(family)  # the run died with it: nothing writes on in the folder
    finished = (out / "runs/full/seed-42/result.json").stat().st_mtime_ns

    code, stdout, _ = study(capsys, tiny_gpt2_dir, out, *two)
    assert code == 0 and "1 already done" in stdout and "run 1/1: attention" in stdout
    assert f"took over a study (pid {driver.pid}" in stdout
    assert "resumed from step" in stdout
    assert (out / "runs/full/seed-42/result.json").stat().st_mtime_ns == finished


@pytest.mark.slow
def test_ctrl_c_stops_the_run_records_nothing_and_says_how_to_resume(
    capsys, tiny_gpt2_dir, tmp_path, uninterrupted
):
    out = tmp_path / "out"
    driver = _start_study(tiny_gpt2_dir, out, "--strategy", "full", "--set", "checkpoint_every=2")
    run = out / "runs/full/seed-42"
    _wait_for(lambda: any(run.glob("checkpoint-*")), driver)
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not (run / "result.json").exists()  # nothing half-done recorded
    _no_partial_files(run)
    command = stderr.strip().splitlines()[-1].split("carry on with: ")[1]
    assert command.startswith("loraplace study ")

    code = main(shlex.split(command)[1:])
    assert code == 0 and "resumed from step" in capsys.readouterr().out
    same_training(result(out), uninterrupted)


def test_checkpoints_by_time_only_the_latest_kept_on_request(capsys, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    every_moment = ("--set", "checkpoint_minutes=0.00001", "--set", "keep_checkpoints=true")
    code, _, _ = study(capsys, tiny_gpt2_dir, out, "--strategy", "full", *every_moment)
    assert code == 0
    done = result(out)
    assert done["metrics"]["checkpoints"] == 5  # after every step but the last
    kept = [p.name for p in (out / "runs/full/seed-42").glob("checkpoint-*")]
    assert kept == ["checkpoint-5"]


def test_a_checkpoint_cut_short_is_never_resumed(tmp_path):
    """A kill while a checkpoint is written leaves a temporary folder, never a checkpoint-N."""
    from loraplace.train.checkpoints import MANIFEST, latest, write_dir_atomically

    def good(step: int):
        def fill(folder: Path) -> None:
            (folder / MANIFEST).write_text(json.dumps({"key": "k", "step": step}))

        return fill

    def cut_short(folder: Path) -> None:
        (folder / "optimizer.pt").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    write_dir_atomically(tmp_path / "checkpoint-2", good(2))
    with pytest.raises(OSError):
        write_dir_atomically(tmp_path / "checkpoint-4", cut_short)
    (tmp_path / ".checkpoint-6.x.tmp").mkdir()  # as a kill -9 mid-write leaves it
    (tmp_path / ".adapter.y.tmp").mkdir()
    found = latest(tmp_path, "k", log=lambda line: None)
    assert found is not None and found.step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
