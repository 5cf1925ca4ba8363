"""One training run: resolved config in, result out. Self-contained, so any process can run it.

    python -m loraplace.train.run OUT/runs/full/seed-42/spec.json   # writes result.json beside it

The run loads the model, attaches the planned adapters (checked against the plan), evaluates
the untrained model, trains with the Hugging Face Trainer, evaluates at every epoch end with the
shared token-weighted evaluation, and records curves, time, throughput and peak memory.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from loraplace import __version__
from loraplace.config import StudyConfig, run_settings
from loraplace.core import faults
from loraplace.core.results import (
    die_with_parent,
    environment,
    private_memory_mb,
    write_json,
    write_result,
)
from loraplace.data.rows import (
    Collator,
    PackedCollator,
    dataset_name,
    load_rows,
    packing_is_exact,
    prompt,
    tokenize,
)
from loraplace.fast.hardware import Paths, remembered_check
from loraplace.plan.planning import architecture
from loraplace.train import checkpoints
from loraplace.train.evaluate import (
    example_losses,
    example_means,
    greedy_generations,
    token_weighted,
)
from loraplace.train.progress import RunProgress, redirect_output
from loraplace.train.trainer import chunked_trainer, recorder, training_args


def release_freed_memory() -> bool:
    """Make glibc hand freed blocks of 1 MB or more back to the OS (a fixed mmap threshold).

    By default glibc raises that threshold to the largest block freed so far, so the activation
    buffers of later chunks come from a heap that only grows; fixed, a run's peak memory is
    lower at no cost in time. The heap is not also trimmed after each step: the freed pages
    would fault back in at every step (docs/performance.md, `release_memory`).
    False (nothing done) where the C library has no `mallopt`.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD; fixing it ends the dynamic raise


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


SERVER: int | None = None  # the process that forked this run (`serve`), if one did


