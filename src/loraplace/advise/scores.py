"""Cheap per-module scores for where LoRA should go, from a few batches of training data.

    from loraplace.advise.scores import score_modules
    scores = score_modules(model, examples[:64], classify(model), alpha=32)
    scores["model.layers.0.self_attn.q_proj"].nfn      # PLoP's normalized feature norm

One pass over the examples (forward and backward, no adapters, no optimizer step) gives, for
every adaptable module with a role, the three scores `advise` ranks placements with:

- `nfn`: PLoP's normalized feature norm (Hayou, Ghosh & Yu, arXiv 2506.20629), the mean over
  tokens of ||W z|| / ||W z~|| where z~ is a random vector of the same norm as the input z.
  ||W z~|| is taken at its root-mean-square over random directions, ||z|| ||W||_F / sqrt(in),
  so no second product is needed. Low means the weights are not aligned with the data: PLoP
  adapts the roles with the lowest score.
- `grad_energy[k]`: the squared norm of dL/dW projected to rank k, the sum of the k largest
  squared singular values of the loss gradient (LoRA-GA's view: a rank-k step of a given size
  lowers the loss at most by that much, to first order).
- `lora_b[k]`: the squared norm of the LoRA B gradient at initialisation (B = 0) with A of
  rank k drawn as PEFT draws it (U(+-1/sqrt(in)), seeded), scaling left out: ||dL/dW A^T||^2.

The loss is the token-weighted mean cross-entropy over the examples' target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplace.core.modes import evaluating
from loraplace.data.rows import IGNORE, Collator, Example, to_device
from loraplace.plan.roles import LinearModule


@dataclass(frozen=True)
class ModuleScore:
    """The scores of one module; index k of the tuples is the value at rank k (0 at k = 0)."""

    module: LinearModule
    nfn: float
    grad_energy: tuple[float, ...]
    lora_b: tuple[float, ...]

    def at_rank(self, values: tuple[float, ...], rank: int) -> float:
        return values[min(rank, len(values) - 1)]


def _weight_out_in(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (out, in): GPT-2's Conv1D stores (in, out)."""
    return tensor if isinstance(module, torch.nn.Linear) else tensor.T


def _cumulative(values: torch.Tensor) -> tuple[float, ...]:
    return (0.0, *values.double().cumsum(0).tolist())


def grad_spectrum(grad: torch.Tensor) -> tuple[float, ...]:
    """Cumulative squared singular values of a gradient, largest first (via the smaller Gram)."""
    g = grad.float()
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    # float32 eigenvalues of the Gram: faster than float64, and the top ones, which the scores
    # sum, agree to ~1e-6 of the largest (docs/measurements/2026-11-30-advise-eigenproblems.md)
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # squared singular values
    return _cumulative(eig)


def lora_a(rank: int, in_features: int, seed: int) -> torch.Tensor:
    """A LoRA A matrix (rank, in) drawn as PEFT draws it: kaiming_uniform_(a=sqrt(5)), that is
    U(-1/sqrt(in), 1/sqrt(in)); row i is the same at every rank above i."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(rank, in_features, generator=gen) * 2 - 1) / in_features**0.5


def lora_b_spectrum(
    grad_out_in: torch.Tensor, seed: int, max_rank: int | None = None
) -> tuple[float, ...]:
    """Cumulative ||G a_i||^2 over the rows a_i of a PEFT-style A with min(out, in, max_rank)
    rows."""
    out_f, in_f = grad_out_in.shape
    a = lora_a(min(out_f, in_f, max_rank or in_f), in_f, seed)  # (rank, in)
    return _cumulative(((grad_out_in @ a.T) ** 2).sum(0))


def _batches(examples: list[Example], max_tokens: int) -> list[list[Example]]:
    """Examples sorted by length in padded batches of at most `max_tokens` tokens."""
    batches, batch = [], []
    for e in sorted(examples, key=lambda e: len(e.input_ids)):
        if batch and (len(batch) + 1) * len(e.input_ids) > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(e)
    return batches + ([batch] if batch else [])


def score_modules(
    model: torch.nn.Module,
    examples: list[Example],
    modules: list[LinearModule],
    pad_token_id: int = 0,
    max_tokens: int = 512,
    seed: int = 0,
    max_rank: int | None = None,
) -> dict[str, ModuleScore]:
    """Score every module with a role (not `other`) on `examples`; see the module docstring.

    Args:
        model: the causal LM with its weights (no adapters), on CPU or GPU.
        examples: tokenized examples (labels IGNORE where no loss is taken).
        modules: `roles.classify(model)`.
        pad_token_id: the tokenizer's pad token.
        max_tokens: tokens (padding included) per forward pass; bounds activation memory.
        seed: seeds the A matrices of the LoRA-B score.
        max_rank: the highest rank the LoRA-B score is asked at (None: every rank).

    Returns:
        module path -> ModuleScore.
    """
    scored = [m for m in modules if m.role != "other" and m.layer is not None]
    layers = {m.path: model.get_submodule(m.path) for m in scored}
    was_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    _train_only(model, layers.values())
    nfn_sum, n_tokens = _one_pass(model, examples, scored, layers, pad_token_id, max_tokens)
    result = _module_scores(scored, layers, nfn_sum, n_tokens, seed, max_rank)
    for name, p in model.named_parameters():
        p.requires_grad_(was_grad[name])
    return result


def _train_only(model: torch.nn.Module, layers) -> None:
    """Gradients for the weights of `layers` only, none accumulated yet."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.weight.requires_grad_(True)
        layer.weight.grad = None


