"""The Hugging Face Trainer as a run uses it: its arguments, the callback that records curves
and stops on NaN, and the Trainer that runs a step's packed chunks one at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loraplace.config import StudyConfig
from loraplace.fast.hardware import Paths
from loraplace.train.evaluate import token_weighted
from loraplace.train.progress import trainer_bars

# An fp16 run's loss scale below this means its gradients overflowed at 17 or more steps in a
# row more than they fit (GradScaler starts at 2**16 and halves at each overflow): diverged.
MIN_LOSS_SCALE = 1.0


def recorder(evaluate, curves: dict, every_epoch: bool = True, each_step: bool = True):
    """The callback that records the curves and stops a run that diverged.

    `each_step`: check the gradients before every optimizer step (on a CPU that costs
    nothing, and a bad step is never applied). Elsewhere reading them back would stall the GPU
    at every step, so the check is what the Trainer logs, once per logging interval: a
    non-finite loss, or a non-finite gradient norm, except under fp16's loss scaling, which
    skips an overflowing step itself: there only a loss scale fallen below `MIN_LOSS_SCALE`
    fails the run (`loss_scale`, set once the Trainer exists, reads it)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Train loss at every logging step; shared evaluation at every epoch end; a diverged
        run stops with its reason."""

        loss_scale = None  # () -> the GradScaler's current scale, under fp16

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            curves["train"].append(
                {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"]}
            )
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(
                    f"train loss became {logs['loss']} at step {state.global_step}"
                )
            norm = logs.get("grad_norm")
            if norm is None or math.isfinite(norm) or each_step:
                return
            if self.loss_scale is None:
                raise FloatingPointError(
                    f"non-finite gradient at step {state.global_step}: the loss diverged"
                )
            scale = float(self.loss_scale())
            if scale < MIN_LOSS_SCALE:
                raise FloatingPointError(
                    f"fp16 gradients overflow at every step (loss scale {scale:g} at step "
                    f"{state.global_step}): the loss diverged"
                )

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not each_step:
                return
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


def logging_steps(device: str, total_steps: int) -> int:
    """Optimizer steps between the Trainer's logs: every step on a CPU (the loss curve's every
    point, free there); on a GPU about 50 points a run, since each log reads the loss back
    from the device, which waits for it."""
    return 1 if device == "cpu" else max(1, math.ceil(total_steps / 50))


def chunked_trainer(fused_head_loss: bool = False, onednn_head=(False, False)):
    from transformers import Trainer

    from loraplace.fast.headloss import head_loss

    class ChunkedTrainer(Trainer):
        """Runs one optimizer step's packed chunks one at a time, each weighted by its share of
        the step's target tokens: the gradient of the fused batch, the memory of one chunk.
        With `fused_head_loss` a chunk's loss is `headloss.head_loss` (no whole logits), its
        head's two products (forward, input gradient) through oneDNN where `onednn_head` says."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            chunks, counts = inputs["chunks"], inputs["targets"]
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


def training_args(
    cfg: StudyConfig, run_dir: Path, seed: int, name: str, paths: Paths, total_steps: int = 1
):
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
        logging_steps=logging_steps(paths.device, total_steps),
        logging_nan_inf_filter=False,  # a NaN loss is logged as it is (and stops the run)
        save_strategy="no",
        eval_strategy="no",
        report_to=cfg.report_to or "none",
        run_name=f"{name}-seed-{seed}",
        use_cpu=paths.device == "cpu",
        bf16=paths.precision == "bf16",  # autocast; adapters and optimizer stay float32
        fp16=paths.precision == "fp16",  # autocast with loss scaling (CUDA only)
        use_liger_kernel=paths.liger,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not trainer_bars(),  # a study shows its runs' progress itself
    )
