"""The one contract between a study and a run: everything a run needs, decided before it starts.

    spec = RunSpec(config, strategy, seed, plan, paths, products, ..., run_dir="OUT/runs/full/seed-42")
    spec.write()                      # OUT/runs/full/seed-42/spec.json
    spec = RunSpec.read(path)         # what every executor hands a run (a fork, a process, a Ray task)
    spec.failed("worker exited with status 9")   # the result of a run that could not say why

The study (`study.prepare`) fills it: the resolved config, the strategy, the seed, the plan
(every adapted module with its rank, and the trainable count, placed on the meta device), the
paths `auto` resolved to and the product libraries measured on the machine that runs it, the
threads and the GPU it gets, and its folders. The run (`train.run`) reads it and derives none of
it again: it re-places the strategy on the loaded model only to check the plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.core.results import write_json
from loraplace.fast.hardware import Paths
from loraplace.plan.placement import AdapterPlan
from loraplace.plan.strategies import Strategy, from_dict, to_dict

SPEC = "spec.json"


@dataclass(frozen=True)
class RunSpec:
    config: StudyConfig
    strategy: Strategy
    seed: int
    plan: AdapterPlan
    paths: Paths
    run_dir: str
    products: dict  # measured library per product shape: {"decoder": ..., "head": ...}
    base_eval: str | None = None  # the study's cache of the untrained model's numbers
    threads: int | None = None  # this run's share of the cores; None: torch's own
    gpu: str | None = None  # on CUDA, the GPU it trains on (as CUDA_VISIBLE_DEVICES names it)
    runs_at_once: int | None = None  # runs beside it on its device; None: not known (Ray)

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def folder(self) -> Path:
        return Path(self.run_dir)

    def with_(self, **changes) -> RunSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "strategy": to_dict(self.strategy),
            "seed": self.seed,
            "plan": self.plan.to_dict(),
            "paths": self.paths.to_dict(),
            "run_dir": self.run_dir,
            "products": self.products,
            "base_eval": self.base_eval,
            "threads": self.threads,
            "gpu": self.gpu,
            "runs_at_once": self.runs_at_once,
        }

    @staticmethod
    def from_dict(data: dict) -> RunSpec:
        return RunSpec(
            config=StudyConfig(**data["config"]),
            strategy=from_dict(data["strategy"]),
            seed=data["seed"],
            plan=AdapterPlan.from_dict(data["plan"]),
            paths=Paths.from_dict(data["paths"]),
            run_dir=data["run_dir"],
            products=data.get("products") or {},
            base_eval=data.get("base_eval"),
            threads=data.get("threads"),
            gpu=data.get("gpu"),
            runs_at_once=data.get("runs_at_once"),
        )

    def write(self, path: Path | None = None) -> Path:
        path = Path(path) if path else self.folder / SPEC
        write_json(path, self.to_dict())
        return path

    @staticmethod
    def read(path: Path) -> RunSpec:
        return RunSpec.from_dict(json.loads(Path(path).read_text()))

    def failed(self, error: str) -> dict:
        """The result of this run where it failed: what identifies it, and why."""
        return {
            "status": "failed",
            "strategy": self.name,
            "seed": self.seed,
            "config": self.config.to_dict(),
            "strategy_spec": to_dict(self.strategy),
            "error": error,
        }
