"""The Ray executor's overhead: one 6-run study (3 strategies x 2 seeds, a tiny GPT-2) run by
the local executor and by Ray on this machine, alternating, each study in a process of its own
(as `loraplace study` runs it) and a fresh output folder.

    python benchmarks/ray_overhead.py MODEL_DIR DATA.json OUT_DIR [ROUNDS [VARIANT ...]]

MODEL_DIR is a tiny model saved like a hub model (tests/tiny.py's `save_tiny_gpt2` builds
one). Prints one JSON line per study: wall time of the process, of `run_study`, of its runs
(from the "study:" line to the end, Ray's start and stop included) and each run's own figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from loraplace.config import load_config
from loraplace.study.runner import run_study

SETTINGS = {
    "train_split": "train[:8]",
    "eval_split": "train[100:104]",
    "epochs": 1,
    "strategies": ["full", "attention", "ffn"],
    "seeds": [1, 2],
}
# one thread a run everywhere: on a shared 2-core machine two threads a run made the same tiny
# run take 2 to 37 s (OpenMP waiting on busy cores), which hid everything else
SETS = ["max_length=64", "generations=1", "max_new_tokens=4", "threads=1"]
VARIANTS = {  # name: extra settings
    "local": [],  # runs forked from one server that imported the ML stack once
    "local-fresh": ["reuse_process=false"],  # each run a fresh interpreter, as on Ray
    "ray-serial": ["executor=ray", "cpus_per_run=2"],  # one run at a time, as local
    "ray-2-at-once": ["executor=ray", "cpus_per_run=1"],  # two runs at once, one thread each
}


def measure(model: str, data: str, out: Path, extra: list[str]) -> dict:
    cfg = load_config(None, SETTINGS | {"model": model, "data": data}, SETS + extra)
    marks = {}

    def log(line: str) -> None:
        marks.setdefault(line.split(":")[0], time.perf_counter())

    start = time.perf_counter()
    results = run_study(cfg, out, log=log)
    end = time.perf_counter()
    return {
        "study_s": end - start,
        "runs_s": end - marks["study"],
        "ray_ready_s": marks["ray"] - marks["study"] if "ray" in marks else None,
        "runs": [
            {
                "run": f"{r['strategy']}-{r['seed']}",
                "eval_loss": r["metrics"]["eval_loss"],
                "train_time_s": r["metrics"]["train_time_s"],
                "peak_memory_mb": r["metrics"]["peak_memory_mb"],
                "node": r.get("node", {}).get("name"),
            }
            for r in results
        ],
    }


def main(model: str, data: str, root: Path, rounds: int, names: list[str]) -> None:
    for i in range(rounds):
        for name in names:
            out = root / f"{name}-{i}"
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--one", name, model, data, str(out)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])  # Ray may print before it
            wall = time.perf_counter() - start
            print(json.dumps({"variant": name, "round": i, "process_s": wall, **found}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        name, model, data, out = sys.argv[2:6]
        print(json.dumps(measure(model, data, Path(out), VARIANTS[name])))
    else:
        rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
        main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), rounds, sys.argv[5:] or list(VARIANTS))
