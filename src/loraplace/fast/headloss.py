"""The output head and the cross-entropy as one pass over token blocks: no whole logits tensor.

    total = head_loss(model, chunk)     # sum of the chunk's token losses, differentiable

A causal LM's own loss makes the logits of every token (tokens x vocabulary floats: 192 KB a
token for SmolLM2's 49,152 words), keeps their log-softmax for the backward pass and makes two
more such tensors when that pass starts, while every layer's activations are still held. With
a frozen output head the only gradient needed there is the one for the hidden states, so this
computes it in the forward pass, `ROWS` tokens at a time: softmax minus the one-hot target,
times the head's weight. What stays until the backward pass is a tokens x hidden tensor.
Same arithmetic as the model's loss; `head_loss_matches` checks it on the model at run start
(a model that scales or caps its logits fails the check and keeps its own loss).

With `onednn` (CPU, float32) both head products, the logits and the hidden-state gradient,
run through oneDNN, faster there than with the default BLAS and with no extra memory
(docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `onednn_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplace.core.modes import evaluating
from loraplace.data.rows import IGNORE
from loraplace.fast.kernels import directions, linear, linear_input_grad, training_low

ROWS = 128  # tokens per block of logits: 24 MB at a 49k vocabulary


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens with a target of cross_entropy(hidden @ weight.T + bias, target)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, onednn=False, low=None):
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        forward_onednn, input_grad_onednn = directions(onednn)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], ROWS):
            target = targets[start : start + ROWS]
            counted = target != IGNORE
            if not counted.any():
                continue
            rows = counted.nonzero().squeeze(1)
            logits = linear(hidden[start : start + ROWS][rows], weight, bias, forward_onednn, low)
            logits = logits.float()
            picked = target[rows]
            # in place: one fused pass, faster than logsumexp, subtract and exp (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `fused_head_loss`)
            logp = torch.log_softmax(logits, dim=-1, out=logits)
            total -= logp.gather(1, picked[:, None]).sum()
            if grad is not None:
                probs = logp.exp_()  # softmax, in place of the logits
                probs[torch.arange(len(rows), device=probs.device), picked] -= 1.0
                grad[start + rows] = linear_input_grad(
                    probs.to(weight.dtype), weight, input_grad_onednn, low
                ).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None


def _parts(model):
    """(decoder body, output head) of a causal LM, PEFT-wrapped or not; None where it has none."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or body is lm or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


def _hidden_and_targets(body, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The body's last hidden states as (tokens, hidden) and each token's target, the next
    token's label (IGNORE after the last)."""
    out = body(**{k: v for k, v in inputs.items() if k != "labels"})
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:  # a body configured to return tuples, or not a transformers model's
        raise ValueError(f"{type(body).__name__} returns no last_hidden_state")
    targets = F.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE)
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def head_loss(model, inputs: dict, onednn: bool = False) -> torch.Tensor:
    """Sum of the token losses of a batch whose labels are the inputs (shifted inside)."""
    body, head = _parts(model)
    hidden, targets = _hidden_and_targets(body, inputs)
    low = training_low(head)  # bfloat16 products while training, where `accelerate` gave them
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, onednn, low)


@torch.no_grad()
def head_token_losses(model, inputs: dict, onednn: bool = False) -> torch.Tensor:
    """Each position's cross-entropy against the next token (0 where none is counted), shaped
    like the labels: what the model's logits give, `ROWS` tokens at a time. For evaluation:
    1,024 tokens of SmolLM2 make 201 MB of logits, and as much again for their log-softmax.
    Only positions with a target go through the head (with `loss_on` response, the prompts'
    do not)."""
    body, head = _parts(model)
    hidden, targets = _hidden_and_targets(body, inputs)
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    counted = (targets != IGNORE).nonzero().squeeze(1)
    for start in range(0, len(counted), ROWS):
        rows = counted[start : start + ROWS]
        logits = linear(hidden[rows], head.weight, head.bias, directions(onednn)[0]).float()
        losses[rows] = F.cross_entropy(logits, targets[rows], reduction="none")
    return losses.view(inputs["labels"].shape)


@torch.no_grad()
def head_loss_matches(
    model, device: str = "cpu", tolerance: float = 1e-4, onednn: bool = False
) -> bool:
    """Whether the head-and-loss functions here give this model's own loss (unscaled logits).

    False, too, where the model computes no loss from labels. A forward that raises is no
    verdict on the model: the error goes to the caller (nothing is remembered)."""
    if _parts(model) is None:
        return False
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(model.config.vocab_size, 1000), (1, 12), generator=generator)
    labels = ids.clone()
    labels[0, :3] = IGNORE
    inputs = {"input_ids": ids.to(device), "labels": labels.to(device)}
    with evaluating(model):
        own_mean = model(**inputs).loss
        if own_mean is None:
            return False
        ours = float(head_loss(model, inputs, onednn))
    own = float(own_mean) * int((labels[0, 1:] != IGNORE).sum())
    return abs(own - ours) <= tolerance * max(1.0, abs(own))


def head_is_frozen(model) -> bool:
    parts = _parts(model)
    return parts is not None and not any(p.requires_grad for p in parts[1].parameters())
