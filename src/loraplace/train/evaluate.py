"""Evaluation both paths share: token-weighted cross-entropy, kept per example.

    per_example = example_losses(model, examples, collate, batch_size=4)
    eval_loss = token_weighted(per_example)   # independent of the batch size

Each example's loss is the sum of its target tokens' cross-entropy and their count, so the
study's eval loss is sum(losses) / sum(tokens) over all target tokens, and the per-example mean
losses feed the paired statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loraplace.core.modes import evaluating
from loraplace.data.rows import IGNORE, PackedCollator, balanced_groups, to_device
from loraplace.fast.headloss import head_token_losses


@torch.no_grad()
def example_losses(
    model, examples, collate, batch_size: int = 4, device: str = "cpu", head: str | None = None
) -> list[tuple[float, int]]:
    """(sum of token losses, number of target tokens) for every example, in order.

    With a `PackedCollator` (`max_tokens` set) the examples run packed, no padding, in as few
    rows of at most `max_tokens` tokens as fit; otherwise padded, `batch_size` at a time.
    Packed, `head` "blocks" (or "onednn", its products through oneDNN) takes the output head
    and the loss a block of tokens at a time (`headloss.head_token_losses`) instead of making
    a row's whole logits: only for a model `headloss.head_loss_matches`.
    """
    if isinstance(collate, PackedCollator):
        return _packed_losses(model, examples, collate, device, head)
    out: list[tuple[float, int]] = []
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[start : start + batch_size]), device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            targets = batch["labels"][:, 1:]  # token t predicts token t + 1
            losses = F.cross_entropy(  # over rows of the vocabulary: 2x faster than over dim 1
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE,
                reduction="none",
            ).view_as(targets)  # (batch, seq - 1)
            counted = targets != IGNORE
            for row_loss, row_mask in zip(losses, counted, strict=True):
                out.append((float(row_loss[row_mask].sum()), int(row_mask.sum())))
    return out


def _packed_losses(model, examples, collate: PackedCollator, device: str, head: str | None):
    lengths = [len(e.input_ids) for e in examples]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with evaluating(model):
        for group in balanced_groups(lengths, collate.max_tokens):
            row = to_device(collate.pack([examples[i] for i in group]), device)
            labels = row["labels"][0]
            if head:  # position t predicts token t + 1
                losses = head_token_losses(model, row, onednn=head == "onednn")[0]
            else:
                logits = model(**{k: v for k, v in row.items() if k != "labels"}).logits[0]
                losses = F.cross_entropy(
                    logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="none"
                )
            start = 0
            for i in group:  # an example's last position predicts the next one's first: no label
                end = start + lengths[i]
                counted = labels[start + 1 : end] != IGNORE
                out[i] = (float(losses[start : end - 1][counted].sum()), int(counted.sum()))
                start = end
    return out


def token_weighted(per_example: list[tuple[float, int]]) -> float:
    tokens = sum(n for _, n in per_example)
    return sum(s for s, _ in per_example) / tokens if tokens else math.nan


def example_means(per_example: list[tuple[float, int]]) -> list[float]:
    return [s / n if n else math.nan for s, n in per_example]


@torch.no_grad()
def greedy_generations(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    device: str = "cpu",
    max_prompt_tokens: int = 256,
) -> list[str]:
    """Greedy continuations of the prompts, generated together (left-padded, masked).

    A prompt longer than `max_prompt_tokens` keeps its end, where the response starts.
    """
    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        for text in prompts
    ]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    with evaluating(model):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
