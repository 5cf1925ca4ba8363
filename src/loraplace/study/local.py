"""A study's runs on this machine: how many at once, with which threads or GPU, each in a
process of its own.

    schedule = local_plan(cfg, runs=len(specs), prepared=prepared)
    results = run_local(specs, cfg, out, log, schedule)

On a CPU, several runs go at once where that ends the study sooner (`cpu_runs_at_once`), each
with its share of the cores, forked from a server that imported the ML stack once
(`study.worker`). On CUDA, every visible GPU works, one run a GPU at a time (several where
`runs_per_device` asks), each run a fresh process that sees only its GPU.
"""

from __future__ import annotations

import json
import os
import queue
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.core.results import write_result
from loraplace.study import worker
from loraplace.study.display import StudyProgress
from loraplace.study.prepare import Prepared
from loraplace.study.spec import RunSpec


def run_env(cfg: StudyConfig, out: Path, name: str) -> dict:
    """The environment of a run's process: the study's, with its loggers' settings."""
    env = dict(os.environ)
    if "wandb" in cfg.report_to:
        env.setdefault("WANDB_PROJECT", cfg.wandb_project)
        env.setdefault("WANDB_RUN_GROUP", out.resolve().name)
        env.setdefault("WANDB_DIR", str(out))
        if not env.get("WANDB_API_KEY"):
            env.setdefault("WANDB_MODE", "offline")
    if "tensorboard" in cfg.report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard" / name)
    return env


def likely_device(cfg: StudyConfig) -> str:
    """The device a study will run on, guessed before its checks without initialising CUDA
    (the study may start its fork server early, for CPU runs only)."""
    from loraplace.fast import gpus

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if gpus.count() else "cpu"


@dataclass(frozen=True)
class Schedule:
    """How a study's runs go on this machine: `at_once` at a time, each with `threads` (None:
    torch's own), and on CUDA each holding one of `gpus` (a GPU's id, as CUDA_VISIBLE_DEVICES
    names it, once per run it may hold at a time) while it runs."""

    at_once: int
    threads: int | None = None
    gpus: tuple[str, ...] = ()


# How many times longer a CPU run with half the cores takes, beside another such run, than a
# run with all of them: 1.50-1.55 natively on an AVX-512 Xeon, 1.67-1.72 there with AVX2
# emulated (embedded model, 1-epoch runs, 2 cores; docs/measurements/2026-12-01-runs-at-once-xeon.md).
# The larger is used. Under 2, two runs at once end a study of several runs sooner.
THREADS_GAIN = 1.7