def _nfn_hook(layer: torch.nn.Module, in_features: int, path: str, nfn_sum: dict, mask: dict):
    """A forward hook adding, over the batch's real tokens (`mask["real"]`), each token's
    ||W z|| / (||z|| ||W||_F / sqrt(in)) to nfn_sum[path]."""
    w_norm = layer.weight.detach().norm().item()

    def fn(_mod, inputs, output):
        with torch.no_grad():
            z = inputs[0][mask["real"]]  # (real tokens, in)
            y = output[mask["real"]]
            if getattr(layer, "bias", None) is not None:
                y = y - layer.bias  # W z, without the bias
            random_norm = z.norm(dim=-1) * w_norm / in_features**0.5
            nfn_sum[path] += (y.norm(dim=-1) / random_norm.clamp_min(1e-12)).sum().item()

    return fn


def _one_pass(
    model: torch.nn.Module,
    examples: list[Example],
    scored: list[LinearModule],
    layers: dict[str, torch.nn.Module],
    pad_token_id: int,
    max_tokens: int,
) -> tuple[dict[str, float], int]:
    """Forward and backward over every example (the loss their token-weighted mean): leaves the
    loss gradient in each scored weight's .grad; returns (sum of PLoP ratios per module, real
    tokens seen)."""
    device = next(model.parameters()).device
    nfn_sum = {path: 0.0 for path in layers}
    mask: dict[str, torch.Tensor] = {}
    handles = [
        layers[m.path].register_forward_hook(
            _nfn_hook(layers[m.path], m.in_features, m.path, nfn_sum, mask)
        )
        for m in scored
    ]
    collate = Collator(pad_token_id)
    n_targets = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)
    n_tokens = 0
    try:
        with evaluating(model):
            for batch in _batches(examples, max_tokens):
                inputs = to_device(collate(batch), device)
                mask["real"] = inputs["attention_mask"].bool()
                n_tokens += int(mask["real"].sum())
                logits = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits  # (batch, seq, vocab)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    inputs["labels"][:, 1:].flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                (loss / max(1, n_targets)).backward()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
    return nfn_sum, n_tokens


def _module_scores(
    scored: list[LinearModule],
    layers: dict[str, torch.nn.Module],
    nfn_sum: dict[str, float],
    n_tokens: int,
    seed: int,
    max_rank: int | None,
) -> dict[str, ModuleScore]:
    """Each scored module's ModuleScore from its accumulated gradient (cleared here)."""
    result = {}
    threads = torch.get_num_threads()
    # The spectra are many small eigenproblems: one thread runs them; on the busy 2-core
    # development machine two ran them about 10x slower
    # (docs/measurements/2026-11-30-advise-eigenproblems.md).
    torch.set_num_threads(1)
    for i, m in enumerate(scored):
        layer = layers[m.path]
        grad = _weight_out_in(layer, layer.weight.grad.detach()).float().cpu()
        layer.weight.grad = None
        result[m.path] = ModuleScore(
            m,
            nfn_sum[m.path] / max(1, n_tokens),
            grad_spectrum(grad),
            lora_b_spectrum(grad, seed + i, max_rank),
        )
    torch.set_num_threads(threads)
    return result
