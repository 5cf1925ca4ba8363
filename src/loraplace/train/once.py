"""What the untrained model gives, computed once per study and shared by its runs.

    base = base_evaluation(spec, eval_set, evaluate, head)     # per-example (loss sum, tokens)
    texts = base_generations(spec, prompts, generate)           # greedy continuations

Every run of a study evaluates the same base model on the same rows: the first run computes,
the others read the file beside the study's results (its key names what the numbers depend
on; a file with another key is computed again). Runs going at once take turns on a lock.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraplace.core.results import write_json
from loraplace.fast.hardware import Paths
from loraplace.study.spec import RunSpec

BASE_EVAL_KEYS = (
    "model",
    "data",
    "eval_split",
    "max_length",
    "loss_on",
    "data_format",
    "chat_template",
    "trust_remote_code",
    "pack_eval",
)


def base_evaluation(spec: RunSpec, eval_set, evaluate, head: str | None) -> list:
    """The untrained model's per-example losses: computed once per study and shared by its runs
    when `reuse_base_eval` (every run of a study evaluates the same base model on the same rows)."""
    cfg, paths, path = spec.config, spec.paths, spec.base_eval
    if not cfg.reuse_base_eval or not path:
        return evaluate()
    tokens = hashlib.sha256(json.dumps([e.input_ids for e in eval_set]).encode()).hexdigest()
    key = {k: getattr(cfg, k) for k in BASE_EVAL_KEYS} | base_numbers(paths)
    key |= {"tokens": tokens, "head": head}
    return [tuple(x) for x in once_per_study(Path(path), key, "per_example", evaluate)]


def base_numbers(paths: Paths) -> dict:
    """The resolved paths that change what the untrained model computes."""
    return {"precision": paths.precision, "quantize": paths.quantize,
            "attention": paths.attention, "device": paths.device}  # fmt: skip


def once_per_study(path: Path, key: dict, field: str, compute, wait: bool = True):
    """compute(), or what a run of the study before this one stored at `path` under the same
    `key` (a file with another key, or none, is computed again and replaced).

    Runs going at once take turns on a lock beside the file, so one computes and the others
    read: `wait` False returns None at once where another run holds it (the caller asks again
    later, with `wait`)."""
    import fcntl

    cached = _cached(path, key, field)
    if cached is not None:
        return cached
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        cached = _cached(path, key, field)  # made by the run that held the lock
        if cached is not None:
            return cached
        value = compute()
        write_json(path, {"key": key, field: value})
        return value  # the lock goes with the file's closing


def _cached(path: Path, key: dict, field: str):
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached[field]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def base_generations(spec: RunSpec, prompts: list[str], generate, wait: bool = True):
    """The untrained model's greedy continuations of the prompts: made once per study and
    shared by its runs when `reuse_base_eval` (the same base, prompts and settings). None,
    without `wait`, while another run of the study is making them."""
    cfg, paths, path = spec.config, spec.paths, spec.base_eval
    if not cfg.reuse_base_eval or not path or not prompts:
        return generate()
    settings = ("model", "trust_remote_code", "max_new_tokens", "max_length")
    key = {k: getattr(cfg, k) for k in settings} | base_numbers(paths) | {"prompts": prompts}
    return once_per_study(
        Path(path).with_name(Path(path).stem + "_generations.json"),
        key, "generations", generate, wait,
    )  # fmt: skip
