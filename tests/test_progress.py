"""A study's progress as it runs: each run's progress.json, the plain lines a log file gets, and
the live display a terminal gets (read back through a pseudo-terminal), on the tiny model."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import ALPACA_HEAD, REPO

from loraplace.config import load_config
from loraplace.study.display import event_line
from loraplace.study.prepare import spec_for
from loraplace.study.runner import run_study
from loraplace.study.status import study_eta
from loraplace.study.terminal import Output, Region
from loraplace.train.progress import RunProgress
from loraplace.train.run import train_run

SETS = ["max_length=64", "loss_on=all", "generations=0", "report_to=[]", "threads=1"]


def config(model_dir, *sets: str, **overrides):
    settings = {"model": str(model_dir), "data": str(ALPACA_HEAD), "train_split": "train[:80]",
                "eval_split": "train[100:104]", "epochs": 1, "strategies": ["full"], "seeds": [42]}  # fmt: skip
    return load_config(None, settings | overrides, [*SETS, *sets])


def test_a_run_writes_its_phases_and_every_tenth_of_its_steps(tiny_gpt2_dir, tmp_path):
    result = train_run(spec_for(config(tiny_gpt2_dir), "full", 42, tmp_path / "run"))
    progress = json.loads((tmp_path / "run/progress.json").read_text())
    events = progress["events"]
    phases = [e["phase"] for e in events if "phase" in e]
    assert phases == ["loading", "base eval", "training", "evaluating", "saving"]
    tenths = [(e["percent"], e["step"]) for e in events if "percent" in e]
    assert tenths == [(10 * k, 2 * k) for k in range(1, 11)]  # 80 rows, 4 a step: 20 steps
    assert progress["step"] == progress["total_steps"] == 20 and progress["eta_s"] == 0
    assert progress["loss"] == result["curves"]["train"][-1]["loss"]  # the Trainer's own number
    assert progress["eval_loss"] == pytest.approx(result["metrics"]["eval_loss"])
    assert progress["tokens_per_s"] > 0 and progress["pid"] == os.getpid()


def test_progress_is_written_at_tenths_and_phases_never_per_step(tmp_path, monkeypatch):
    progress = RunProgress(tmp_path / "progress.json", "full", 42, every_s=3600)
    writes = []
    monkeypatch.setattr(
        "loraplace.train.progress.write_json",
        lambda path, state, sync: writes.append(state["step"]),
    )
    progress.on_phase("load")
    progress.on_phase("attach")  # not a phase of its own: stays "loading", nothing written
    progress.train_begin(0, 200, 0.0, 2, tokens=1000)
    for step in range(1, 201):
        progress.step(step, step / 100, loss=2.0)
    assert writes == [None, 0, *range(20, 201, 20)]  # a phase, the start, ten tenths
    resumed = RunProgress(tmp_path / "other.json", "full", 42, every_s=3600)
    resumed.train_begin(120, 200, 1.2, 2, tokens=1000)  # from a checkpoint at step 120
    for step in range(121, 201):
        resumed.step(step, step / 100, loss=2.0)
    assert [e["percent"] for e in resumed.state["events"]] == [70, 80, 90, 100]


def test_the_study_eta_schedules_the_runs_left_into_slots():
    assert study_eta([60.0], [(10.0, None), (10.0, None)], 2, 2) == pytest.approx(110.0)
    # runs projected at 120 s and 60 s: the waiting one takes their mean, from when a slot frees
    assert study_eta([], [(30.0, 90.0), (30.0, 30.0)], 1, 2) == pytest.approx(30.0 + 90.0)
    assert study_eta([], [(5.0, None)], 3, 1) is None  # nothing measured yet
    assert study_eta([100.0], [], 4, None) == pytest.approx(400.0)  # Ray, nothing running
    assert study_eta([], [], 0, 3) == 0.0


def test_event_lines_say_the_phase_or_the_step_with_loss_throughput_and_eta():
    mark = {"n": 3, "percent": 10, "step": 8, "total_steps": 75, "epoch": 0.32, "loss": 2.41349,
            "tokens_per_s": 1234.5, "eta_s": 252.0}  # fmt: skip
    assert event_line("full seed 42", mark) == (
        "  full seed 42: 10% step 8/75, epoch 0.32, loss 2.4135, 1,234 tok/s, ETA 4m12s"
    )
    assert event_line("full seed 42", {"phase": "loading"}, "node-1") == (
        "  full seed 42: loading (on node-1)"
    )
    evaluating = {"phase": "evaluating", "step": 25, "total_steps": 75, "loss": 2.1}
    assert event_line("ffn seed 1", evaluating) == (
        "  ffn seed 1: evaluating (at step 25/75, loss 2.1000)"
    )


def lines_of(model_dir, out, quiet: bool, *sets, **overrides) -> list[str]:
    stream = io.StringIO()
    run_study(config(model_dir, *sets, **overrides), out, log=Output(quiet, stream))
    return stream.getvalue().splitlines()


@pytest.mark.slow
def test_without_a_terminal_a_run_gets_a_line_per_phase_and_per_tenth(tiny_gpt2_dir, tmp_path):
    lines = lines_of(tiny_gpt2_dir, tmp_path / "out", False)
    begin = next(i for i, line in enumerate(lines) if line.startswith("run 1/1"))
    number, eta = r"\d+\.\d{4}", r"ETA (\d+m)?\d+s"
    expected = [
        r"run 1/1: full seed 42 \(elapsed \d+s\)",
        r"  full seed 42: loading",
        r"  full seed 42: base eval",
        r"  full seed 42: training",
        *[
            rf"  full seed 42: {10 * k}% step {2 * k}/20, epoch {k / 10:.2f}, loss {number}, "
            rf"[\d,]+ tok/s, {eta}"
            for k in range(1, 11)
        ],  # fmt: skip
        rf"  full seed 42: evaluating \(at step 20/20, loss {number}\)",
        rf"  full seed 42: saving \(eval loss {number}\)",
        r"  full seed 42: ok \(\d+s\)",
    ]
    assert len(lines) - begin == len(expected), lines
    for line, pattern in zip(lines[begin:], expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.slow
def test_quiet_keeps_each_run_s_start_and_end_and_its_failure(tiny_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_FAULTS", json.dumps({"attention seed 42": {"lr": 1e38}}))
    lines = lines_of(tiny_gpt2_dir, tmp_path / "out", True, strategies=["full", "attention"],
                     train_split="train[:8]")  # fmt: skip
    runs = lines[next(i for i, line in enumerate(lines) if line.startswith("run 1/2")) :]
    assert [line.split(" (")[0].split(": FAILED")[0] for line in runs] == [
        "run 1/2: full seed 42",
        "  full seed 42: ok",
        "run 2/2: attention seed 42",
        "  attention seed 42",
    ]
    assert "overflow" in runs[-1] or "non-finite" in runs[-1]  # lr 1e38: the loss diverges


# --- the live display, read back as a terminal shows it ----------------------------------


class Screen:
    """The little of a terminal the display uses: text, CR, LF, cursor up, erase line, erase
    below. `frames` holds the screen each time a redraw ended (erase below)."""

    CODE = re.compile(r"\x1b\[(\d*)([A-Za-z])")

    def __init__(self) -> None:
        self.lines, self.row, self.col, self.frames = [""], 0, 0, []

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            code = self.CODE.match(text, i)
            if code:
                n, op = int(code.group(1) or 1), code.group(2)
                if op == "A":
                    self.row = max(0, self.row - n)
                elif op == "K":
                    self.lines[self.row] = ""
                elif op == "J":
                    self.lines[self.row] = self.lines[self.row][: self.col]
                    del self.lines[self.row + 1 :]
                    self.frames.append(list(self.lines))
                i = code.end()
                continue
            char = text[i]
            if char == "\r":
                self.col = 0
            elif char == "\n":  # as a terminal's output processing has it (onlcr)
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.lines):
                    self.lines.append("")
            else:
                line = self.lines[self.row].ljust(self.col)
                self.lines[self.row] = line[: self.col] + char + line[self.col + 1 :]
                self.col += 1
            i += 1


def test_lines_print_above_the_rows_and_the_rows_are_redrawn_in_place():
    stream = io.StringIO()
    region, screen = Region(stream), Screen()
    region.draw(["a seed 1  loading, 1s", "study: 0/2"])
    region.draw(["a seed 1  training, 2s", "b seed 1  loading, 1s", "study: 0/2"])
    region.print("  a seed 1: " + "a long line that wraps in a narrow terminal " * 4)
    region.draw(["b seed 1  training, 3s", "study: 1/2"])
    region.clear()
    screen.feed(stream.getvalue())
    assert screen.frames[-2] == [
        "  a seed 1: " + "a long line that wraps in a narrow terminal " * 4,
        "b seed 1  training, 3s",
        "study: 1/2",
        "",
    ]
    assert screen.lines == ["  a seed 1: " + "a long line that wraps in a narrow terminal " * 4, ""]


ROW = re.compile(
    r"(full|attention|ffn) seed 42 +("
    r"(starting|loading|base eval|training|evaluating|generating|saving), (\d+m)?\d+s"
    r"|\s*\d+%\|[^|]*\| \d+/\d+(, [a-z]+)?(, loss \d\.\d{3})?(, [\d,]+ tok/s)?, ETA \S+)"
)
STUDY_ROW = re.compile(r"study: [0-3]/3 runs done, [0-3] running; elapsed \S+, ETA \S+")
# what a row is made of: no line above the rows may hold any of it
ROW_PARTS = re.compile(r"seed 42 +(starting|loading|base eval|training|evaluating|generating|"
                       r"saving|\s*\d+%)|%\||runs done")  # fmt: skip


@pytest.mark.slow
def test_in_a_terminal_three_runs_at_once_share_one_display_and_never_interleave(
    tiny_gpt2_dir, tmp_path
):
    import pty

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "loraplace.cli", "study", "--model", str(tiny_gpt2_dir),
            "--data", str(ALPACA_HEAD), "--train-split", "train[:80]", "--eval-split",
            "train[100:104]", "--epochs", "1", "--strategy", "full", "--strategy", "attention",
            "--strategy", "ffn", "--out", str(out), "--set", "runs_per_device=3",
            *[a for s in ["max_length=64", "loss_on=all", "generations=1", "max_new_tokens=4", "report_to=[]"]
              for a in ("--set", s)]]  # fmt: skip
    env = os.environ | {"TERM": "xterm", "COLUMNS": "120", "LINES": "30",
                        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other side closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(timeout=600) == 0
    reader.join(timeout=10)
    os.close(leader)
    screen = Screen()
    screen.feed(b"".join(chunks).decode("utf-8", "replace"))
    # the display's time: after the study's opening lines, before the summary's blank line
    start = next(i for i, line in enumerate(screen.lines) if line.startswith("paths on")) + 1
    seen_three = seen_bar = False
    for frame in screen.frames:
        shown = frame[start:]
        shown = shown[: shown.index("")] if "" in shown else shown
        rows = len(shown)  # where the rows begin: the study row and the runs' rows above it
        if shown and STUDY_ROW.fullmatch(shown[-1]):
            rows -= 1
            while rows and ROW.fullmatch(shown[rows - 1]):
                rows -= 1
            seen_three |= len(shown) - rows == 4
            seen_bar |= any("%|" in line for line in shown[rows:])
        for line in shown[:rows]:  # above the rows: whole lines, nothing of a row left behind
            assert not ROW_PARTS.search(line), (line, shown)
    assert seen_three and seen_bar
    final = screen.lines[start:]
    ended = final[: final.index("")]
    assert sorted(line.split(":")[0] for line in ended if "seed 42:" in line) == [
        "  attention seed 42", "  ffn seed 42", "  full seed 42",
    ]  # fmt: skip
    assert not any(ROW_PARTS.search(line) for line in ended), ended  # the rows are gone
    text = "\n".join(screen.lines)
    assert "it/s" not in text and "{'loss'" not in text  # no Trainer bar or log reached it
    for name in ("full", "attention", "ffn"):  # each run's own output went to its folder
        assert (out / f"runs/{name}/seed-42/run.log").is_file()


@pytest.mark.slow
def test_progress_files_appear_and_advance_while_a_study_runs(tiny_gpt2_dir, tmp_path):
    out, seen, stop = tmp_path / "out", {}, threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in out.glob("runs/*/seed-*/progress.json"):
                if (path.parent / "result.json").is_file():
                    continue  # only what was seen while the run was still going
                try:
                    progress = json.loads(path.read_text())
                except ValueError:
                    raise AssertionError(f"{path} was read half-written") from None
                state = (progress["phase"], progress["step"])
                states = seen.setdefault(path.parent.parent.name, [])
                if not states or states[-1] != state:
                    states.append(state)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_study(config(tiny_gpt2_dir, strategies=["full", "ffn"], epochs=2), out, log=print)
    finally:
        stop.set()
        watcher.join()
    order = ["loading", "base eval", "training", "evaluating", "saving"]
    for name in ("full", "ffn"):
        states = seen[name]
        assert len(states) >= 3, states
        phases = [order.index(p) for p, _ in states if p in order]
        steps = [s for p, s in states if s is not None]
        assert phases[0] == 0 and max(phases) >= order.index("training"), states
        assert steps == sorted(steps), states  # it only ever advanced
        final = json.loads((out / f"runs/{name}/seed-42/progress.json").read_text())
        assert final["step"] == final["total_steps"] == 40
