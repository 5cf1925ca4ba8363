"""The Hugging Face Trainer as a run uses it: its arguments, the callback that records curves
and stops on NaN, and the Trainer that runs a step's packed chunks one at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loraplace.config import StudyConfig
from loraplace.train.evaluate import token_weighted
from loraplace.train.progress import trainer_bars


def recorder(evaluate, curves: dict, every_epoch: bool = True):
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
            if not every_epoch and state.global_step < state.max_steps:
                return  # the curve's inner points skipped: only the final evaluation
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


def chunked_trainer(fused_head_loss: bool = False, onednn_head=(False, False)):
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


def training_args(cfg: StudyConfig, run_dir: Path, seed: int, name: str, paths: dict):
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
        use_cpu=paths["device"] == "cpu",
        bf16=paths.get("precision") == "bf16",  # autocast; adapters and optimizer stay float32
        fp16=paths.get("precision") == "fp16",  # autocast with loss scaling (CUDA only)
        use_liger_kernel=bool(paths.get("liger")),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not trainer_bars(),  # a study shows its runs' progress itself
    )