def peak_memory_mb(device: str) -> float:
    """This run's peak: on CPU its process's, plus what only the server that forked it holds
    (the pages the two share are counted once, here)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # this process only: runs are isolated
    server = private_memory_mb(SERVER) if SERVER else 0.0
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10) + server


BASE_EVAL_KEYS = (
    "model",
    "data",
    "eval_split",
    "max_length",
    "loss_on",
    "trust_remote_code",
    "pack_eval",
)


def base_evaluation(
    spec: dict, cfg: StudyConfig, paths: dict, eval_set, evaluate, head: str | None
) -> list:
    """The untrained model's per-example losses: computed once per study and shared by its runs
    when `reuse_base_eval` (every run of a study evaluates the same base model on the same rows)."""
    path = spec.get("base_eval")
    if not cfg.reuse_base_eval or not path:
        return evaluate()
    tokens = hashlib.sha256(json.dumps([e.input_ids for e in eval_set]).encode()).hexdigest()
    key = {k: getattr(cfg, k) for k in BASE_EVAL_KEYS} | _base_numbers(paths)
    key |= {"tokens": tokens, "head": head}
    return [tuple(x) for x in _once_per_study(Path(path), key, "per_example", evaluate)]


def _base_numbers(paths: dict) -> dict:
    """The resolved paths that change what the untrained model computes."""
    numbers = {k: paths.get(k) for k in ("precision", "quantize", "attention") if k in paths}
    return numbers | {"device": paths["device"]}


def _once_per_study(path: Path, key: dict, field: str, compute, wait: bool = True):
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


def base_generations(
    spec: dict, cfg: StudyConfig, paths: dict, prompts: list[str], generate, wait: bool = True
):
    """The untrained model's greedy continuations of the prompts: made once per study and
    shared by its runs when `reuse_base_eval` (the same base, prompts and settings). None,
    without `wait`, while another run of the study is making them."""
    path = spec.get("base_eval")
    if not cfg.reuse_base_eval or not path or not prompts:
        return generate()
    settings = ("model", "trust_remote_code", "max_new_tokens", "max_length")
    key = {k: getattr(cfg, k) for k in settings} | _base_numbers(paths) | {"prompts": prompts}
    return _once_per_study(
        Path(path).with_name(Path(path).stem + "_generations.json"),
        key, "generations", generate, wait,
    )  # fmt: skip


class Notes(list):
    """Fast paths a run asked for and could not take here, each said once, in the log and in
    result.json."""

    def add(self, switch: str, why: str) -> None:
        self.append({"switch": switch, "why": why})
        print(f"  note: {switch} is off for this run: {why}", flush=True)


class Phases(dict):
    """Seconds spent in each named part of a run: `with phases("load"): ...`; `listener`, if
    set, hears each part begin (the run's progress file)."""

    listener = None

    @contextmanager
    def __call__(self, name: str):
        if self.listener:
            self.listener(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def run_paths(spec: dict, cfg: StudyConfig) -> dict:
    """The paths the study resolved for this run, or (a spec without them) resolved here."""
    if "paths" in spec:
        return spec["paths"]
    return cfg.resolve_paths().to_dict()


def run_products(spec: dict, cfg: StudyConfig, paths: dict, model) -> dict:
    """Which library runs each float32 product shape: the study's measurement, or made here."""
    from loraplace.fast.hardware import Paths, products_for
    from loraplace.fast.headloss import ROWS
    from loraplace.plan.roles import classify

    if "products" in spec:
        return spec["products"]
    shapes = [(m.out_features, m.in_features) for m in classify(model) if m.layer is not None]
    head = model.get_output_embeddings()
    head_shape = tuple(head.weight.shape) if isinstance(head, torch.nn.Linear) else None
    return products_for(
        Paths.from_dict(paths), shapes, head_shape, pack_rows(cfg), ROWS, cfg.threads
    )


def pack_rows(cfg: StudyConfig) -> int:
    """Tokens per packed training chunk."""
    return cfg.pack_tokens or cfg.max_length * 3 // 2


def _load(cfg: StudyConfig, paths: dict):
    """Weights (float32, or quantized as they load), tokenizer, rows and tokenized examples."""
    from loraplace.plan.models import resolve
    from loraplace.train.load import DTYPES, load_model

    device, quantize = paths["device"], paths.get("quantize", "none")
    dtype = DTYPES[paths.get("precision", "float32")] if quantize != "none" else torch.float32
    model, tokenizer = load_model(resolve(cfg.model, cfg.trust_remote_code), dtype, quantize,
                                  device, paths.get("attention"))  # fmt: skip
    if quantize == "none":
        model.to(device)
    rows = {
        "train": load_rows(cfg.data, cfg.train_split),
        "eval": load_rows(cfg.data, cfg.eval_split),
    }
    sets = {k: tokenize(v, tokenizer, cfg.max_length, cfg.loss_on) for k, v in rows.items()}
    return model, tokenizer, rows, sets


# How far a packed row's summed loss may be from its examples' own, relative, per precision.
# On CPU both agree to 1e-7 in float32 and bf16, while rows that leak across examples miss by
# 2e-3 even on tiny random models (docs/gpu.md); 16-bit GPU kernels may round a packed row
# differently, so they get 1e-3: a check that fails only turns packing off, with a note.
PACKING_TOLERANCE = {"float32": 1e-4, "bf16": 1e-3, "fp16": 1e-3}


def _batching(cfg: StudyConfig, model, tokenizer, paths: dict, notes: Notes) -> dict:
    """How training and evaluation batch their examples: packed where checked exact."""
    from loraplace.fast.segments import use_segment_attention

    device, form = paths["device"], Paths.from_dict(paths).packed_rows
    pad_to = cfg.max_length if cfg.pad_to == "max_length" else None
    wanted = cfg.packing and cfg.fuse_accumulation and pad_to is None
    tolerance = PACKING_TOLERANCE[paths.get("precision", "float32")]
    exact = (wanted or cfg.pack_eval) and remembered_check(
        "packing", model, device, packing_is_exact, tolerance, False, form
    )
    packed = wanted and exact
    if wanted and not exact:
        notes.add("packing", "packed rows did not give each example its own loss on this model")
    # segment attention is one of our CPU functions: with the library's rows it is off, as they are
    segments, wants_segments = False, packed and cfg.segment_attention and form == "mask"
    if wants_segments and paths.get("attention", "sdpa") != "sdpa":
        notes.add("segment_attention", f"it replaces SDPA, and attention is {paths['attention']}")
    elif wants_segments:
        segments = use_segment_attention(model)
        if not segments:
            notes.add("segment_attention", "the model does not run SDPA attention")
        elif not remembered_check("segments", model, device, packing_is_exact, 1e-4, True):
            model.set_attn_implementation("sdpa")
            segments = False
            notes.add("segment_attention", "attention per example was not exact on this model")
    collate = Collator(tokenizer.pad_token_id, pad_to)
    if packed:
        collate = PackedCollator(pack_rows(cfg), segments, form)
    eval_packed = cfg.pack_eval and exact
    if cfg.pack_eval and not exact:
        notes.add("pack_eval", "packed rows did not give each example its own loss on this model")
    eval_collate = Collator(tokenizer.pad_token_id)  # both paths: the same evaluation
    if eval_packed:  # no padding; rows of up to eval_batch_size x max_length tokens, as padded
        eval_collate = PackedCollator(cfg.eval_batch_size * cfg.max_length, segments, form)
    return {"packed": packed, "segments": segments, "collate": collate,
            "eval_packed": eval_packed, "eval_collate": eval_collate}  # fmt: skip


def _head(model, device: str, paths: dict, products: dict, notes: Notes) -> dict:
    """Whether the head-and-loss functions give this model's loss, with the default BLAS and
    with the head's chosen libraries: checked once, here, for training and evaluation."""
    from loraplace.fast.headloss import head_loss_matches

    if not paths.get("cpu_kernels", True):  # a float32 CPU function: not for this base
        return {"blocks": False, "onednn": (False, False)}
    pair = tuple(products.get("head", (paths["onednn_head"],) * 2))
    blocks = remembered_check("head", model, device, head_loss_matches, 1e-4, (False, False))
    if any(pair) and not (
        blocks and remembered_check("head", model, device, head_loss_matches, 1e-4, pair)
    ):
        if blocks:
            notes.add("onednn_head", "the head's products through oneDNN were not exact here")
        pair = (False, False)
    return {"blocks": blocks, "onednn": pair}


def _in_precision(model, paths: dict):
    """The base in the run's precision (adapters, attached later, stay float32); a quantized
    base made ready for training as QLoRA does (norms and head in float32, all frozen)."""
    from loraplace.train.load import DTYPES

    if paths.get("quantize", "none") != "none":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if paths.get("precision", "float32") != "float32":
        model.to(DTYPES[paths["precision"]])
    return model


@dataclasses.dataclass
class Run:
    """What every step of one run reads: its config, where it runs, and what it has noted."""

    spec: dict
    cfg: StudyConfig
    strategy: object
    seed: int
    run_dir: Path
    injected: dict  # the fault suite's faults for this run, else empty
    paths: dict
    phases: Phases = dataclasses.field(default_factory=Phases)
    notes: Notes = dataclasses.field(default_factory=Notes)
    timing: dict = dataclasses.field(
        default_factory=lambda: {"eval_s": 0.0, "checkpoint_s": 0.0, "checkpoints": 0}
    )
    released: bool = False  # freed memory goes back to the OS (release_memory)
    progress: RunProgress | None = None  # progress.json in the run's folder

    @property
    def device(self) -> str:
        return self.paths["device"]


def train_run(spec: dict) -> dict:
    """Run one (strategy, seed) and return its result; raises on failure."""
    run = _start(spec)
    cfg = run.cfg
    with run.phases("load"):
        model, tokenizer, rows, sets = _load(cfg, run.paths)
    with run.phases("checks"):  # our CPU functions' checks on float32 weights; packing's on
        products = run_products(spec, cfg, run.paths, model)  # the weights it will train
        head = _head(model, run.device, run.paths, products, run.notes)
        model = _in_precision(model, run.paths)
        batching = _batching(cfg, model, tokenizer, run.paths, run.notes)
    eval_head = _eval_head(batching, head)
    evaluate = _evaluator(run, model, sets["eval"], batching["eval_collate"], eval_head)
    evaluate = run.progress.evaluating(evaluate)  # an epoch's evaluation shows as such
    with run.phases("base_eval"):
        base = base_evaluation(spec, cfg, run.paths, sets["eval"], evaluate, eval_head)
    placement = planned_placement(spec, model, cfg)
    arch = architecture(model, placement)  # before wrapping: for the benchmark's FLOP count
    with run.phases("attach"):
        model, taken = _adapt(run, model, placement, products, batching["packed"], head)
    prompts = [prompt(r) for r in rows["eval"][: cfg.generations]]

    def untrained() -> list[str]:
        with model.disable_adapter():
            return _generations(run, model, tokenizer, prompts)

    # where another run is making them, they are read after training instead of waited for
    base_texts = base_generations(spec, cfg, run.paths, prompts, untrained, wait=False)
    trainer, resume, curves = _trainer(run, model, sets["train"], batching, taken, evaluate)
    train_time_s = _train(run, trainer, resume)
    if base_texts is None:
        base_texts = base_generations(spec, cfg, run.paths, prompts, untrained)
    per_example = curves.pop("last_eval") or evaluate()
    eval_loss = token_weighted(per_example)
    if not math.isfinite(eval_loss):
        raise FloatingPointError(f"eval loss is {eval_loss}")
    with run.phases("save"):
        checkpoints.write_dir_atomically(
            run.run_dir / "adapter",
            lambda d: model.save_pretrained(str(d), safe_serialization=True),
        )
    generations = _generations(run, model, tokenizer, prompts)
    trained_tokens = sum(len(e.input_ids) for e in sets["train"]) * cfg.epochs
    return {
        "metrics": {
            "eval_loss": eval_loss,
            "perplexity": math.exp(eval_loss),
            "base_eval_loss": token_weighted(base),
            "trainable_params": placement.trainable_params,
            "train_time_s": train_time_s,
            "peak_memory_mb": peak_memory_mb(run.device),
            "tokens_per_s": trained_tokens / train_time_s,
            "optimizer_steps": trainer.state.global_step,
            "checkpoints": run.timing["checkpoints"],
            "checkpoint_s": run.timing["checkpoint_s"],
        },
        "resumed_from_step": resume.step if resume else None,
        **_losses(per_example, base),
        "curves": curves,
        "placement": _placement_record(placement),
        "generations": [
            {"prompt": p, "base": b, "adapted": g}
            for p, b, g in zip(prompts, base_texts, generations, strict=True)
        ],
        "data": _data_record(cfg, rows, per_example),
        **_paths_taken(run, products, batching, taken, eval_head),
        "architecture": arch,
    }


def _losses(per_example: list, base: list) -> dict:
    """Per-example losses after training (sums and token counts, for paired statistics) and
    of the untrained model."""
    return {
        "per_example": {
            "loss_sum": [s for s, _ in per_example],
            "tokens": [n for _, n in per_example],
            "loss": example_means(per_example),
        },
        "base_per_example": {"loss": example_means(base)},
    }


def _data_record(cfg: StudyConfig, rows: dict, per_example: list) -> dict:
    return {
        "name": dataset_name(cfg.data),
        "train_rows": len(rows["train"]),
        "eval_rows": len(rows["eval"]),
        "eval_target_tokens": sum(n for _, n in per_example),
    }


def _start(spec: dict) -> Run:
    """The run's config (with any injected learning rate), resolved paths, threads and seeds."""
    from loraplace.plan.strategies import from_dict

    cfg = StudyConfig(**spec["config"])
    strategy, seed = from_dict(spec["strategy"]), spec["seed"]
    injected = faults.for_run(strategy.name, seed)
    if "lr" in injected:
        cfg = dataclasses.replace(cfg, lr=float(injected["lr"]))
    run = Run(spec, cfg, strategy, seed, Path(spec["run_dir"]), injected, run_paths(spec, cfg))
    run.progress = RunProgress.for_spec(spec)
    run.phases.listener = run.progress.on_phase
    threads = cfg.threads or spec.get("threads")  # the study's share of the cores, if any
    if threads:
        torch.set_num_threads(threads)
    run.released = cfg.release_memory and release_freed_memory()
    seed_everything(seed)
    return run


def _eval_head(batching: dict, head: dict) -> str | None:
    """How evaluation computes the head's loss: in blocks (through oneDNN where chosen), no
    whole logits, wherever evaluation is packed; the same for every run of a study."""
    if batching["eval_packed"] and head["blocks"]:
        return "onednn" if head["onednn"][0] else "blocks"
    return None


def _evaluator(run: Run, model, eval_set, collate, head: str | None):
    """evaluate() -> per-example (loss sum, tokens); its time is counted apart from training."""

    def evaluate():
        start = time.perf_counter()
        try:
            with autocast(run.paths):  # evaluation computes in the precision training does
                return example_losses(model, eval_set, collate, run.cfg.eval_batch_size,
                                      run.device, head)  # fmt: skip
        finally:
            run.timing["eval_s"] += time.perf_counter() - start

    return evaluate


def autocast(paths: dict):
    """torch's autocast in the run's precision; nothing in float32."""
    from contextlib import nullcontext

    from loraplace.train.load import DTYPES

    precision = paths.get("precision", "float32")
    if precision == "float32":
        return nullcontext()
    return torch.autocast(paths["device"], dtype=DTYPES[precision])


def planned_placement(spec: dict, model, cfg: StudyConfig):
    """The placement on the loaded model, which must be the study's plan: the same modules
    with the same ranks and trainable count (a spec without a plan is placed here)."""
    from loraplace.plan.placement import place
    from loraplace.plan.roles import classify
    from loraplace.plan.strategies import from_dict

    placement = place(classify(model), from_dict(spec["strategy"]), cfg.rank, cfg.bias)
    plan = spec.get("plan")
    if plan and (
        plan["ranks"] != placement.ranks or plan["trainable_params"] != placement.trainable_params
    ):
        extra = sorted(set(placement.ranks) - set(plan["ranks"]))[:3]
        missing = sorted(set(plan["ranks"]) - set(placement.ranks))[:3]
        raise RuntimeError(
            f"the loaded model does not place {spec['strategy']['name']!r} as planned: "
            f"{placement.trainable_params:,} trainable parameters against the plan's "
            f"{plan['trainable_params']:,} (extra {extra}, missing {missing})"
        )
    return placement


def _adapt(run: Run, model, placement, products: dict, packed: bool, head: dict):
    """Attach exactly the planned adapters, then the fused functions that hold on this model."""
    from loraplace.fast.headloss import head_is_frozen
    from loraplace.fast.kernels import accelerate
    from loraplace.plan.adapters import attach

    cfg, notes, cpu = run.cfg, run.notes, run.paths.get("cpu_kernels", True)
    model = attach(model, placement, cfg.alpha, cfg.dropout, cfg.bias)
    bf16 = run.paths["product_dtype"] == "bfloat16"
    taken = accelerate(model, cfg.fused_lora and cpu, run.paths["onednn"], cfg.fused_mlp and cpu,
                       bf16, products.get("decoder"))  # fmt: skip
    if cfg.fused_lora and placement.modules and cpu and not taken["fused_lora"]:
        notes.add("fused_lora", "no adapted layer is one the fused function reproduces exactly")
    if bf16 and not taken["bf16_products"]:
        notes.add("product_dtype", "no frozen float32 product to run in bfloat16")
    fused_head = packed and cfg.fused_head_loss and head["blocks"] and head_is_frozen(model)
    if packed and cfg.fused_head_loss and cpu and not fused_head:
        notes.add("fused_head_loss", "the model's own loss differs from the blocked head loss")
    taken["fused_head"] = bool(fused_head)
    taken["head_libraries"] = head["onednn"] if fused_head else (False, False)
    return model, taken


def _generations(run: Run, model, tokenizer, prompts: list[str]) -> list[str]:
    if not prompts:
        return []
    with run.phases("generations"), autocast(run.paths):
        return greedy_generations(
            model, tokenizer, prompts, run.cfg.max_new_tokens, run.device, run.cfg.max_length
        )


def _trainer(run: Run, model, train_set, batching: dict, taken: dict, evaluate):
    """The Trainer, its callbacks (curves, checkpoints, injected faults) and the checkpoint it
    resumes from, if any."""
    from transformers import PrinterCallback, Trainer

    cfg = run.cfg
    curves: dict = {"train": [], "eval": [], "last_eval": None}
    key = checkpoints.run_key(
        run_settings(cfg.to_dict()), run.spec["strategy"], run.seed,
        [e.input_ids for e in train_set],
    )  # fmt: skip
    resume = checkpoints.latest(run.run_dir, key)
    run.timing["before_s"] = 0.0  # training time before the checkpoint resumed from
    if resume:
        curves.update(resume.manifest["curves"])
        run.timing["before_s"] = resume.manifest["train_s"]
    packed = batching["packed"]
    cls = chunked_trainer(taken["fused_head"], taken["head_libraries"]) if packed else Trainer
    trainer = cls(
        model=model,
        args=training_args(cfg, run.run_dir, run.seed, run.strategy.name, run.paths),
        train_dataset=train_set,
        data_collator=batching["collate"],
        callbacks=[
            recorder(evaluate, curves, cfg.eval_every_epoch),
            run.progress.callback(sum(len(e.input_ids) for e in train_set)),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # the study prints its own progress lines
    every_s = cfg.checkpoint_minutes * 60 if cfg.checkpoint_minutes else None
    if cfg.checkpoint_every or every_s:
        trainer.add_callback(checkpoints.checkpointer(
            trainer, run.run_dir, key, cfg.checkpoint_every, every_s, curves, run.timing,
            lambda: _train_s(run),
        ))  # fmt: skip
    injector = faults.callback(run.injected)
    if injector:
        trainer.add_callback(injector)
    return trainer, resume, curves


def _train_s(run: Run) -> float:
    """Training time so far: wall time since the start, less evaluations and checkpoints."""
    t = run.timing
    evals = t["eval_s"] - t["eval_before"]
    return t["before_s"] + time.perf_counter() - t["start"] - evals - t["checkpoint_s"]


def _train(run: Run, trainer, resume) -> float:
    """Train (from the checkpoint, if resuming); the training time in seconds."""
    if resume:
        print(f"  resumed from step {resume.step} ({resume.path})", flush=True)
    if run.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run.timing["eval_before"] = run.timing["eval_s"]  # the base evaluation is not training
    run.timing["start"] = time.perf_counter()
    with run.phases("train"):
        trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    run.phases["epoch_evals"] = run.timing["eval_s"] - run.timing["eval_before"]
    return _train_s(run)


def _paths_taken(run: Run, products: dict, batching: dict, taken: dict, eval_head) -> dict:
    """Which paths this run took, for result.json: resolved, never `auto`."""
    return {
        "device": run.device,
        "paths": run.paths,
        "products": products,
        "fallbacks": list(run.notes),
        "phases_s": dict(run.phases),
        "packed": batching["packed"],
        "segment_attention": batching["segments"],
        "fused_head_loss": taken["fused_head"],
        "fused_mlp": taken["fused_mlp"] > 0,
        "onednn_head": list(taken["head_libraries"]),
        "product_dtype": "bfloat16" if taken["bf16_products"] else "float32",
        "packed_eval": batching["eval_packed"],
        "eval_head": eval_head,
        "release_memory": run.released,
        "threads": torch.get_num_threads(),
        "runs_at_once": run.spec.get("runs_at_once"),  # None: not said (a Ray task)
    }


def _placement_record(placement) -> dict:
    return {
        "modules": placement.paths,
        "ranks": placement.ranks,
        "map": [[m.path, m.layer, m.role, placement.ranks[m.path]] for m in placement.modules],
        "layers": placement.layers,
        "literal": placement.literal,
        "trainable_by_role": placement.trainable_by_role,
        "trainable_by_layer": {str(k): v for k, v in sorted(placement.trainable_by_layer.items())},
    }


def run_spec_file(spec_path: Path) -> int:
    """Run the spec and write result.json atomically, status ok or failed with its reason."""
    spec = json.loads(spec_path.read_text())
    redirect_output(spec_path.parent)  # where the study draws a live display
    result = {
        "status": "failed",
        "process": os.getpid(),
        "parent_process": os.getppid(),  # the study, or the server that forked this run
        "strategy": spec["strategy"]["name"],
        "seed": spec["seed"],
        "config": spec["config"],
        "strategy_spec": spec["strategy"],
        "loraplace_version": __version__,
        **environment(),
        "timing": {"started": time.time()},  # wall clock: runs at once overlap in these
    }
    try:
        faults.limit_file_size(faults.for_run(spec["strategy"]["name"], spec["seed"]))
        result.update(train_run(spec))
        result["status"] = "ok"
    except (FloatingPointError, MemoryError, torch.OutOfMemoryError) as err:
        result["error"] = f"{type(err).__name__}: {err}"
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
        if err.errno not in DISK_FULL:
            result["traceback"] = traceback.format_exc()
    except Exception as err:  # recorded so the study goes on; the traceback is kept for bugs
        result["error"] = f"{type(err).__name__}: {err}"
        if memory_exhausted():  # a library that reports a failed allocation in its own words
            result["error"] = f"out of memory ({result['error']})"
        else:
            result["traceback"] = traceback.format_exc()
    result["timing"]["finished"] = time.time()
    write_result(spec_path.parent / "result.json", result)
    if result["status"] == "ok" and not spec["config"].get("keep_checkpoints"):
        checkpoints.clear(spec_path.parent)
    return 0 if result["status"] == "ok" else 1


def memory_exhausted(headroom_mb: int = 256) -> bool:
    """Whether this process is out of memory now: within `headroom_mb` of its address-space
    limit where it has one, else unable to get that much more. Libraries report a failed
    allocation in their own words (oneDNN: "could not create a primitive")."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * resource.getpagesize()
            return soft - used < headroom_mb * 2**20
        except (OSError, ValueError):
            pass
    try:
        bytearray(headroom_mb * 2**20)
    except MemoryError:
        return True
    return False


# A write that failed for want of room (a full disk or quota, or a file-size limit): the run's
# reason, not a bug
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _quiet() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    _quiet()
    die_with_parent()
    try:
        sys.exit(run_spec_file(Path(sys.argv[1])))
    except KeyboardInterrupt:  # Ctrl-C: the study says what to do; nothing was recorded
        sys.exit(130)
