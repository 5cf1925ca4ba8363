"""`loraplace study`: every (strategy, seed) run, outside this process, results never lost.

    loraplace study --config configs/offline.yaml --out runs/offline

Everything a user can get wrong (strategies, model, data, splits, output folder) is checked
before anything is written. Finished runs with the same settings are skipped on a second call;
unfinished or failed ones are run again. Each run is a self-contained spec -> result.json unit
(see `train.py`), run in a fresh process so its peak memory is its own; with `reuse_process`
(Linux) one server process imports Python's ML stack once and forks a child for every run,
which restarts its peak-memory count; a server that dies is started again. With
`executor: ray` the same specs run as Ray tasks on a cluster instead (`cluster.py`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraplace.config import StudyConfig, idle_fast_paths, run_settings
from loraplace.core.errors import UserError
from loraplace.core.lock import acquire
from loraplace.core.results import (
    damaged_results,
    load_results,
    run_dir,
    write_json,
    write_result,
    write_text,
)
from loraplace.plan.strategies import Strategy, resolve, to_dict
from loraplace.train import server


def resolve_strategies(cfg: StudyConfig) -> list[Strategy]:
    return resolve(cfg.strategies, cfg.layer_study)


@dataclass
class Prepared:
    """A checked study: its strategies, and the paths and product libraries of its runs."""

    strategies: list[Strategy]
    paths: dict | None  # None: resolved by each cluster node (executor ray)
    products: dict
    plans: dict[str, dict]  # strategy name -> its placement: module path -> rank, and the count
    shapes: tuple = ((), None)  # (decoder product shapes, head shape): for `measure_products`
    base_mb: float = 0.0  # the base's float32 weights
    gpu_run: object = None  # plan.memory.RunMemory: a GPU run's estimated memory


def prepare(cfg: StudyConfig, products: bool = True) -> Prepared:
    """Check hardware, model, strategies and data without loading weights (one sentence for
    anything wrong); resolve what `auto` takes on this machine. `products`: also measure the
    product libraries with the config's threads (a study measures them once it knows its
    runs' threads)."""
    from loraplace.data.rows import load_rows
    from loraplace.plan.budget import equalize
    from loraplace.plan.memory import shape_of
    from loraplace.plan.models import meta_model, resolve
    from loraplace.plan.placement import place
    from loraplace.plan.roles import classify

    try:
        paths = cfg.resolve_paths()
    except UserError:
        if cfg.executor != "ray":
            raise
        paths = None  # settings for the cluster's nodes, not this driver: each node resolves
    strategies = resolve_strategies(cfg)
    meta = meta_model(resolve(cfg.model, cfg.trust_remote_code))
    modules = classify(meta)
    if cfg.equal_budget:
        if cfg.equal_budget not in [s.name for s in strategies]:
            raise UserError(
                f"equal_budget names {cfg.equal_budget!r}, which is not among the strategies"
            )
        strategies = equalize(modules, strategies, cfg.equal_budget, cfg.rank)
    plans = {s.name: plan_record(place(modules, s, cfg.rank, cfg.bias)) for s in strategies}
    for split in (cfg.train_split, cfg.eval_split):
        load_rows(cfg.data, split)
    shapes = _shapes(modules, meta)
    base_mb = sum(p.numel() for p in meta.parameters()) * 4 / 2**20
    gpu_run = gpu_run_memory(cfg, paths, shape_of(meta, modules), plans)
    if paths is None:
        return Prepared(strategies, None, {}, plans, shapes, base_mb, gpu_run)
    found = measure_products(cfg, paths, shapes, cfg.threads) if products else {}
    return Prepared(strategies, paths.to_dict(), found, plans, shapes, base_mb, gpu_run)