def cpu_runs_at_once(
    runs: int, cores: int, free_mb: float | None, run_mb: float, gain: float = THREADS_GAIN
) -> int:
    """How many runs a CPU study runs at once, where that ends it at least 5 % sooner and
    memory holds them all; else one.

    Two at once take half the cores each, a round of two `gain` times as long as one run with
    every core. Where that is one thread each and the study has one run more than the cores,
    all of them also go at once, the cores shared out (three runs on two cores in one round,
    not two rounds that leave a core idle): only as the study's one round, since runs of a
    later round would each have a core and train faster than the first round's. Every run of
    such a study gets the same threads, a last run alone too, so their training times compare."""
    if runs < 2 or cores < 2 or free_mb is None:
        return 1
    options = [2] + ([runs] if cores // 2 == 1 and runs == cores + 1 else [])
    times = {k: study_time(runs, k, cores, gain) for k in options if free_mb >= k * run_mb}
    best = min(times, key=lambda k: (times[k], k), default=1)
    return best if best > 1 and times[best] <= 0.95 * runs else 1


def study_time(runs: int, at_once: int, cores: int, gain: float = THREADS_GAIN) -> float:
    """A study's time in rounds of `at_once` runs, in units of one run with every core: a
    round of two or more takes `gain` (each with its share of the cores), and `gain` times
    the runs over the cores where one-thread runs outnumber the cores."""
    full, last = divmod(runs, at_once)
    rounds = [at_once] * full + ([last] if last else [])
    return sum(gain * max(1.0, m / cores) if at_once > 1 else 1.0 for m in rounds)


def run_memory_mb(base_mb: float) -> float:
    """A bound on a CPU run's peak memory from its base's float32 weights: three times them
    and 1 GB (runs of the embedded model, 520 MB of weights, peak at 1.7-2.2 GB)."""
    return 3 * base_mb + 1024


def available_mb() -> float | None:
    """Memory the OS can give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_plan(cfg: StudyConfig, runs: int, prepared: Prepared) -> Schedule:
    """How this machine runs the study's `runs`: on a CPU, `runs_per_device` as set, else
    `cpu_runs_at_once` where `threads` is not set; on CUDA, one GPU a run, every GPU busy
    (`runs_per_device` runs a GPU where set, as many as fit where auto, else one)."""
    setting, device = cfg.runs_per_device, prepared.device
    if device == "cuda":
        return gpu_schedule(setting, runs, prepared.gpu_run.total_mb)
    if setting not in (None, "auto"):
        at_once = int(setting)
    elif device != "cpu" or cfg.threads:
        at_once = 1
    else:
        free, need = available_mb(), run_memory_mb(prepared.base_mb)
        at_once = cpu_runs_at_once(runs, cpu_cores(), free, need)
    return Schedule(at_once, cores_each(at_once) if at_once > 1 and not cfg.threads else None)


def gpu_schedule(setting: str | None, runs: int, run_mb: float) -> Schedule:
    """Every visible GPU busy, one run on each at a time, or `setting` runs on each (auto: as
    many as fit beside each other, `gpu_runs_that_fit`), the GPUs taken round robin. Every run
    of the study runs beside as many others as the first, so their times compare."""
    from loraplace.fast.hardware import Machine

    cards = Machine.here().gpus
    if setting == "auto":
        each = gpu_runs_that_fit(min(g.free_mb for g in cards), run_mb)
    else:
        each = int(setting) if setting else 1
    slots = tuple(g.id for _ in range(each) for g in cards)
    return Schedule(max(1, min(len(slots), runs)), None, slots)


def gpu_runs_that_fit(free_mb: float, run_mb: float, most: int = 8) -> int:
    """Runs that fit on one GPU at once: `run_mb` is a run's estimated need with its own CUDA
    context and the allocator's reserve (`plan.memory.run_memory`); 10 % of the free memory is
    kept free; at most `most`, at least one."""
    return max(1, min(most, int(0.9 * free_mb // run_mb))) if run_mb > 0 else 1


def cores_each(at_once: int) -> int:
    """Each run's share of this machine's cores when `at_once` run together."""
    return max(1, cpu_cores() // at_once)


def run_local(
    todo: list[RunSpec], cfg: StudyConfig, out: Path, log=print, schedule: Schedule = Schedule(1)
) -> list[dict]:
    """Run the specs on this machine, each in a process of its own, `schedule.at_once` at a
    time; on CUDA each run sees one GPU, taken from the schedule's while it runs. The study's
    progress (a live display in a terminal, plain lines elsewhere) follows them."""
    at_once = max(1, schedule.at_once)
    with StudyProgress(todo, out, log, at_once) as progress:
        return _run_local(todo, cfg, out, progress, schedule, at_once)


def _run_local(todo, cfg: StudyConfig, out: Path, progress, schedule: Schedule, at_once: int):
    free = queue.SimpleQueue()  # a slot a run holds while it runs: its GPU, or None
    for slot in schedule.gpus or (None,) * at_once:
        free.put(slot)

    def one(spec: RunSpec) -> dict:
        slot = free.get()
        try:
            return _run_one(spec, cfg, out, at_once, progress, slot)
        finally:
            free.put(slot)

    if at_once <= 1:
        return [one(spec) for spec in todo]
    threads = todo[0].threads if todo else None
    each = f", {threads} thread{'s' if threads != 1 else ''} each" if threads else ""
    where = f" on {len(set(schedule.gpus))} GPU, one GPU a run" if schedule.gpus else ""
    progress.log(
        f"runs: {at_once} at a time{where or ' on this device'}, each its own process{each}"
    )
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(one, todo))


def _run_one(
    spec: RunSpec, cfg: StudyConfig, out: Path, at_once: int, progress, gpu: str | None = None
) -> dict:
    """One spec in a process of its own; its result (a failed one if the process died)."""
    name, seed, device = spec.name, spec.seed, spec.paths.device
    progress.begin(name, seed)
    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    path = spec.with_(runs_at_once=at_once, gpu=gpu).write()
    env = run_env(cfg, out, f"{name}-seed-{seed}") | progress.run_env  # no Trainer bars
    if at_once > 1 and not cfg.threads:  # the cores shared out, not each run taking them all
        env["OMP_NUM_THREADS"] = str(spec.threads or cores_each(at_once))
    if device == "cpu":  # a CPU run sees no GPU, a CUDA run its own one
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device == "cuda" and gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.perf_counter()
    try:
        code = worker.run_spec(path, env, cfg.reuse_process, device)
    except KeyboardInterrupt:  # Ctrl-C: stop the run (it dies with its server), record nothing
        worker.close_worker(timeout=0)
        raise
    if not (folder / "result.json").is_file():  # the process died before it could say why
        write_result(folder / "result.json", spec.failed(f"worker exited with status {code}"))
    result = json.loads((folder / "result.json").read_text())
    progress.end(name, seed, time.perf_counter() - t0, result)
    return result
