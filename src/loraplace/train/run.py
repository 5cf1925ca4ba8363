"""One training run: resolved config in, result out. Self-contained, so any process can run it.

    python -m loraplace.train.run OUT/runs/full/seed-42/spec.json   # writes result.json beside it

The run reads its `RunSpec` (study.spec) and derives none of it again: it loads the model in
the spec's precision, checks the plan against the loaded model, evaluates the untrained model
(once per study: train.once), attaches the planned adapters at their planned ranks, trains
with the Hugging Face Trainer, evaluates at every epoch end with the shared token-weighted
evaluation, and records curves, time, throughput and peak memory.
"""

from __future__ import annotations

import dataclasses
import errno
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
from loraplace.core.results import die_with_parent, environment, private_memory_mb, write_result
from loraplace.data.chat import use_chat_template
from loraplace.data.rows import (
    dataset_name,
    generation_prompt,
    load_rows,
    reference,
    tokenize,
)
from loraplace.fast.hardware import Paths
from loraplace.plan.planning import architecture
from loraplace.plan.strategies import to_dict
from loraplace.study.spec import RunSpec
from loraplace.train import checkpoints
from loraplace.train.evaluate import (
    example_losses,
    example_means,
    greedy_generations,
    token_weighted,
)
from loraplace.train.fastpaths import Notes, adapt, batching, check_head, eval_head
from loraplace.train.once import base_evaluation, base_generations
from loraplace.train.progress import RunProgress, redirect_output
from loraplace.train.trainer import chunked_trainer, recorder, training_args


def release_freed_memory() -> bool:
    """Make glibc hand freed blocks of 1 MB or more back to the OS (a fixed mmap threshold).

    By default glibc raises that threshold to the largest block freed so far, so the activation
    buffers of later chunks come from a heap that only grows; fixed, a run's peak memory is
    lower at no cost in time. The heap is not also trimmed after each step: the freed pages
    would fault back in at every step (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `release_memory`).
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


def _load(cfg: StudyConfig, paths: Paths):
    """Weights (float32, or quantized as they load), tokenizer, rows and tokenized examples."""
    from loraplace.plan.models import resolve_model
    from loraplace.train.load import DTYPES, load_model

    # in the run's precision from the start: a GPU never holds 4 bytes a weight of a bf16 run
    model, tokenizer = load_model(resolve_model(cfg.model, cfg.trust_remote_code),
                                  DTYPES[paths.precision], paths.quantize, paths.device,
                                  paths.attention)  # fmt: skip
    use_chat_template(tokenizer, cfg.chat_template)
    rows = {
        "train": load_rows(cfg.data, cfg.train_split, cfg.data_format),
        "eval": load_rows(cfg.data, cfg.eval_split, cfg.data_format),
    }
    sets = {k: tokenize(v, tokenizer, cfg.max_length, cfg.loss_on) for k, v in rows.items()}
    every = tokenize(rows["eval"], tokenizer, cfg.max_length, "all")
    if any(a.labels != b.labels for a, b in zip(every, sets["eval"], strict=True)):
        sets["eval_all"] = every  # the seed's all-token loss, reported beside the response's
    return model, tokenizer, rows, sets


def _in_precision(model, paths: Paths):
    """A quantized base made ready for training as QLoRA does (norms and head in float32, all
    frozen); any other base already loaded in the run's precision (adapters stay float32)."""
    if paths.quantize != "none":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


@dataclasses.dataclass
class Run:
    """What every step of one run reads: its config, where it runs, and what it has noted."""

    spec: RunSpec
    cfg: StudyConfig  # the spec's, with any injected learning rate
    injected: dict  # the fault suite's faults for this run, else empty
    phases: Phases = dataclasses.field(default_factory=Phases)
    notes: Notes = dataclasses.field(default_factory=Notes)
    timing: dict = dataclasses.field(
        default_factory=lambda: {"eval_s": 0.0, "checkpoint_s": 0.0, "checkpoints": 0}
    )
    released: bool = False  # freed memory goes back to the OS (release_memory)
    progress: RunProgress | None = None  # progress.json in the run's folder

    @property
    def paths(self) -> Paths:
        return self.spec.paths

    @property
    def device(self) -> str:
        return self.spec.paths.device

    @property
    def run_dir(self) -> Path:
        return self.spec.folder