def gpu_run_memory(cfg: StudyConfig, paths, shape, plans: dict):
    """What a GPU run of the study's largest placement holds (`plan.memory`), in the
    precision it resolved on a GPU here (bf16 for a cluster's GPUs); a base whose weights and
    CUDA context alone exceed this machine's smallest GPU is refused in one sentence."""
    from loraplace.fast.hardware import Machine
    from loraplace.plan.memory import run_memory
    from loraplace.train.run import pack_rows

    on_gpu = paths is not None and paths.device == "cuda"
    precision = paths.precision if on_gpu else "bf16"
    largest = max((p["trainable_params"] for p in plans.values()), default=0)
    need = run_memory(shape, largest, pack_rows(cfg, "cuda"), precision, cfg.quantize)
    cards = Machine.here().gpus if on_gpu else ()
    if cards:
        smallest = min(cards, key=lambda g: g.total_mb)
        if need.weights_mb + need.context_mb > smallest.total_mb:
            raise UserError(
                f"the base's weights need {need.weights_mb:,.0f} MB in {precision} (and "
                f"{need.context_mb:,.0f} MB of CUDA context) and the GPU {smallest.name} has "
                f"{smallest.total_mb:,.0f} MB; use quantize 4bit or 8bit, or a larger GPU"
            )
    return need


def plan_record(placement) -> dict:
    """What a run must attach: the modules and their ranks, and the trainable count."""
    return {"ranks": placement.ranks, "trainable_params": placement.trainable_params}


def _shapes(modules, meta) -> tuple:
    """(the decoder's product shapes, the head's or None): what `measure_products` times."""
    from torch import nn

    head = meta.get_output_embeddings()
    head_shape = tuple(head.weight.shape) if isinstance(head, nn.Linear) else None
    return [(m.out_features, m.in_features) for m in modules if m.layer is not None], head_shape


def measure_products(cfg: StudyConfig, paths, shapes: tuple, threads: int | None) -> dict:
    """Measure (or read from the cache) which library runs each product shape faster here,
    with `threads` (None: all of torch's)."""
    from loraplace.fast.hardware import Paths, products_for
    from loraplace.fast.headloss import ROWS
    from loraplace.train.run import pack_rows

    paths = paths if isinstance(paths, Paths) else Paths.from_dict(paths)
    return products_for(paths, *shapes, pack_rows(cfg, paths.device), ROWS, threads)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".loraplace-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to output directory {str(out)!r} ({err.strerror or err})"
        ) from None


# Resolved paths that change what a run computes beyond float32 summation order: a finished
# run is reused only where this machine would take the same ones.
# (A result from before a path existed took its only value then.)
NUMERIC_PATHS = {"device": None, "product_dtype": None, "precision": "float32", "quantize": "none"}


def is_done(result: dict | None, spec: dict) -> bool:
    paths = (result or {}).get("paths") or {}
    return (
        result is not None
        and result.get("status") == "ok"
        and run_settings(result.get("config", {})) == run_settings(spec["config"])
        and result.get("strategy_spec") == spec["strategy"]
        and (
            "paths" not in spec
            or all(paths.get(k, then) == spec["paths"][k] for k, then in NUMERIC_PATHS.items())
        )
    )


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _env(cfg: StudyConfig, out: Path, name: str) -> dict:
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


