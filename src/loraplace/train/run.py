"""One training run: resolved config in, result out. Self-contained, so any process can run it.

    python -m loraplace.train.run OUT/runs/full/seed-42/spec.json   # writes result.json beside it
    python -m loraplace.train.run --serve FD    # runs the specs named on stdin, replies on FD

The run loads the model, attaches the planned adapters (checked against the plan), evaluates
the untrained model, trains with the Hugging Face Trainer, evaluates at every epoch end with the
shared token-weighted evaluation, and records curves, time, throughput and peak memory.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import math
import os
import random
import resource
import signal
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
    restart_peak_memory,
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
from loraplace.fast.hardware import remembered_check
from loraplace.fast.kernels import limit_onednn_caches
from loraplace.train import checkpoints
from loraplace.train.evaluate import (
    example_losses,
    example_means,
    greedy_generations,
    token_weighted,
)


def release_freed_memory() -> bool:
    """Make glibc hand freed blocks of 1 MB or more back to the OS (a fixed mmap threshold).

    By default glibc raises that threshold to the largest block freed so far, so the activation
    buffers of later chunks come from a heap that only grows: a 1-epoch `full` run on the
    embedded model peaked at 2,228 MB that way and at 2,120 MB with the threshold fixed, with
    no measurable change in time. (Trimming the heap after every optimizer step as well cut a
    1-epoch `attention` run's peak by about 300 MB but a 3-epoch `full` run's training time
    went from 203 s to 258 s: the freed pages fault back in at every step. Not done.)
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


def _callback(evaluate, curves: dict):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Train loss per optimizer step; shared evaluation at every epoch end; NaN stops the run."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                curves["train"].append(
                    {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"]}
                )
                if not math.isfinite(logs["loss"]):
                    raise FloatingPointError(
                        f"train loss became {logs['loss']} at step {state.global_step}"
                    )

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            if grads and not torch.isfinite(torch.stack([g.abs().max() for g in grads])).all():
                raise FloatingPointError(
                    f"non-finite gradient at step {state.global_step + 1}: the loss diverged"
                )

        def on_epoch_end(self, args, state, control, **kwargs):
            per_example = evaluate()
            curves["eval"].append(
                {
                    "step": state.global_step,
                    "epoch": round(state.epoch, 4),
                    "loss": token_weighted(per_example),
                }
            )
            curves["last_eval"] = per_example

    return Recorder()


