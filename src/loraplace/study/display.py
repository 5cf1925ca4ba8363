"""What a running study shows: one live display in a terminal, plain lines anywhere else.

    log = Output(quiet=args.quiet).take_terminal()   # the CLI's (loraplace.study.terminal)
    with StudyProgress(todo, out, log, at_once) as progress:      # an executor's
        env |= progress.run_env           # each run: no Trainer bars (live: output to run.log)
        progress.begin("full", 42); ...; progress.end("full", 42, seconds, result)

live   one row per running run (phase, steps, loss, tokens/s, ETA) and a study row (runs done,
       elapsed, ETA from the measured step times), redrawn in place twice a second; every
       other line (a run's end, a failure, a warning any process of the study writes) is
       printed above them, whole. The runs' own output goes to run.log in their folders.
lines  (a log file, CI, Ray's job log) each run's start and end, a line at each phase change
       and each tenth of its steps with loss, tokens/s and ETA, a study line after each end.
quiet  (`--quiet`) each run's start and end, failures included.
A `log` that is a plain callable (tests, the benchmark) gets lines. Whichever the executor,
runs' progress.json files land in OUT (on Ray the driver writes them: `ray_progress`), and
this display reads only those files, as `loraplace status` does.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from loraplace.core.results import write_json
from loraplace.core.timefmt import duration
from loraplace.study.spec import RunSpec
from loraplace.study.status import STUDY_FILE, Reader, study_eta
from loraplace.train.progress import BARS_ENV, FILE, OUTPUT_ENV

POLL_S = {"live": 0.5, "lines": 1.0}
RUN_OUTPUT = "run.log"  # in live mode, a run's own output, in its folder


def event_line(label: str, event: dict, where: str = "") -> str:
    """A plain line for one of a run's events: a phase change or a tenth of its steps."""
    step, total, loss = event.get("step"), event.get("total_steps"), event.get("loss")
    steps = f"step {step}/{total}" if step is not None and total else ""
    if "percent" in event:
        parts = [f"{event['percent']}% {steps}"]
        if event.get("epoch") is not None:
            parts.append(f"epoch {event['epoch']:.2f}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if event.get("tokens_per_s"):
            parts.append(f"{event['tokens_per_s']:,.0f} tok/s")
        parts.append(f"ETA {duration(event.get('eta_s'))}")
        return f"  {label}: {', '.join(parts)}"
    phase, details = event["phase"], []
    if phase == "loading" and where:
        details.append(f"on {where}")
    if phase in ("evaluating", "training") and steps:
        details.append(f"at {steps}" + (f", loss {loss:.4f}" if loss is not None else ""))
    if phase in ("training", "saving") and event.get("eval_loss") is not None:
        details.append(f"eval loss {event['eval_loss']:.4f}")
    return f"  {label}: {phase}" + (f" ({'; '.join(details)})" if details else "")


def live_row(label: str, view: dict | None, elapsed: float, width: int, ascii: bool) -> str:
    """A running run's row: its phase, and while it trains a bar with loss, tok/s and ETA."""
    from tqdm import tqdm

    view = view or {}
    phase, step, total = view.get("phase") or "starting", view.get("step"), view.get("total_steps")
    if step is None or not total or phase not in ("training", "evaluating"):
        return f"{label}  {phase}, {duration(elapsed)}"
    parts = [] if phase == "training" else [phase]
    if view.get("loss") is not None:
        parts.append(f"loss {view['loss']:.3f}")
    if view.get("tokens_per_s"):
        parts.append(f"{view['tokens_per_s']:,.0f} tok/s")
    parts.append(f"ETA {duration(view.get('eta_s'))}")
    bar = max(5, min(30, width - len(label) - 66))  # one width for every row: the bars line up
    return tqdm.format_meter(
        step, total, elapsed, ncols=width - 1, prefix=label, ascii=ascii,
        bar_format=f"{{desc}} {{percentage:3.0f}}%|{{bar:{bar}}}| {{n_fmt}}/{{total_fmt}}{{postfix}}",
        postfix=", ".join(parts),
    )  # fmt: skip


class StudyProgress:
    """A study's progress, from however many runs go at once, on either executor."""

    def __init__(self, todo: list[RunSpec], out: Path, log=print, at_once: int | None = 1,
                 executor: str = "local") -> None:  # fmt: skip
        self.out, self.log_line = Path(out), log
        self.mode = getattr(log, "mode", "lines")
        self.folders = {(s.name, s.seed): s.folder for s in todo}
        self.total, self.executor, self.reader = len(todo), executor, Reader(out)
        self.started, self.clock = time.time(), time.monotonic()
        self.lock = threading.RLock()
        self.begun: dict = {}  # run -> monotonic time the executor began it (local)
        self.views: dict = {}  # run -> its progress.json as last read
        self.printed: dict = {}  # run -> (its start, the last event printed)
        self.ended, self.failed, self.durations = set(), 0, []
        self.count, self._at_once = 0, at_once
        self._write_study()
        for folder in self.folders.values():  # what an earlier start of the study left
            (folder / FILE).unlink(missing_ok=True)
        self.region = None
        if self.mode == "live" and todo and hasattr(log, "start_live"):
            self.region = log.start_live()
        self._stop, self._thread = threading.Event(), None
        if self.mode in POLL_S and todo:
            self._thread = threading.Thread(target=self._poll, daemon=True, name="progress")
            self._thread.start()

    # -- the executors' side --------------------------------------------------------------

    @property
    def at_once(self) -> int | None:
        return self._at_once

    @at_once.setter
    def at_once(self, value: int | None) -> None:  # a GPU's `auto`: known after the first run
        self._at_once = value
        self._write_study()

    @property
    def run_env(self) -> dict:
        """What each run's environment adds: the Trainer's bars off; in live mode, the run's
        own output to run.log in its folder."""
        return {BARS_ENV: "off"} | ({OUTPUT_ENV: RUN_OUTPUT} if self.region else {})

    def __call__(self, line: str) -> None:
        with self.lock:
            self.log_line(line)

    log = __call__

    def begin(self, name: str, seed: int) -> None:
        with self.lock:
            self.count += 1
            self.begun[(name, seed)] = time.monotonic()
            if not self.region:
                eta = self._eta()
                eta = f", ETA {duration(eta)}" if eta is not None else ""
                elapsed = duration(time.monotonic() - self.clock)
                self.log(
                    f"run {self.count}/{self.total}: {name} seed {seed} (elapsed {elapsed}{eta})"
                )
            self._draw()

    def end(self, name: str, seed: int, seconds: float, result: dict) -> None:
        with self.lock:
            self.finished(name, seed, seconds, result)
            status = "ok" if result.get("status") == "ok" else f"FAILED: {result.get('error')}"
            resumed = result.get("resumed_from_step")
            since = f", resumed from step {resumed}" if resumed is not None else ""
            output = self.folders[(name, seed)] / RUN_OUTPUT
            if self.region and status != "ok" and output.is_file():
                since += f"; its output: {output}"
            self.log(f"  {name} seed {seed}: {status} ({duration(seconds)}{since})")
            if self.mode == "lines" and len(self.ended) < self.total:
                self.log(self._study_text())
            self._draw()

    def finished(self, name: str, seed: int, seconds: float | None, result: dict) -> None:
        """A run ended: its last events are printed (lines) and its row goes."""
        with self.lock:
            key = (name, seed)
            if self.mode == "lines":
                self._read(key)
            self.ended.add(key)
            self.failed += result.get("status") != "ok"
            if seconds is not None and result.get("status") == "ok":
                self.durations.append(seconds)
            self._draw()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self.lock:
            if self.region:
                self.log_line.stop_live()
                self.region = None

    def __enter__(self) -> StudyProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading the runs' files ----------------------------------------------------------

    def _write_study(self) -> None:
        write_json(self.out / STUDY_FILE, {
            "started": self.started, "pid": os.getpid(), "host": socket.gethostname(),
            "executor": self.executor, "at_once": self._at_once,
            "runs": [list(key) for key in self.folders],
        })  # fmt: skip

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S[self.mode]):
            with self.lock:
                for key in self.folders:
                    if key not in self.ended:
                        self._read(key)
                self._draw()

    def _read(self, key) -> None:
        """Take in the run's progress.json; in lines mode print the events not printed yet
        (a retried Ray task starts its events again)."""
        view = self.reader.progress(self.folders[key])
        if not view:
            return
        self.views[key] = view
        if self.mode != "lines":
            return
        attempt, last = self.printed.get(key, (None, 0))
        if attempt != view.get("started"):
            attempt, last = view.get("started"), 0
        label = f"{key[0]} seed {key[1]}"
        where = view.get("host") if self.executor == "ray" else ""
        for event in view.get("events", []):
            if event["n"] > last:
                self.log(event_line(label, event, where))
                last = event["n"]
        self.printed[key] = (attempt, last)

    def _running(self) -> list:
        keys = [k for k in self.folders if (k in self.begun or k in self.views)]
        return [k for k in keys if k not in self.ended]

    def _elapsed(self, key, now: float) -> float:
        if key in self.begun:
            return time.monotonic() - self.begun[key]
        view = self.views[key]
        return (view.get("elapsed_s") or 0.0) + max(0.0, now - view.get("updated", now))

    def _eta(self) -> float | None:
        """The study's ETA: a run counts from its process's start (one waiting for a server
        to be ready counts as not begun)."""
        now, running = time.time(), []
        for key in self._running():
            view = self.views.get(key)
            if not view:
                running.append((0.0, None))
                continue
            left, age = view.get("eta_s"), max(0.0, now - view.get("updated", now))
            elapsed = (view.get("elapsed_s") or 0.0) + age
            running.append((elapsed, None if left is None else max(0.0, left - age)))
        waiting = self.total - len(self.ended) - len(running)
        return study_eta(self.durations, running, waiting, self._at_once)

    def _study_text(self) -> str:
        eta, running = self._eta(), len(self._running())
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (
            f"study: {len(self.ended)}/{self.total} runs done{failed}, {running} running; "
            f"elapsed {duration(time.monotonic() - self.clock)}, ETA {duration(eta)}"
        )

    def _draw(self) -> None:
        if not self.region:
            return
        width, _ = self.region.size()
        now, keys = time.time(), self._running()
        labels = {k: f"{k[0]} seed {k[1]}" for k in keys}
        pad = max((len(v) for v in labels.values()), default=0)
        rows = [
            live_row(labels[k].ljust(pad), self.views.get(k), self._elapsed(k, now), width,
                     self.region.ascii)
            for k in keys
        ]  # fmt: skip
        self.region.draw([*rows, self._study_text()])