def run_study(cfg: StudyConfig, out: Path, log=print) -> list[dict]:
    """Run every missing (strategy, seed); return all results found under OUT."""
    out = Path(out)
    if cfg.executor == "ray":  # before anything is written: is Ray installed?
        from loraplace.cluster import require_ray

        require_ray()
    elif server.uses_worker(cfg.reuse_process, likely_device(cfg)):  # imports overlap checks
        server.start_worker()
    prepared = prepare(cfg, products=False)
    device = (prepared.paths or {}).get("device", "cpu")
    if not server.uses_worker(cfg.reuse_process, device):
        server.close_worker(timeout=0)  # started for a CPU study that runs elsewhere
    strategies = prepared.strategies
    check_writable(out)
    acquire(out, "study", log)  # until the CLI lets go (lock.release) or this process ends
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    existing = {(r["strategy"], r["seed"]): r for r in load_results(out)}
    for path, why in damaged_results(out):
        run = f"{path.parent.parent.name} {path.parent.name.replace('-', ' ')}"
        log(f"{run}: result.json {why}; running it again")
    jobs = [(s, seed) for seed in cfg.seeds for s in strategies]
    todo = []
    for s, seed in jobs:
        spec = {
            "config": cfg.to_dict(),
            "strategy": to_dict(s),
            "seed": seed,
            "plan": prepared.plans[s.name],
            "run_dir": str(run_dir(out, s.name, seed)),
            "base_eval": str(out / "base_eval.json"),
        }
        if prepared.paths:
            spec["paths"] = prepared.paths
        if is_done(existing.get((s.name, seed)), spec):
            continue
        todo.append(spec)
    log(
        f"study: {len(jobs)} runs ({len(strategies)} strategies x {len(cfg.seeds)} seeds), {len(jobs) - len(todo)} already done"
    )
    schedule = local_plan(cfg, len(todo), prepared) if cfg.executor != "ray" else Schedule(1)
    threads = schedule.threads
    if prepared.paths:  # timed with the threads each run will have
        prepared.products = measure_products(
            cfg, prepared.paths, prepared.shapes, threads or cfg.threads
        )
        log(describe_paths(prepared.paths, prepared.products))
    for spec in todo:
        if prepared.paths:
            spec["products"] = prepared.products
        if threads:
            spec["threads"] = threads
    for line in idle_fast_paths(cfg):
        log(f"note: {line}")
    if schedule.at_once > 1 and server.uses_worker(cfg.reuse_process, device):
        server.start_worker(schedule.at_once)
    execute(todo, cfg, out, log, schedule, prepared.gpu_run)
    wanted = {(s.name, seed) for s, seed in jobs}
    return [r for r in load_results(out) if (r["strategy"], r["seed"]) in wanted]


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


def execute(
    todo: list[dict], cfg: StudyConfig, out: Path, log=print, schedule: Schedule | None = None,
    gpu_run=None,
) -> list[dict]:  # fmt: skip
    """Run the specs in `todo` with the config's executor; their results, each also written
    to its run folder under OUT."""
    if cfg.executor == "ray" and todo:  # nothing to do: no cluster to join
        from loraplace.cluster import run_on_ray

        return run_on_ray(todo, cfg, out, log, gpu_run)
    return run_local(todo, cfg, out, log, schedule or Schedule(1))


# How many times longer a CPU run with half the cores takes, beside another such run, than a
# run with all of them: 1.50-1.55 natively on an AVX-512 Xeon, 1.67-1.72 there with AVX2
# emulated (embedded model, 1-epoch runs, 2 cores; docs/performance.md, `runs_per_device`).
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
    setting, device = cfg.runs_per_device, (prepared.paths or {}).get("device", "cpu")
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
    todo: list[dict], cfg: StudyConfig, out: Path, log=print, schedule: Schedule = Schedule(1)
) -> list[dict]:
    """Run the specs on this machine, each in a process of its own, `schedule.at_once` at a
    time; on CUDA each run sees one GPU, taken from the schedule's while it runs."""
    progress = _Progress(len(todo), log)
    at_once = progress.at_once = max(1, schedule.at_once)
    free = queue.SimpleQueue()  # a slot a run holds while it runs: its GPU, or None
    for slot in schedule.gpus or (None,) * at_once:
        free.put(slot)

    def one(spec: dict) -> dict:
        slot = free.get()
        try:
            return _run_one(spec, cfg, out, at_once, progress, slot)
        finally:
            free.put(slot)

    if at_once <= 1:
        return [one(spec) for spec in todo]
    threads = todo[0].get("threads") if todo else None
    each = f", {threads} thread{'s' if threads != 1 else ''} each" if threads else ""
    where = f" on {len(set(schedule.gpus))} GPU, one GPU a run" if schedule.gpus else ""
    log(f"runs: {at_once} at a time{where or ' on this device'}, each its own process{each}")
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(one, todo))