def _chunked_trainer(fused_head_loss: bool = False, onednn_head=(False, False)):
    from transformers import Trainer

    from loraplace.data.rows import IGNORE
    from loraplace.fast.headloss import head_loss

    class ChunkedTrainer(Trainer):
        """Runs one optimizer step's packed chunks one at a time, each weighted by its share of
        the step's target tokens: the gradient of the fused batch, the memory of one chunk.
        With `fused_head_loss` a chunk's loss is `headloss.head_loss` (no whole logits), its
        head's two products (forward, input gradient) through oneDNN where `onednn_head` says."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            chunks = inputs["chunks"]
            counts = [int((c["labels"][..., 1:] != IGNORE).sum()) for c in chunks]
            total = None
            for chunk, count in zip(chunks, counts, strict=True):
                chunk = self._prepare_inputs(chunk)
                if fused_head_loss:
                    loss = head_loss(model, chunk, onednn_head) / sum(counts)
                else:
                    loss = model(**chunk).loss * (count / sum(counts))
                self.accelerator.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
            return total

    return ChunkedTrainer


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
    spec: dict, cfg: StudyConfig, device: str, eval_set, evaluate, head: str | None
) -> list:
    """The untrained model's per-example losses: computed once per study and shared by its runs
    when `reuse_base_eval` (every run of a study evaluates the same base model on the same rows)."""
    path = spec.get("base_eval")
    if not cfg.reuse_base_eval or not path:
        return evaluate()
    tokens = hashlib.sha256(json.dumps([e.input_ids for e in eval_set]).encode()).hexdigest()
    key = {k: getattr(cfg, k) for k in BASE_EVAL_KEYS} | {
        "device": device,
        "tokens": tokens,
        "head": head,
    }
    try:
        cached = json.loads(Path(path).read_text())
        if cached.get("key") == key:
            return [tuple(x) for x in cached["per_example"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    per_example = evaluate()
    write_json(Path(path), {"key": key, "per_example": per_example})
    return per_example


class Notes(list):
    """Fast paths a run asked for and could not take here, each said once, in the log and in
    result.json."""

    def add(self, switch: str, why: str) -> None:
        self.append({"switch": switch, "why": why})
        print(f"  note: {switch} is off for this run: {why}", flush=True)


class Phases(dict):
    """Seconds spent in each named part of a run: `with phases("load"): ...`."""

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def run_paths(spec: dict, cfg: StudyConfig) -> dict:
    """The paths the study resolved for this run, or (a spec without them) resolved here."""
    from loraplace.fast.hardware import Machine, resolve_paths

    if "paths" in spec:
        return spec["paths"]
    machine = Machine.here()
    return resolve_paths(
        cfg.device, cfg.onednn, cfg.onednn_head, cfg.product_dtype, machine
    ).to_dict()


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
    return products_for(Paths(**paths), shapes, head_shape, pack_rows(cfg), ROWS, cfg.threads)


def pack_rows(cfg: StudyConfig) -> int:
    """Tokens per packed training chunk."""
    return cfg.pack_tokens or cfg.max_length * 3 // 2


def _load(cfg: StudyConfig, device: str):
    from loraplace.plan.models import resolve
    from loraplace.train.load import load_model

    model, tokenizer = load_model(resolve(cfg.model, cfg.trust_remote_code))
    model.to(device)
    rows = {
        "train": load_rows(cfg.data, cfg.train_split),
        "eval": load_rows(cfg.data, cfg.eval_split),
    }
    sets = {k: tokenize(v, tokenizer, cfg.max_length, cfg.loss_on) for k, v in rows.items()}
    return model, tokenizer, rows, sets


def _batching(cfg: StudyConfig, model, tokenizer, device: str, notes: Notes) -> dict:
    """How training and evaluation batch their examples: packed where checked exact."""
    from loraplace.fast.segments import use_segment_attention

    pad_to = cfg.max_length if cfg.pad_to == "max_length" else None
    wanted = cfg.packing and cfg.fuse_accumulation and pad_to is None
    exact = (wanted or cfg.pack_eval) and remembered_check(
        "packing", model, device, packing_is_exact
    )
    packed = wanted and exact
    if wanted and not exact:
        notes.add("packing", "packed rows did not give each example its own loss on this model")
    segments = False
    if packed and cfg.segment_attention:
        segments = use_segment_attention(model)
        if not segments:
            notes.add("segment_attention", "the model does not run SDPA attention")
        elif not remembered_check("segments", model, device, packing_is_exact, 1e-4, True):
            model.set_attn_implementation("sdpa")
            segments = False
            notes.add("segment_attention", "attention per example was not exact on this model")
    collate = Collator(tokenizer.pad_token_id, pad_to)
    if packed:
        collate = PackedCollator(pack_rows(cfg), segments)
    eval_packed = cfg.pack_eval and exact
    if cfg.pack_eval and not exact:
        notes.add("pack_eval", "packed rows did not give each example its own loss on this model")
    eval_collate = Collator(tokenizer.pad_token_id)  # both paths: the same evaluation
    if eval_packed:  # no padding; rows of up to eval_batch_size x max_length tokens, as padded
        eval_collate = PackedCollator(cfg.eval_batch_size * cfg.max_length, segments)
    return {"packed": packed, "segments": segments, "collate": collate,
            "eval_packed": eval_packed, "eval_collate": eval_collate}  # fmt: skip


def _head(model, device: str, paths: dict, products: dict, notes: Notes) -> dict:
    """Whether the head-and-loss functions give this model's loss, with the default BLAS and
    with the head's chosen libraries: checked once, here, for training and evaluation."""
    from loraplace.fast.headloss import head_loss_matches

    pair = tuple(products.get("head", (paths["onednn_head"],) * 2))
    blocks = remembered_check("head", model, device, head_loss_matches, 1e-4, (False, False))
    if any(pair) and not (
        blocks and remembered_check("head", model, device, head_loss_matches, 1e-4, pair)
    ):
        if blocks:
            notes.add("onednn_head", "the head's products through oneDNN were not exact here")
        pair = (False, False)
    return {"blocks": blocks, "onednn": pair}


def _training_args(cfg: StudyConfig, run_dir: Path, seed: int, name: str, device: str):
    from transformers import TrainingArguments

    fused = cfg.fuse_accumulation
    return TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size * (cfg.grad_accum if fused else 1),
        gradient_accumulation_steps=1 if fused else cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=cfg.report_to or "none",
        run_name=f"{name}-seed-{seed}",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty() and not os.environ.get("LORAPLACE_PROGRESS"),
    )