def train_run(spec: RunSpec) -> dict:
    """Run one (strategy, seed) and return its result; raises on failure."""
    run = _start(spec)
    cfg, products = run.cfg, spec.products
    with run.phases("load"):
        model, tokenizer, rows, sets = _load(cfg, run.paths)
    with run.phases("checks"):  # our CPU functions' checks on float32 weights; packing's on
        head = check_head(model, run.device, run.paths, products, run.notes)  # weights it trains
        model = _in_precision(model, run.paths)
        batches = batching(cfg, model, tokenizer, run.paths, run.notes)
    head_loss = eval_head(batches, head)
    evaluate = _evaluator(run, model, sets["eval"], batches["eval_collate"], head_loss)
    evaluate = run.progress.evaluating(evaluate)  # an epoch's evaluation shows as such
    with run.phases("base_eval"):
        base = base_evaluation(spec, sets["eval"], evaluate, head_loss)
    check_plan(spec, model)
    arch = architecture(model, spec.plan.ranks)  # before wrapping: for the bench's FLOP count
    with run.phases("attach"):
        model, taken = adapt(model, spec.plan, cfg, run.paths, run.notes, products,
                             batches["packed"], head)  # fmt: skip
    # conversations: rendered by the chat template up to their last assistant turn
    asked = [r for r in rows["eval"] if generation_prompt(r, tokenizer)]
    answerable = asked if cfg.task_metrics else asked[: cfg.generations]
    prompts = [generation_prompt(r, tokenizer) for r in answerable]
    shown = prompts[: cfg.generations]

    def untrained() -> list[str]:
        with model.disable_adapter():
            return _generations(run, model, tokenizer, shown)

    # where another run is making them, they are read after training instead of waited for
    base_texts = base_generations(spec, shown, untrained, wait=False)
    trainer, resume, curves = _trainer(run, model, sets["train"], batches, taken, evaluate)
    train_time_s = _train(run, trainer, resume)
    if base_texts is None:
        base_texts = base_generations(spec, shown, untrained)
    per_example = curves.pop("last_eval") or evaluate()
    all_tokens = per_example  # the seed's all-token loss: the same, or one more pass
    if "eval_all" in sets:
        all_tokens = _evaluator(run, model, sets["eval_all"], batches["eval_collate"], head_loss)()
    eval_loss = token_weighted(per_example)
    if not math.isfinite(eval_loss):
        raise FloatingPointError(f"eval loss is {eval_loss}")
    with run.phases("save"):
        checkpoints.write_dir_atomically(
            run.run_dir / "adapter",
            lambda d: model.save_pretrained(str(d), safe_serialization=True),
        )
    answers = _generations(run, model, tokenizer, prompts, "task" if cfg.task_metrics else None)
    trained_tokens = sum(len(e.input_ids) for e in sets["train"]) * cfg.epochs
    return {
        "metrics": {
            "eval_loss": eval_loss,
            "perplexity": math.exp(eval_loss),
            "base_eval_loss": token_weighted(base),
            "trainable_params": spec.plan.trainable_params,
            "train_time_s": train_time_s,
            "peak_memory_mb": peak_memory_mb(run.device),
            "tokens_per_s": trained_tokens / train_time_s,
            "optimizer_steps": trainer.state.global_step,
            "checkpoints": run.timing["checkpoints"],
            "checkpoint_s": run.timing["checkpoint_s"],
        },
        "resumed_from_step": resume.step if resume else None,
        **_losses(per_example, base, all_tokens),
        "task": _task_scores(cfg, rows["eval"], asked, answers),
        "curves": curves,
        "placement": spec.plan.record,
        "generations": [
            {"prompt": p, "reference": reference(r), "base": b, "adapted": g}
            for p, r, b, g in zip(shown, asked, base_texts, answers, strict=False)
        ],
        "data": _data_record(cfg, rows, per_example),
        **_paths_taken(run, products, batches, taken, head_loss),
        "architecture": arch,
    }


