"""What a run tells its study while it runs: `progress.json` in its folder, rewritten atomically.

    progress = RunProgress.for_spec(spec)            # OUT/runs/S/seed-N/progress.json
    run.phases.listener = progress.on_phase          # "load" -> phase "loading", ...
    evaluate = progress.evaluating(evaluate)         # epoch evaluations: phase "evaluating"
    callbacks.append(progress.callback(tokens_per_epoch))   # steps, loss, tokens/s, ETA

The file is rewritten at each phase change (loading, base eval, training, evaluating,
generating, saving), at every tenth of the training steps, and otherwise at most every
`EVERY_S` seconds: never per step. Every value comes from what the run already has on the host:
the loss the Trainer logs, `state.max_steps`, the clock; reading them syncs no device. Its
`events` (phase changes and tenths, each with a snapshot) let a reader that polls print every
one of them, however rarely it looks. The study's display and `loraplace status` read the file;
on Ray the task forwards it to the driver (`loraplace.study.ray_progress`).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path

from loraplace.core.results import write_json

FILE = "progress.json"
EVERY_S = 3.0  # at most this long between writes while training
EVENTS_KEPT = 40  # the last phase changes and tenths, for readers that poll
# The run's named parts (`train.run.Phases`) as the user reads them
PHASES = {
    "load": "loading",
    "checks": "loading",
    "base_eval": "base eval",
    "train": "training",
    "generations": "generating",
    "save": "saving",
}
# Set by the study for its runs: "off" keeps the Trainer's own bars away from its display
BARS_ENV = "LORAPLACE_PROGRESS"
# Set by a study that draws a live display: the file (in the run's folder) its output goes to
OUTPUT_ENV = "LORAPLACE_RUN_OUTPUT"
SNAPSHOT = ("step", "total_steps", "epoch", "loss", "eval_loss", "tokens_per_s", "eta_s")


class RunProgress:
    """One run's progress.json: its phase, steps, loss, throughput and ETA."""

    def __init__(self, path: Path, strategy: str, seed: int, every_s: float = EVERY_S) -> None:
        self.path, self.every_s = Path(path), every_s
        self.begun = time.monotonic()
        self.state = {
            "strategy": strategy,
            "seed": seed,
            "phase": None,
            "step": None,
            "total_steps": None,
            "epoch": None,
            "epochs": None,
            "loss": None,
            "eval_loss": None,
            "tokens_per_s": None,
            "elapsed_s": 0.0,
            "eta_s": None,
            "resumed_from_step": None,
            "started": time.time(),
            "updated": time.time(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "events": [],
        }
        self._written = -math.inf  # monotonic time of the last write
        self._train = None  # (monotonic start, first step, first epoch, tokens per epoch)
        self._eval_s = 0.0  # evaluation time since training began
        self._next_tenth = 1

    @classmethod
    def for_spec(cls, spec) -> RunProgress:
        """For a run of `study.spec.RunSpec`: its folder, strategy and seed."""
        return cls(spec.folder / FILE, spec.name, spec.seed)

    def phase(self, name: str) -> None:
        """Enter a phase: recorded as an event and written at once (a repeat is ignored)."""
        if name != self.state["phase"]:
            self.state["phase"] = name
            self._event({"phase": name})
            self.write()

    def on_phase(self, part: str) -> None:
        """`Phases.listener`: a run's named part begins (one not in PHASES, such as attaching
        the adapters, stays in the phase before it)."""
        if part in PHASES:
            self.phase(PHASES[part])

    def evaluating(self, evaluate):
        """`evaluate` that, called while training (an epoch's end), shows phase "evaluating"
        and records its loss; a base evaluation passes through untouched."""
        from loraplace.train.evaluate import token_weighted

        def wrapped():
            if self.state["phase"] not in ("training", "evaluating") or self._train is None:
                return evaluate()
            started = time.monotonic()
            self.phase("evaluating")
            try:
                per_example = evaluate()
            finally:
                self._eval_s += time.monotonic() - started
            self.state["eval_loss"] = token_weighted(per_example)
            step, total = self.state["step"] or 0, self.state["total_steps"] or 0
            self.phase("training" if step < total else "evaluating")
            return per_example

        return wrapped

    def train_begin(self, step: int, total: int, epoch: float, epochs: float, tokens: int) -> None:
        """Training starts (at `step`, where resumed) towards `total` optimizer steps."""
        self._train = (time.monotonic(), step, epoch, tokens)
        self._next_tenth = step * 10 // total + 1 if total else 1
        self.state.update(step=step, total_steps=total, epoch=round(epoch, 4), epochs=epochs)
        if step:
            self.state["resumed_from_step"] = step
        self.write()

    def step(self, step: int, epoch: float, loss: float) -> None:
        """An optimizer step was logged: written where a tenth was passed or time is due."""
        now, s = time.monotonic(), self.state
        started, first_step, first_epoch, tokens = self._train or (self.begun, 0, 0.0, 0)
        s.update(step=step, epoch=round(epoch, 4), loss=loss)
        done, train_s, total = step - first_step, now - started - self._eval_s, s["total_steps"]
        if done > 0 and train_s > 0:
            s["tokens_per_s"] = (epoch - first_epoch) * tokens / train_s
            s["eta_s"] = max(0, (total or step) - step) * (now - started) / done
        tenth = step * 10 // total if total else 0
        passed = tenth >= self._next_tenth
        if passed:
            self._next_tenth = tenth + 1
            self._event({"percent": 100 * step // total})
        if passed or now - self._written >= self.every_s:
            self.write()

    def callback(self, tokens_per_epoch: int):
        """A TrainerCallback that reads the Trainer's state and logged loss."""
        from transformers import TrainerCallback

        progress = self

        class Progress(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                progress.train_begin(
                    state.global_step, state.max_steps, state.epoch or 0.0,
                    args.num_train_epochs, tokens_per_epoch,
                )  # fmt: skip

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    progress.step(state.global_step, state.epoch or 0.0, logs["loss"])

        return Progress()

    def _event(self, what: dict) -> None:
        events = self.state["events"]
        n = events[-1]["n"] + 1 if events else 1
        snapshot = {k: self.state[k] for k in SNAPSHOT}
        events.append({"n": n, "at": time.time(), **what, **snapshot})
        del events[:-EVENTS_KEPT]

    def write(self) -> None:
        """Rewrite the file atomically, without an fsync (about 1 ms, not 8, on the development
        machine: nothing in it matters after a crash); a failed write never fails the run."""
        self._written = time.monotonic()
        self.state.update(updated=time.time(), elapsed_s=self._written - self.begun)
        try:
            write_json(self.path, self.state, sync=False)
        except OSError:
            pass


def trainer_bars() -> bool:
    """Whether the Trainer draws its own progress bars: not in a study's runs (the study shows
    their progress), else in a terminal or where LORAPLACE_PROGRESS asks for them."""
    value = os.environ.get(BARS_ENV, "")
    if value == "off":
        return False
    return bool(value) or sys.stderr.isatty()


def redirect_output(run_dir: Path) -> None:
    """Where the study draws a live display, send this run's output (notes, warnings) to the
    file OUTPUT_ENV names in its folder, so nothing writes over the display."""
    name = os.environ.get(OUTPUT_ENV)
    if not name:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(Path(run_dir) / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