def train_run(spec: dict) -> dict:
    """Run one (strategy, seed) and return its metrics; raises on failure."""
    from transformers import PrinterCallback, Trainer

    from loraplace.fast.headloss import head_is_frozen
    from loraplace.fast.kernels import accelerate
    from loraplace.plan.adapters import attach
    from loraplace.plan.placement import place
    from loraplace.plan.planning import architecture
    from loraplace.plan.roles import classify
    from loraplace.plan.strategies import from_dict

    cfg = StudyConfig(**spec["config"])
    strategy, seed, run_dir = from_dict(spec["strategy"]), spec["seed"], Path(spec["run_dir"])
    injected = faults.for_run(strategy.name, seed)  # the fault suite's, else nothing
    if "lr" in injected:
        cfg = dataclasses.replace(cfg, lr=float(injected["lr"]))
    phases, notes = Phases(), Notes()
    paths = run_paths(spec, cfg)
    device = paths["device"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    released = cfg.release_memory and release_freed_memory()
    seed_everything(seed)

    with phases("load"):
        model, tokenizer, rows, sets = _load(cfg, device)
    with phases("checks"):
        products = run_products(spec, cfg, paths, model)
        batching = _batching(cfg, model, tokenizer, device, notes)
        head = _head(model, device, paths, products, notes)
    packed, eval_packed = batching["packed"], batching["eval_packed"]
    eval_head = None
    if eval_packed and head["blocks"]:  # no whole logits; the same for every run
        eval_head = "onednn" if head["onednn"][0] else "blocks"
    timing = {"eval_s": 0.0, "checkpoint_s": 0.0, "checkpoints": 0}

    def evaluate():
        start = time.perf_counter()
        try:
            return example_losses(model, sets["eval"], batching["eval_collate"],
                                  cfg.eval_batch_size, device, eval_head)  # fmt: skip
        finally:
            timing["eval_s"] += time.perf_counter() - start

    prompts = [prompt(r) for r in rows["eval"][: cfg.generations]]
    with phases("base_eval"):
        base_per_example = base_evaluation(spec, cfg, device, sets["eval"], evaluate, eval_head)
    placement = place(classify(model), strategy, cfg.rank, cfg.bias)
    arch = architecture(model, placement)  # before wrapping: for the benchmark's FLOP count
    with phases("attach"):
        model = attach(model, placement, cfg.alpha, cfg.dropout, cfg.bias)
        bf16 = paths["product_dtype"] == "bfloat16"
        taken = accelerate(model, cfg.fused_lora, paths["onednn"], cfg.fused_mlp, bf16,
                           products.get("decoder"))  # fmt: skip
    if cfg.fused_lora and placement.modules and not taken["fused_lora"]:
        notes.add("fused_lora", "no adapted layer is one the fused function reproduces exactly")
    if bf16 and not taken["bf16_products"]:
        notes.add("product_dtype", "no frozen float32 product to run in bfloat16")
    fused_head = packed and cfg.fused_head_loss and head["blocks"] and head_is_frozen(model)
    if packed and cfg.fused_head_loss and not fused_head:
        notes.add("fused_head_loss", "the model's own loss differs from the blocked head loss")
    head_libraries = head["onednn"] if fused_head else (False, False)
    base_generations = []
    if prompts:
        with phases("generations"), model.disable_adapter():
            base_generations = greedy_generations(
                model, tokenizer, prompts, cfg.max_new_tokens, device, cfg.max_length
            )

    curves: dict = {"train": [], "eval": [], "last_eval": None}
    key = checkpoints.run_key(
        run_settings(cfg.to_dict()), spec["strategy"], seed, [e.input_ids for e in sets["train"]]
    )
    resume = checkpoints.latest(run_dir, key)
    before_s = 0.0  # training time before the checkpoint resumed from
    if resume:
        curves.update(resume.manifest["curves"])
        before_s = resume.manifest["train_s"]
    trainer = (_chunked_trainer(fused_head, head_libraries) if packed else Trainer)(
        model=model,
        args=_training_args(cfg, run_dir, seed, strategy.name, device),
        train_dataset=sets["train"],
        data_collator=batching["collate"],
        callbacks=[_callback(evaluate, curves)],
    )
    trainer.remove_callback(PrinterCallback)  # the study prints its own progress lines
    eval_before = timing["eval_s"]  # the base evaluation is not training time

    def train_s() -> float:
        evals = timing["eval_s"] - eval_before
        return before_s + time.perf_counter() - start - evals - timing["checkpoint_s"]

    every_s = cfg.checkpoint_minutes * 60 if cfg.checkpoint_minutes else None
    if cfg.checkpoint_every or every_s:
        trainer.add_callback(
            checkpoints.checkpointer(
                trainer, run_dir, key, cfg.checkpoint_every, every_s, curves, timing, train_s
            )
        )
    injector = faults.callback(injected)
    if injector:
        trainer.add_callback(injector)
    if resume:
        print(f"  resumed from step {resume.step} ({resume.path})", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with phases("train"):
        trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    train_time_s = train_s()
    phases["epoch_evals"] = timing["eval_s"] - eval_before

    per_example = curves.pop("last_eval") or evaluate()
    eval_loss = token_weighted(per_example)
    if not math.isfinite(eval_loss):
        raise FloatingPointError(f"eval loss is {eval_loss}")
    base_eval_loss = token_weighted(base_per_example)
    trained_tokens = sum(len(e.input_ids) for e in sets["train"]) * cfg.epochs
    with phases("save"):
        checkpoints.write_dir_atomically(
            run_dir / "adapter", lambda d: model.save_pretrained(str(d), safe_serialization=True)
        )
    generations = []
    if prompts:
        with phases("generations"):
            generations = greedy_generations(
                model, tokenizer, prompts, cfg.max_new_tokens, device, cfg.max_length
            )
    return {
        "metrics": {
            "eval_loss": eval_loss,
            "perplexity": math.exp(eval_loss),
            "base_eval_loss": base_eval_loss,
            "trainable_params": placement.trainable_params,
            "train_time_s": train_time_s,
            "peak_memory_mb": peak_memory_mb(device),
            "tokens_per_s": trained_tokens / train_time_s,
            "optimizer_steps": trainer.state.global_step,
            "checkpoints": timing["checkpoints"],
            "checkpoint_s": timing["checkpoint_s"],
        },
        "resumed_from_step": resume.step if resume else None,
        "per_example": {
            "loss_sum": [s for s, _ in per_example],
            "tokens": [n for _, n in per_example],
            "loss": example_means(per_example),
        },
        "base_per_example": {"loss": example_means(base_per_example)},
        "curves": curves,
        "placement": _placement_record(placement),
        "generations": [
            {"prompt": p, "base": b, "adapted": g}
            for p, b, g in zip(prompts, base_generations, generations, strict=True)
        ],
        "data": {
            "name": dataset_name(cfg.data),
            "train_rows": len(rows["train"]),
            "eval_rows": len(rows["eval"]),
            "eval_target_tokens": sum(n for _, n in per_example),
        },
        "device": device,
        "paths": paths,
        "products": products,
        "fallbacks": list(notes),
        "phases_s": dict(phases),
        "packed": packed,
        "segment_attention": batching["segments"],
        "fused_head_loss": fused_head,
        "fused_mlp": taken["fused_mlp"] > 0,
        "onednn_head": list(head_libraries),
        "product_dtype": "bfloat16" if taken["bf16_products"] else "float32",
        "packed_eval": eval_packed,
        "eval_head": eval_head,
        "release_memory": released,
        "architecture": arch,
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


def serve(commands, replies) -> None:
    """Run specs one after another, each in a child forked from this process (the study's
    `reuse_process`).

    Each line of `commands` is {"spec": path, "env": environment, "cwd": folder}; its run
    gets that environment and folder, a fresh seed (in `train_run`) and its own peak-memory
    count, and its exit status goes back as one line {"code": status}. This process imports
    Python's ML stack once (5.6 s per run here) and never computes anything, so every child
    starts as a fresh process would after its imports: nothing a run allocates or leaves
    behind reaches the next one, and OpenMP's threads are first started in the child. A run's
    peak memory adds what only this process holds while the run is alive (`peak_memory_mb`).
    """
    global SERVER
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the study stops the run, not this
    _preload()
    gc.freeze()  # what the imports made stays untouched by the children's collections
    for line in commands:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the run
            code, SERVER = 1, os.getppid()
            try:
                die_with_parent()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.environ.clear()
                os.environ.update(job["env"])
                limit_onednn_caches()  # the study's environment may not have them
                os.chdir(job["cwd"])
                restart_peak_memory()
                code = run_spec_file(Path(job["spec"]))
                _finish_loggers()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _preload() -> None:
    """Import what a run imports, without running any of it."""
    import peft  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import loraplace.fast.headloss  # noqa: F401
    import loraplace.fast.kernels  # noqa: F401
    import loraplace.fast.segments  # noqa: F401
    import loraplace.plan.adapters  # noqa: F401
    import loraplace.plan.models  # noqa: F401
    import loraplace.plan.planning  # noqa: F401
    import loraplace.train.load  # noqa: F401


def _finish_loggers() -> None:
    """A forked run ends without exit handlers: close an open W&B run by hand."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _quiet() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    _quiet()
    if sys.argv[1] == "--serve":
        with os.fdopen(int(sys.argv[2]), "w") as reply_pipe:
            serve(sys.stdin, reply_pipe)
        sys.exit(0)
    die_with_parent()
    try:
        sys.exit(run_spec_file(Path(sys.argv[1])))
    except KeyboardInterrupt:  # Ctrl-C: the study says what to do; nothing was recorded
        sys.exit(130)