def _losses(per_example: list, base: list, all_tokens: list) -> dict:
    """Per-example losses after training (sums and token counts, for paired statistics) and
    of the untrained model; the all-token loss (the seed's) beside a response-only one."""
    return {
        "per_example": {
            "loss_sum": [s for s, _ in per_example],
            "tokens": [n for _, n in per_example],
            "loss": example_means(per_example),
            "all_tokens_loss_sum": [s for s, _ in all_tokens],
            "all_tokens": [n for _, n in all_tokens],
        },
        "base_per_example": {"loss": example_means(base)},
    }


def _task_scores(cfg: StudyConfig, eval_rows, asked: list, answers: list[str]) -> dict:
    """{metric: [score per evaluation example]} (NaN for a row with no prompt or reference);
    {} without task metrics."""
    from loraplace.train.task import score

    if not cfg.task_metrics:
        return {}
    by_row = {id(r): a for r, a in zip(asked, answers, strict=True)}
    found = [by_row.get(id(r)) for r in eval_rows]
    refs = [reference(r) if a is not None else None for r, a in zip(eval_rows, found, strict=True)]
    return score([a or "" for a in found], refs, tuple(cfg.task_metrics))


def _data_record(cfg: StudyConfig, rows: dict, per_example: list) -> dict:
    return {
        "name": dataset_name(cfg.data),
        "format": getattr(rows["train"], "format", "alpaca"),
        "train_rows": len(rows["train"]),
        "eval_rows": len(rows["eval"]),
        "eval_target_tokens": sum(n for _, n in per_example),
    }


def _start(spec: RunSpec) -> Run:
    """The run's config (with any injected learning rate), its GPU, threads and seeds."""
    cfg = spec.config
    injected = faults.for_run(spec.name, spec.seed)
    if "lr" in injected:
        cfg = dataclasses.replace(cfg, lr=float(injected["lr"]))
    run = Run(spec, cfg, injected)
    run.progress = RunProgress.for_spec(spec)
    run.phases.listener = run.progress.on_phase
    if run.device == "cuda":
        pin_one_gpu(spec.gpu)
    threads = cfg.threads or spec.threads  # the study's share of the cores, if any
    if threads:
        torch.set_num_threads(threads)
    run.released = cfg.release_memory and release_freed_memory()
    seed_everything(spec.seed)
    return run


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


def autocast(paths: Paths):
    """torch's autocast in the run's precision; nothing in float32."""
    from contextlib import nullcontext

    from loraplace.train.load import DTYPES

    if paths.precision == "float32":
        return nullcontext()
    return torch.autocast(paths.device, dtype=DTYPES[paths.precision])


def check_plan(spec: RunSpec, model) -> None:
    """The strategy placed again on the loaded model must give the spec's plan: the same
    modules with the same ranks and trainable count (the run attaches the plan, not this)."""
    from loraplace.plan.placement import place
    from loraplace.plan.roles import classify

    cfg, plan = spec.config, spec.plan
    placement = place(classify(model), spec.strategy, cfg.rank, cfg.bias)
    if plan.ranks != placement.ranks or plan.trainable_params != placement.trainable_params:
        extra = sorted(set(placement.ranks) - set(plan.ranks))[:3]
        missing = sorted(set(plan.ranks) - set(placement.ranks))[:3]
        raise RuntimeError(
            f"the loaded model does not place {spec.name!r} as planned: "
            f"{placement.trainable_params:,} trainable parameters against the plan's "
            f"{plan.trainable_params:,} (extra {extra}, missing {missing})"
        )


def _generations(
    run: Run, model, tokenizer, prompts: list[str], phase: str | None = None
) -> list[str]:
    """Greedy continuations of the prompts, `task_batch_size` at a time, timed as `phase`."""
    if not prompts:
        return []
    cfg = run.cfg
    with run.phases(phase or "generations"), autocast(run.paths):
        return [
            text
            for start in range(0, len(prompts), cfg.task_batch_size)
            for text in greedy_generations(
                model, tokenizer, prompts[start : start + cfg.task_batch_size],
                cfg.max_new_tokens, run.device, cfg.max_length,
            )
        ]  # fmt: skip


