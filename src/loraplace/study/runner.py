"""`loraplace study`: every (strategy, seed) run, outside this process, results never lost.

    loraplace study --config configs/offline.yaml --out runs/offline

The flow: config -> `prepare` (plan every strategy on the meta device, resolve the paths, one
sentence for anything wrong, before anything is written) -> a `RunSpec` per run
(OUT/runs/S/seed-N/spec.json; OUT/study.json lists them) -> the executor runs each spec in a
process of its own (`local`: here; `ray`: a cluster's nodes) -> result.json -> the report.
Finished runs with the same settings are skipped on a second call; unfinished or failed ones
are run again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from loraplace.config import StudyConfig, idle_fast_paths, run_settings
from loraplace.core.lock import acquire
from loraplace.core.results import damaged_results, load_results, write_json, write_text
from loraplace.fast.hardware import Paths
from loraplace.plan.strategies import to_dict
from loraplace.study import worker
from loraplace.study.local import Schedule, likely_device, local_plan, run_local
from loraplace.study.prepare import (
    check_writable,
    describe_paths,
    measure_products,
    prepare,
    run_specs,
)
from loraplace.study.spec import RunSpec

STUDY = "study.json"


def is_done(result: dict | None, spec: RunSpec) -> bool:
    """Whether `result` is this spec's run, finished, with the same settings and numbers."""
    return (
        result is not None
        and result.get("status") == "ok"
        and run_settings(result.get("config", {})) == run_settings(spec.config.to_dict())
        and result.get("strategy_spec") == to_dict(spec.strategy)
        and (
            spec.paths is None  # resolved by each cluster node
            or Paths.numbers(result.get("paths") or {}) == Paths.numbers(spec.paths.to_dict())
        )
    )


def run_study(
    cfg: StudyConfig, out: Path, log=print, lr_by_strategy: dict[str, float] | None = None
) -> list[dict]:
    """Run every missing (strategy, seed); return all results found under OUT.
    `lr_by_strategy`: a strategy's own learning rate (an lr sweep's picks), else the config's.
    A config's `lr_sweep` is `study.sweep.run_sweep_study`'s, which runs this three times."""
    out = Path(out)
    if cfg.executor == "ray":  # before anything is written: is Ray installed?
        from loraplace.study.ray import require_ray

        require_ray()
    elif worker.uses_worker(cfg.reuse_process, likely_device(cfg)):  # imports overlap checks
        worker.start_worker()
    prepared = prepare(cfg, products=False)
    if not worker.uses_worker(cfg.reuse_process, prepared.device):
        worker.close_worker(timeout=0)  # started for a CPU study that runs elsewhere
    check_writable(out)
    acquire(out, "study", log)  # until the CLI lets go (lock.release) or this process ends
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    existing = {(r["strategy"], r["seed"]): r for r in load_results(out)}
    for path, why in damaged_results(out):
        run = f"{path.parent.parent.name} {path.parent.name.replace('-', ' ')}"
        log(f"{run}: result.json {why}; running it again")
    specs = run_specs(cfg, prepared, out)
    if lr_by_strategy:
        specs = [s.with_(config=replace(cfg, lr=lr_by_strategy.get(s.name, cfg.lr))) for s in specs]
    write_json(out / STUDY, study_record(cfg, specs, out))
    todo = [s for s in specs if not is_done(existing.get((s.name, s.seed)), s)]
    log(
        f"study: {len(specs)} runs ({len(prepared.strategies)} strategies x {len(cfg.seeds)} "
        f"seeds), {len(specs) - len(todo)} already done"
    )
    schedule = local_plan(cfg, len(todo), prepared) if cfg.executor != "ray" else Schedule(1)
    if prepared.paths:  # timed with the threads each run will have
        prepared.products = measure_products(
            cfg, prepared.paths, prepared.shapes, schedule.threads or cfg.threads
        )
        log(describe_paths(prepared.paths, prepared.products))
    todo = [s.with_(products=prepared.products, threads=schedule.threads) for s in todo]
    for line in idle_fast_paths(cfg):
        log(f"note: {line}")
    if schedule.at_once > 1 and worker.uses_worker(cfg.reuse_process, prepared.device):
        worker.start_worker(schedule.at_once)
    execute(todo, cfg, out, log, schedule, prepared.gpu_run)
    wanted = {(s.name, s.seed) for s in specs}
    return [r for r in load_results(out) if (r["strategy"], r["seed"]) in wanted]


def study_record(cfg: StudyConfig, specs: list[RunSpec], out: Path) -> dict:
    """OUT/study.json: the study's runs in order, for the report and `loraplace status`."""
    names = list(dict.fromkeys(s.name for s in specs))
    return {
        "strategies": names,
        "seeds": list(cfg.seeds),
        "lr": {s.name: s.config.lr for s in specs},
        "reference": cfg.reference,
        "compare": cfg.compare,
        "runs": [
            {"strategy": s.name, "seed": s.seed, "run_dir": str(Path(s.run_dir).relative_to(out))}
            for s in specs
        ],
    }


def execute(
    todo: list[RunSpec], cfg: StudyConfig, out: Path, log=print,
    schedule: Schedule | None = None, gpu_run=None,
) -> list[dict]:  # fmt: skip
    """Run the specs in `todo` with the config's executor; their results, each also written
    to its run folder under OUT."""
    if cfg.executor == "ray" and todo:  # nothing to do: no cluster to join
        from loraplace.study.ray import run_on_ray

        return run_on_ray(todo, cfg, out, log, gpu_run)
    return run_local(todo, cfg, out, log, schedule or Schedule(1))