class _Progress:
    """The study's progress lines, from however many runs are going at once."""

    def __init__(self, total: int, log) -> None:
        self.total, self.log, self.started, self.durations = total, log, time.perf_counter(), []
        self.count, self.lock, self.at_once = 0, threading.Lock(), 1

    def begin(self, name: str, seed: int) -> None:
        with self.lock:
            self.count += 1
            left = self.total - len(self.durations)
            rounds = -(-left // self.at_once)  # runs at once end together
            eta = (f", ETA {_fmt(sum(self.durations) / len(self.durations) * rounds)}"
                   if self.durations else "")  # fmt: skip
            elapsed = _fmt(time.perf_counter() - self.started)
            self.log(f"run {self.count}/{self.total}: {name} seed {seed} (elapsed {elapsed}{eta})")

    def end(self, name: str, seed: int, seconds: float, result: dict) -> None:
        with self.lock:
            self.durations.append(seconds)
            status = "ok" if result.get("status") == "ok" else f"FAILED: {result.get('error')}"
            resumed = result.get("resumed_from_step")
            since = f", resumed from step {resumed}" if resumed is not None else ""
            self.log(f"  {name} seed {seed}: {status} ({_fmt(seconds)}{since})")


def _run_one(
    spec: dict, cfg: StudyConfig, out: Path, at_once: int, progress, gpu: str | None = None
) -> dict:
    """One spec in a process of its own; its result (a failed one if the process died)."""
    name, seed = spec["strategy"]["name"], spec["seed"]
    device = spec.get("paths", {}).get("device", "cpu")
    progress.begin(name, seed)
    folder = Path(spec["run_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    write_json(folder / "spec.json", spec | {"runs_at_once": at_once, "gpu": gpu})
    env = _env(cfg, out, f"{name}-seed-{seed}")
    if at_once > 1 and not cfg.threads:  # the cores shared out, not each run taking them all
        env["OMP_NUM_THREADS"] = str(spec.get("threads") or cores_each(at_once))
    if device == "cpu":  # a CPU run sees no GPU, a CUDA run its own one
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device == "cuda" and gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.perf_counter()
    try:
        code = server.run_spec(folder / "spec.json", env, cfg.reuse_process, device)
    except KeyboardInterrupt:  # Ctrl-C: stop the run (it dies with its server), record nothing
        server.close_worker(timeout=0)
        raise
    if not (folder / "result.json").is_file():  # the process died before it could say why
        write_result(folder / "result.json", {
            "status": "failed", "strategy": name, "seed": seed, "config": spec["config"],
            "strategy_spec": spec["strategy"], "error": f"worker exited with status {code}",
        })  # fmt: skip
    result = json.loads((folder / "result.json").read_text())
    progress.end(name, seed, time.perf_counter() - t0, result)
    return result


def describe_paths(paths: dict, products: dict) -> str:
    """One line: the paths `auto` resolved to here, and why."""
    from loraplace.fast.hardware import Machine

    machine = Machine.here()
    if paths["device"] != "cpu":
        attention = paths["attention"] + (
            f" ({paths['attention_why']})"
            if paths.get("attention_why") not in ("", "as set")
            else ""
        )
        quantized = f", base in {paths['quantize']}" if paths["quantize"] != "none" else ""
        return (
            f"paths on {machine.describe()}: device {paths['device']}, precision "
            f"{paths['precision']}{quantized}, attention {attention}"
        )
    why = (
        "this CPU multiplies bfloat16 natively"
        if paths["product_dtype"] == "bfloat16"
        else "no native bfloat16 here"
        if not (machine.native_bf16 and machine.bf16_products)
        else "as set"
    )
    table = products.get("decoder")
    if not paths["onednn"]:
        library = "the default BLAS"
    elif table is None:
        library = "oneDNN"
    else:
        n = sum(sum(pair) for pair in table.values())
        library = f"oneDNN for {n} of {2 * len(table)} (shape, direction) pairs, measured faster"
    return (
        f"paths on {machine.describe()}: frozen training products {paths['product_dtype']} "
        f"({why}); float32 products through {library}"
    )
