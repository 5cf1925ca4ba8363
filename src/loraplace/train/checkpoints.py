"""Mid-run checkpoints: a run killed part-way resumes where it stopped, with the same result.

    resume = latest(run_dir, key, log)          # a checkpoint of these settings, or None
    trainer.add_callback(checkpointer(trainer, run_dir, key, every_steps=2, ...))
    trainer.train(resume_from_checkpoint=resume and str(resume.path))
    clear(run_dir)                              # once the run's result is written

A checkpoint is the folder RUN/checkpoint-<step>: the adapter (PEFT's files), the optimizer,
scheduler and RNG states and the trainer state (the Hugging Face Trainer's own files, which
`resume_from_checkpoint` reads back), and `loraplace.json`: the run's key (a hash of every
setting that changes what the run computes, the strategy, the seed and the training tokens),
the curves recorded so far (train loss per step, the epoch-end evaluations) and the training
time spent so far. The data order needs nothing more: the Trainer's sampler draws each epoch's
order from `data_seed` + epoch, and on resume skips the batches already trained.

Each checkpoint is written into a temporary folder, synced, and renamed: a folder with the final
name is complete. Older ones are then deleted, so only the latest is kept. A checkpoint is taken
after an optimizer step, never after a run's last one; one due at an epoch's last step waits for
that epoch's evaluation, so resuming never skips an evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from loraplace.core.results import umask

PREFIX = "checkpoint-"
MANIFEST = "loraplace.json"


def run_key(settings: dict, strategy: dict, seed: int, train_tokens: list[list[int]]) -> str:
    """What a checkpoint must match to be resumed: same settings, strategy, seed and data."""
    blob = json.dumps([settings, strategy, seed, train_tokens], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_umask_says(folder: Path) -> None:
    """What a library wrote with its own mode (safetensors: 0600) gets the umask's."""
    mask = umask()
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_dir_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """Make folder `path` with `fill(folder)` so that it appears complete or not at all: `fill`
    writes into a temporary sibling, which is synced and renamed; an older `path` is replaced.
    On any failure (a full disk) the temporary folder is removed and the old `path` kept."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide it from the group
        fill(tmp)
        _as_umask_says(tmp)
        _sync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _sync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict


def _step(path: Path) -> int:
    try:
        return int(path.name.removeprefix(PREFIX))
    except ValueError:
        return -1


def latest(run_dir: Path, key: str, log=print) -> Checkpoint | None:
    """The newest complete checkpoint of this run with the same key; others are removed."""
    found = sorted((p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir()), key=_step)
    remove_leftovers(run_dir)
    if not found:
        return None
    newest = found[-1]
    for older in found[:-1]:
        shutil.rmtree(older, ignore_errors=True)
    try:
        manifest = json.loads((newest / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("key") != key:
        log(f"  checkpoint at step {_step(newest)} is for other settings; starting from step 0")
        shutil.rmtree(newest, ignore_errors=True)
        return None
    return Checkpoint(newest, _step(newest), manifest)


def remove_leftovers(run_dir: Path) -> None:
    """What writes cut short left in the run's folder (checkpoints, the adapter, result files:
    temporary `.NAME.*.tmp` entries, and `.NAME.old-PID` folders not yet deleted). Only one
    process writes a run's folder at a time (the study's lock), so none of them is in use."""
    for tmp in Path(run_dir).glob(".*"):
        if tmp.name.endswith(".tmp") or ".old-" in tmp.name:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def clear(run_dir: Path) -> None:
    """Every checkpoint of the run (it finished), and any leftovers."""
    for path in Path(run_dir).glob(f"{PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(run_dir)


def checkpointer(
    trainer,
    run_dir: Path,
    key: str,
    every_steps: int | None,
    every_s: float | None,
    curves: dict,
    timing: dict,
    train_s: Callable[[], float],
):
    """A TrainerCallback that writes a checkpoint every `every_steps` optimizer steps and/or
    every `every_s` seconds, whichever comes first. `curves` is the run's record (saved with
    each checkpoint), `train_s()` its training time so far; `timing` gets `checkpoint_s` (time
    spent writing checkpoints) and `checkpoints` (how many)."""
    from transformers import TrainerCallback

    timing.setdefault("checkpoint_s", 0.0)
    timing.setdefault("checkpoints", 0)
    schedule = _Schedule(every_steps, every_s)
    save = partial(_save, trainer, Path(run_dir), key, curves, timing, train_s, schedule)

    class Checkpointer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            schedule.begin(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # an epoch's last step (epoch a whole number) waits for its evaluation
            if logs and "loss" in logs and state.epoch % 1 != 0 and schedule.due(state):
                save(state)

        def on_epoch_end(self, args, state, control, **kwargs):
            if schedule.due(state):
                save(state)

    return Checkpointer()


@dataclass
class _Schedule:
    """When a checkpoint is due: `every_steps` optimizer steps after the last one (or after the
    step training began at) or `every_s` seconds after it (or after training began)."""

    every_steps: int | None
    every_s: float | None
    last_step: int | None = None  # of the last checkpoint written
    start_step: int = 0  # the step training began at (a resumed run's checkpoint step)
    since: float = field(default_factory=time.monotonic)  # the last checkpoint or the start

    def begin(self, step: int) -> None:
        self.start_step, self.since = step, time.monotonic()

    def written(self, step: int) -> None:
        self.last_step, self.since = step, time.monotonic()

    def due(self, state) -> bool:
        if state.global_step >= state.max_steps:  # the run is about to finish anyway
            return False
        last = self.last_step if self.last_step is not None else self.start_step
        by_steps = self.every_steps is not None and state.global_step - last >= self.every_steps
        by_time = self.every_s is not None and time.monotonic() - self.since >= self.every_s
        return by_steps or by_time


def _save(trainer, run_dir: Path, key: str, curves, timing, train_s, schedule, state) -> None:
    """Write the checkpoint of `state`'s step atomically, delete every other, and count it."""
    start = time.perf_counter()
    step = state.global_step
    manifest = {
        "key": key,
        "step": step,
        "epoch": state.epoch,
        "curves": {k: v for k, v in curves.items() if k != "last_eval"},
        "train_s": train_s(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_dir_atomically(run_dir / f"{PREFIX}{step}", partial(_fill, trainer, state, manifest))
    for older in run_dir.glob(f"{PREFIX}*"):
        if _step(older) != step:
            shutil.rmtree(older, ignore_errors=True)
    timing["checkpoint_s"] += time.perf_counter() - start
    timing["checkpoints"] += 1
    schedule.written(step)


def _fill(trainer, state, manifest: dict, folder: Path) -> None:
    """A checkpoint's files: the adapter, the Trainer's optimizer, scheduler, RNG and trainer
    states (what `resume_from_checkpoint` reads), and loraplace's manifest."""
    trainer.model.save_pretrained(str(folder), safe_serialization=True)
    trainer._save_optimizer_and_scheduler(str(folder))
    trainer._save_rng_state(str(folder))
    state.save_to_json(str(folder / "trainer_state.json"))
    (folder / MANIFEST).write_text(json.dumps(manifest, default=str, allow_nan=True))