def _trainer(run: Run, model, train_set, batching: dict, taken: dict, evaluate):
    """The Trainer, its callbacks (curves, checkpoints, injected faults) and the checkpoint it
    resumes from, if any."""
    from transformers import PrinterCallback, Trainer

    cfg = run.cfg
    curves: dict = {"train": [], "eval": [], "last_eval": None}
    key = checkpoints.run_key(
        run_settings(cfg.to_dict()), to_dict(run.spec.strategy), run.spec.seed,
        [e.input_ids for e in train_set],
    )  # fmt: skip
    resume = checkpoints.latest(run.run_dir, key)
    run.timing["before_s"] = 0.0  # training time before the checkpoint resumed from
    if resume:
        curves.update(resume.manifest["curves"])
        run.timing["before_s"] = resume.manifest["train_s"]
    packed = batching["packed"]
    cls = chunked_trainer(taken["fused_head"], taken["head_libraries"]) if packed else Trainer
    steps = math.ceil(math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum)) * cfg.epochs)
    paths = dataclasses.replace(run.paths, liger=taken["liger"])
    guard = recorder(evaluate, curves, cfg.eval_every_epoch, each_step=run.device == "cpu")
    trainer = cls(
        model=model,
        args=training_args(cfg, run.run_dir, run.spec.seed, run.spec.name, paths, steps),
        train_dataset=train_set,
        data_collator=batching["collate"],
        callbacks=[guard, run.progress.callback(sum(len(e.input_ids) for e in train_set))],
    )
    if trainer.args.n_gpu > 1:  # DataParallel would split each batch: fewer, larger steps
        raise RuntimeError(
            f"this run sees {trainer.args.n_gpu} GPUs; a run trains on one (CUDA_VISIBLE_DEVICES)"
        )
    if run.paths.precision == "fp16":  # overflowing steps are the scaler's to skip
        guard.loss_scale = trainer.accelerator.scaler.get_scale
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
        "paths": run.paths.to_dict(),
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
        "runs_at_once": run.spec.runs_at_once,  # None: not said (a Ray task)
        "liger": taken["liger"],
        "gpu": gpu_record(run.device),
    }


def gpu_record(device: str) -> dict | None:
    """The GPU this run trained on (its id as CUDA_VISIBLE_DEVICES names it), and what its
    allocator reserved at most; None off CUDA."""
    if device != "cuda":
        return None
    return {
        "id": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "name": torch.cuda.get_device_name(0),
        "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
    }


def pin_one_gpu(gpu: str | None) -> None:
    """Before CUDA starts in this process: see only the run's GPU (the study's choice), or the
    first one, where more are visible; a run trains on one GPU."""
    from loraplace.fast import gpus

    if torch.cuda.is_initialized():
        return
    visible = gpus.visible_ids()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    elif visible is None or len(visible) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[0] if visible else "0"


def run_spec_file(spec_path: Path) -> int:
    """Run the spec and write result.json atomically, status ok or failed with its reason."""
    spec = RunSpec.read(spec_path)
    redirect_output(spec_path.parent)  # where the study draws a live display
    result = spec.failed(None) | {
        "process": os.getpid(),
        "parent_process": os.getppid(),  # the study, or the server that forked this run
        "loraplace_version": __version__,
        **environment(),
        "timing": {"started": time.time()},  # wall clock: runs at once overlap in these
    }
    try:
        faults.limit_file_size(faults.for_run(spec.name, spec.seed))
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
    if result["status"] == "ok" and not spec.config.keep_checkpoints:
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


if __name__ == "__main__":
    from loraplace.core.quiet import quiet_libraries

    quiet_libraries()
    die_with_parent()
    try:
        sys.exit(run_spec_file(Path(sys.argv[1])))
    except KeyboardInterrupt:  # Ctrl-C: the study says what to do; nothing was recorded
        sys.exit(130)
