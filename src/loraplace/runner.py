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
import re
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
from loraplace.study_display import StudyProgress
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


def prepare(cfg: StudyConfig, products: bool = True) -> Prepared:
    """Check hardware, model, strategies and data without loading weights (one sentence for
    anything wrong); resolve what `auto` takes on this machine. `products`: also measure the
    product libraries with the config's threads (a study measures them once it knows its
    runs' threads)."""
    from loraplace.data.rows import load_rows
    from loraplace.plan.budget import equalize
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
    if paths is None:
        return Prepared(strategies, None, {}, plans, shapes, base_mb)
    found = measure_products(cfg, paths, shapes, cfg.threads) if products else {}
    return Prepared(strategies, paths.to_dict(), found, plans, shapes, base_mb)


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
    return products_for(paths, *shapes, pack_rows(cfg), ROWS, threads)


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
    elif server.uses_worker(cfg.reuse_process):  # its imports overlap the checks below
        server.start_worker()
    prepared = prepare(cfg, products=False)
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
    at_once, threads = local_plan(cfg, len(todo), prepared) if cfg.executor != "ray" else (1, None)
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
    if at_once and at_once > 1 and server.uses_worker(cfg.reuse_process):
        server.start_worker(at_once)
    execute(todo, cfg, out, log, at_once)
    wanted = {(s.name, seed) for s, seed in jobs}
    return [r for r in load_results(out) if (r["strategy"], r["seed"]) in wanted]


def execute(
    todo: list[dict], cfg: StudyConfig, out: Path, log=print, at_once: int | None = 1
) -> list[dict]:
    """Run the specs in `todo` with the config's executor; their results, each also written
    to its run folder under OUT."""
    if cfg.executor == "ray" and todo:  # nothing to do: no cluster to join
        from loraplace.cluster import run_on_ray

        return run_on_ray(todo, cfg, out, log)
    return run_local(todo, cfg, out, log, at_once)


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


def local_plan(cfg: StudyConfig, runs: int, prepared: Prepared) -> tuple[int | None, int | None]:
    """(runs at once, threads each; None: torch's own) on this machine: `runs_per_device` as
    set; unset, `cpu_runs_at_once` on a CPU where `threads` is not set, else one. None runs
    at once is a GPU's `auto`: decided after its first run (`run_local`)."""
    setting, device = cfg.runs_per_device, (prepared.paths or {}).get("device", "cpu")
    if setting not in (None, "auto"):
        at_once = int(setting)
    elif device != "cpu":
        return (None if setting == "auto" else 1), None
    elif cfg.threads:
        at_once = 1
    else:
        free, need = available_mb(), run_memory_mb(prepared.base_mb)
        at_once = cpu_runs_at_once(runs, cpu_cores(), free, need)
    return at_once, (cores_each(at_once) if at_once > 1 and not cfg.threads else None)


def cores_each(at_once: int) -> int:
    """Each run's share of this machine's cores when `at_once` run together."""
    return max(1, cpu_cores() // at_once)


def run_local(
    todo: list[dict], cfg: StudyConfig, out: Path, log=print, at_once: int | None = 1
) -> list[dict]:
    """Run the specs on this machine, each in a process of its own: `at_once` at a time
    (None: the first alone, then as many as fit beside its peak memory)."""
    with StudyProgress(todo, out, log, at_once) as progress:  # the live display or plain lines
        return _run_local(todo, cfg, out, progress, at_once)


def _run_local(todo: list[dict], cfg: StudyConfig, out: Path, progress, at_once) -> list[dict]:
    results = []
    if at_once is None and todo:
        results.append(_run_one(todo[0], cfg, out, 1, progress))
        at_once = runs_that_fit(results[0], cfg)
        todo = todo[1:]
    at_once = progress.at_once = at_once or 1
    if at_once <= 1:
        return results + [_run_one(spec, cfg, out, 1, progress) for spec in todo]
    threads = todo[0].get("threads") if todo else None
    each = f", {threads} thread{'s' if threads != 1 else ''} each" if threads else ""
    progress.log(f"runs: {at_once} at a time on this device, each its own process{each}")
    with ThreadPoolExecutor(at_once) as pool:
        return results + list(pool.map(lambda s: _run_one(s, cfg, out, at_once, progress), todo))


def runs_that_fit(first: dict, cfg: StudyConfig) -> int:
    """How many runs like `first` fit on its device at once: on a GPU, its free memory over
    the first run's peak (10 % kept free), at most 8; on a CPU, whose cores one run already
    uses, one."""
    peak = (first.get("metrics") or {}).get("peak_memory_mb")
    if first.get("device") != "cuda" or not peak:
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info()
    return max(1, min(8, int(0.9 * free / 2**20 // peak)))


def _run_one(spec: dict, cfg: StudyConfig, out: Path, at_once: int, progress) -> dict:
    """One spec in a process of its own; its result (a failed one if the process died)."""
    name, seed = spec["strategy"]["name"], spec["seed"]
    progress.begin(name, seed)
    folder = Path(spec["run_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    write_json(folder / "spec.json", spec | {"runs_at_once": at_once})
    env = _env(cfg, out, f"{name}-seed-{seed}") | progress.run_env  # no Trainer bars
    if at_once > 1 and not cfg.threads:  # the cores shared out, not each run taking them all
        env["OMP_NUM_THREADS"] = str(spec.get("threads") or cores_each(at_once))
    t0 = time.perf_counter()
    try:
        code = server.run_spec(folder / "spec.json", env, cfg.reuse_process)
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
        return f"paths: device {paths['device']}, float32"
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
