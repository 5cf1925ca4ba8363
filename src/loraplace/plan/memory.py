"""What one run holds in GPU memory, estimated from the model's architecture (no weights).

    need = run_memory(shape_of(meta_model, modules), trainable_params=2_359_296,
                      tokens=1024, precision="bf16")
    need.total_mb      # weights + (adapters and AdamW + activations) x reserve + CUDA context

Used to refuse a base that cannot fit on the GPU before anything trains (its weights alone are
exact), to choose how many runs share a GPU (`runs_per_device: auto`) and to say what a Ray
task's share of a GPU must hold. The activation term is an estimate, not a measurement: no
GPU has been lent to check it (docs/gpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per weight. NF4 with double quantization: 4 bits, plus one 8-bit scale per 64 weights
# and one float32 scale per 256 of those (QLoRA, section 2); LLM.int8: 1 byte (its per-row
# scales are negligible). Only the decoder layers' linear weights are quantized.
BYTES = {"float32": 4.0, "bf16": 2.0, "fp16": 2.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256),
         "8bit": 1.0}  # fmt: skip
# What every process that uses a GPU holds before any tensor: the CUDA context and the kernels
# torch and cuBLAS load (a few hundred MB on recent GPUs and drivers; the larger end is kept).
CUDA_CONTEXT_MB = 768.0
# PyTorch's caching allocator keeps freed blocks for reuse and rounds requests up: a process
# reserves more than its peak allocation. Applied to what changes during training.
ALLOCATOR_RESERVE = 1.25
# AdamW in float32: the adapter's weight, its gradient and the two moments, 4 bytes each.
ADAPTER_BYTES = 16


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of a model."""

    base_params: int
    linear_params: int  # the decoder layers' linear weights: the ones quantization shrinks
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class RunMemory:
    weights_mb: float
    adapters_mb: float
    activations_mb: float
    context_mb: float = CUDA_CONTEXT_MB
    reserve: float = ALLOCATOR_RESERVE

    @property
    def total_mb(self) -> float:
        return (
            self.weights_mb
            + (self.adapters_mb + self.activations_mb) * self.reserve
            + self.context_mb
        )

    def describe(self) -> str:
        return (
            f"about {self.total_mb:,.0f} MB: weights {self.weights_mb:,.0f}, adapters with "
            f"AdamW {self.adapters_mb:,.0f}, activations {self.activations_mb:,.0f} (estimated), "
            f"allocator reserve x{self.reserve:g}, CUDA context {self.context_mb:,.0f}"
        )


def shape_of(model, modules) -> Shape:
    """The `Shape` of a (meta-device) model, from its classified linear modules."""
    from loraplace.plan.models import base_params
    from loraplace.plan.roles import hidden_size, num_layers

    up = [m.out_features for m in modules if m.role == "mlp.up"]
    hidden = hidden_size(model)
    return Shape(
        base_params=base_params(model),
        linear_params=sum(m.in_features * m.out_features for m in modules if m.layer is not None),
        n_layers=num_layers(modules),
        hidden=hidden,
        intermediate=max(up) if up else 4 * hidden,
        vocab=int(getattr(model.config, "vocab_size", 0) or 0),
    )


def weights_mb(shape: Shape, precision: str, quantize: str = "none") -> float:
    """The base's weights in memory: in `precision`, the decoder's linear weights in
    `quantize`'s bits where it is not none."""
    if quantize == "none":
        return shape.base_params * BYTES[precision] / 2**20
    rest = shape.base_params - shape.linear_params
    return (shape.linear_params * BYTES[quantize] + rest * BYTES[precision]) / 2**20


def activations_mb(shape: Shape, tokens: int, precision: str) -> float:
    """What a training step keeps for its backward pass, for `tokens` tokens at once.

    Per token and layer, with attention kernels that keep no T x T matrix (SDPA,
    FlashAttention): about 16 hidden-sized and 6 intermediate-sized values (the norms' and
    projections' inputs, queries, keys, values, attention output, the MLP's up, gate and
    activation, LoRA dropout's copies of the adapted inputs), after Korthikanti et al. 2022
    (their 34 bytes x hidden in 16 bits, without the attention matrix, with an MLP of any
    width). The head's logits: 16-bit logits, their float32 copy for the loss and its
    gradient."""
    value = 4.0 if precision == "float32" else 2.0
    per_layer = (16 * shape.hidden + 6 * shape.intermediate) * value
    logits = shape.vocab * (value + 4 + 4)
    return tokens * (shape.n_layers * per_layer + logits) / 2**20


def run_memory(
    shape: Shape, trainable_params: int, tokens: int, precision: str, quantize: str = "none"
) -> RunMemory:
    """One GPU run's memory: its weights, adapters with AdamW, a step's activations for
    `tokens` tokens, the allocator's reserve and the CUDA context."""
    compute = "bf16" if quantize != "none" and precision == "float32" else precision
    return RunMemory(
        weights_mb=weights_mb(shape, precision, quantize),
        adapters_mb=trainable_params * ADAPTER_BYTES / 2**20,
        activations_mb=activations_mb(shape, tokens, compute),
    )
