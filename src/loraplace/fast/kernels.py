"""Faster kernels for a PEFT model in training: the same arithmetic, fewer and faster passes.

    accelerate(peft_model, fused_lora=True, onednn=True)   # in place; returns what it took over

Four independent switches:

- `fused_lora`: PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate
  operations: a Bernoulli draw for the dropout mask, a multiply, two small matrix products, a
  scale, an add, and the same again backwards; on CPU the mask draw alone is a noticeable
  share of a step. Here one autograd function does it: the mask is drawn 4 lanes per 64-bit
  random word (16-bit resolution: the drop probability is round(p * 65536) / 65536, 0.100006
  for p = 0.1), on CPU by numpy's SFC64 generator seeded from torch's (faster than torch's own
  generator), applied with float passes only, kept as its int16 lanes with the layer's input
  (not the masked copy), and the adapter product is added into the frozen output in place.
  Measurements: docs/measurements/2026-11-29-fast-paths-avx512-bf16.md (`fused_lora`) and docs/measurements/2026-11-28-dropout-masks.md.
- `onednn`: every frozen linear product, forwards and backwards (input gradient only), runs
  through oneDNN instead of the default BLAS: on AMD CPUs MKL runs its AVX2 code where
  oneDNN runs AVX-512, and the products are faster (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `onednn`; per
  weight shape and direction, `table` says which library measured faster on this machine).
  CPU and float32 only; elsewhere the layers are left as they are.
- `fused_mlp`: a SwiGLU feed-forward block (`down(silu(gate(x)) * up(x))`, Llama, Mistral,
  Qwen2, SmolLM2) computes silu(gate) * up as one function that keeps gate and up for the
  backward pass and remakes silu(gate) there: autograd's own keeps silu(gate) as well, one
  more tokens x intermediate tensor a layer (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `fused_mlp`). Same
  floating-point operations, so the same results; checked on each block before use. With
  down_proj a fused LoRA layer, the same function runs it too and remakes its input,
  silu(gate) * up, backwards instead of keeping it.
- `bf16_products`: each frozen weight those layers and the output head multiply by gets a
  bfloat16 copy, and while gradients are taken (training) their products take bfloat16
  inputs, accumulate and return float32, through oneDNN: on CPUs that multiply bfloat16
  natively (AVX-512 BF16, AMX) that is faster than float32
  (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `product_dtype`). The one switch that changes rounding; evaluation (no gradients) stays
  float32.

Parameters stay PEFT's own, so saving, `disable_adapter` and merging work unchanged. Layers the
fused function cannot reproduce exactly (DoRA, several active adapters, trainable base bias,
LoRA bias, dtype casts) keep PEFT's forward.
"""

from __future__ import annotations

import inspect
import math
import os
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraplace.core.modes import evaluating

# oneDNN, and ideep (torch's layer over it), each cache a primitive per (tokens, shape), and
# packed chunks vary in length, so at their default capacity (1024) both caches keep growing a
# run's memory. Capped at 16, a primitive is now and then made again, at no measurable cost in
# time (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, "oneDNN's primitive caches"). Both read these once, at their
# first use, so they are set on import.
ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"}


def limit_onednn_caches() -> None:
    """Cap oneDNN's and ideep's primitive caches unless the user set them (before first use)."""
    for key, value in ONEDNN_CACHES.items():
        os.environ.setdefault(key, value)


limit_onednn_caches()

LANES = 65536  # one dropout decision per 16-bit lane


def drop_threshold(p: float) -> int:
    """Lanes below this value (out of 65536, from -32768) are dropped."""
    return round(p * LANES)


def random_lanes(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform int16 lanes, four from every 64-bit random word.

    On CPU the words come from numpy's SFC64 generator, seeded by one draw from torch's, so
    `torch.manual_seed` still fixes them; elsewhere from torch's generator on the device.
    """
    n = math.prod(shape)
    words = (n + 3) // 4
    if torch.device(device).type == "cpu":
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        raw = np.random.SFC64(seed).random_raw(words).view(np.int64)
        return torch.from_numpy(raw).view(torch.int16)[:n].view(shape)
    drawn = torch.empty(words, dtype=torch.int64, device=device)
    drawn.random_(-(2**63), 2**63 - 1)
    return drawn.view(torch.int16)[:n].view(shape)


def keep_mask(lanes: torch.Tensor, p: float) -> torch.Tensor:
    """1.0 where a lane is kept (probability 1 - round(p * 65536) / 65536), else 0.0.

    Made with float passes only, which on CPU are several times faster than a bool comparison
    or a bool-float multiply (docs/measurements/2026-11-28-dropout-masks.md): lanes are
    integers, so lane - (cut - 1) clamped to [0, 1] is exactly 1 for lanes >= cut and exactly
    0 below.
    """
    cut = drop_threshold(p) - LANES // 2
    return lanes.to(torch.float32).sub_(cut - 1).clamp_(0.0, 1.0)


def keep_scale(p: float) -> float:
    return LANES / (LANES - drop_threshold(p))


# Fewer rows than this go through the default BLAS even where oneDNN was chosen: a product of
# 1-3 rows (a decoding step) took 2-5x as long through oneDNN as through MKL for SmolLM2's
# shapes, 149-243 us against 74-103 us for 1536 x 576, at 8 rows both about 230 us, from 16
# rows oneDNN was faster (docs/measurements/2026-12-01-evaluation-and-generations-xeon.md).
ONEDNN_MIN_ROWS = 8


def linear(x2: torch.Tensor, weight: torch.Tensor, bias=None, onednn: bool = False, low=None):
    """x2 @ weight.T + bias for a 2-D x2 and a weight of shape (out, in), any strides.

    With `low` (the weight in bfloat16, same shape and strides) the product runs in bfloat16
    through oneDNN, accumulated and returned in float32; the bias is added in float32."""
    if low is not None:
        y = torch.ops.mkldnn._linear_pointwise(
            x2.contiguous().to(low.dtype), low, None, "none", [], ""
        ).float()
        return y if bias is None else y.add_(bias)
    if (
        onednn
        and x2.shape[0] >= ONEDNN_MIN_ROWS
        and x2.device.type == "cpu"
        and x2.dtype == torch.float32
    ):
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), weight, bias, "none", [], "")
    return F.linear(x2, weight, bias)


def directions(onednn) -> tuple[bool, bool]:
    """(forward, input gradient) through oneDNN, from one flag or a measured pair of them."""
    return (onednn, onednn) if isinstance(onednn, bool) else (bool(onednn[0]), bool(onednn[1]))


def linear_input_grad(g: torch.Tensor, weight: torch.Tensor, onednn: bool = False, low=None):
    """g @ weight: the input gradient of `linear(x2, weight, ..., low)` for its output gradient g."""
    return linear(g, weight.t(), None, onednn, None if low is None else low.t())


def _frozen_product(x, weight, bias, onednn, low=None) -> torch.Tensor:
    """`linear` over the last dimension of an input of any shape."""
    y = linear(x.reshape(-1, x.shape[-1]), weight, bias, directions(onednn)[0], low)
    return y.view(*x.shape[:-1], y.shape[-1])


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: the backward pass computes the input gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias, onednn, low=None):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.onednn, ctx.low = x.shape, onednn, low
        return _frozen_product(x, weight, bias, onednn, low)

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        grad_x = linear_input_grad(
            grad_y.reshape(-1, grad_y.shape[-1]), weight, directions(ctx.onednn)[1], ctx.low
        )
        return grad_x.view(ctx.shape), None, None, None, None


def _adapted(x2, weight, bias, lora_a, lora_b, scaling, lanes, p, onednn, low):
    """Forward of an adapted layer on a 2-D input: (output, the adapter's r-dim activation)."""
    y = linear(x2, weight, bias, directions(onednn)[0], low)
    xd = x2 if lanes is None else x2 * keep_mask(lanes, p).view_as(x2)
    h = xd @ lora_a.t()
    if lanes is not None:
        h.mul_(keep_scale(p))
    y.addmm_(h, lora_b.t(), alpha=scaling)
    return y, h


def _adapted_backward(g, x2, weight, lora_a, lora_b, h, lanes, scaling, p, onednn, low, input_grad):
    """Gradients of an adapted layer for a 2-D output gradient g: (input, lora_a, lora_b)."""
    g_h = (g @ lora_b).mul_(scaling)  # gradient at the adapter's r-dim bottleneck
    grad_b = (g.t() @ h).mul_(scaling)
    mask = None
    if lanes is not None:
        g_h.mul_(keep_scale(p))  # on through the 1 / (1 - p)
        mask = keep_mask(lanes, p).view_as(x2)
    grad_a = g_h.t() @ (x2 if mask is None else x2 * mask)
    grad_x = None
    if input_grad:
        through_adapter = g_h @ lora_a
        if mask is not None:
            through_adapter.mul_(mask)
        grad_x = linear_input_grad(g, weight, directions(onednn)[1], low).add_(through_adapter)
    return grad_x, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scaling * ((x * mask / (1 - p)) A^T) B^T, W and b frozen, A and B trained.

    The mask comes from `lanes` (None: no dropout) and the 1 / (1 - p) is applied to the rank-r
    product. The backward pass keeps x itself and the int16 lanes, not the masked float copy,
    and remakes the mask: layers that read the same input (q, k, v; gate, up) then keep one
    tensor between them. The lanes are kept rather than drawn again backwards from a seed,
    which would keep less memory but make training slower (docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `fused_lora`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, lanes, p, onednn, low=None):
        y, h = _adapted(
            x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, lanes, p, onednn, low
        )
        ctx.save_for_backward(weight, lora_a, lora_b, x, h, lanes)
        ctx.scaling, ctx.p, ctx.onednn, ctx.low = scaling, p, onednn, low
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        weight, lora_a, lora_b, x, h, lanes = ctx.saved_tensors
        grad_x, grad_a, grad_b = _adapted_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]), weight,
            lora_a, lora_b, h, lanes, ctx.scaling, ctx.p, ctx.onednn, ctx.low,
            ctx.needs_input_grad[0],
        )  # fmt: skip
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, F.silu(gate).mul_(grad)


class SiluMulAdapted(torch.autograd.Function):
    """An adapted down projection of silu(gate) * up, keeping gate, up and the lanes only.

    SiluMul followed by LoraLinear keeps gate and up for the first and silu(gate) * up, the
    down projection's input, for the second: one more tokens x intermediate tensor a layer.
    Here that input is made again backwards from gate and up, from the silu(gate) the gate's
    gradient needs anyway. The same floating-point operations as the two functions.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling, lanes, p, onednn, low=None):
        x = F.silu(gate).mul_(up)
        y, h = _adapted(
            x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, lanes, p, onednn, low
        )
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, h, lanes)
        ctx.scaling, ctx.p, ctx.onednn, ctx.low = scaling, p, onednn, low
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, weight, lora_a, lora_b, h, lanes = ctx.saved_tensors
        input_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        silu = F.silu(gate)
        x = silu * up
        grad_x, grad_a, grad_b = _adapted_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), x.view(-1, x.shape[-1]), weight,
            lora_a, lora_b, h, lanes, ctx.scaling, ctx.p, ctx.onednn, ctx.low, input_grad,
        )  # fmt: skip
        del x
        grad_gate = grad_up = None
        if grad_x is not None:
            grad_x = grad_x.view(gate.shape)
            grad_gate = torch.ops.aten.silu_backward(grad_x * up, gate)
            grad_up = silu.mul_(grad_x)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None, None, None, None


def _swiglu_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    fused = hasattr(mlp.down_proj, "_fused_onednn")  # a LoRA layer `accelerate` took over
    args = _adapted_args(mlp.down_proj, gate) if fused else None
    if args is None:
        return mlp.down_proj(SiluMul.apply(gate, up))
    return SiluMulAdapted.apply(gate, up, *args)


@torch.no_grad()
def _is_swiglu(mlp: nn.Module) -> bool:
    """Whether this block computes down(silu(gate(x)) * up(x)): its own forward, on a probe."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    width = getattr(parts[0], "in_features", None)
    if any(part is None for part in parts) or not width or not _takes_one_input(mlp):
        return False
    weight = next(parts[0].parameters())
    probe = torch.randn(
        2, 3, width, generator=torch.Generator().manual_seed(0), dtype=weight.dtype
    ).to(weight.device)
    try:
        with evaluating(mlp):  # no dropout draws
            return torch.equal(mlp(probe), _swiglu_forward(mlp, probe))
    except (RuntimeError, ValueError):  # the block's forward or the fused one refused the probe
        return False


def _takes_one_input(module: nn.Module) -> bool:
    """Whether module(x) is a complete call: its forward takes a positional input and requires
    nothing else (a shared-experts block that also wants routing weights does not)."""
    params = inspect.signature(module.forward).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    takes_x = any(p.kind in (*positional, inspect.Parameter.VAR_POSITIONAL) for p in params)
    required = [
        p for p in params if p.default is p.empty and p.kind in (*positional, p.KEYWORD_ONLY)
    ]
    return takes_x and len(required) <= 1


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in): nn.Linear's own, GPT-2's Conv1D transposed (a view)."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


def _adapted_args(layer, x: torch.Tensor) -> tuple | None:
    """What LoraLinear needs besides the input, dropout lanes drawn; None where PEFT's own
    forward must run (adapter disabled or merged, input of another dtype)."""
    if layer.disable_adapters or layer.merged:
        return None
    name = layer.active_adapters[0]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if x.dtype != lora_a.dtype:
        return None
    base = layer.get_base_layer()
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    lanes = random_lanes(x.shape, x.device) if p > 0 else None
    onednn, low = layer._fused_onednn, training_low(layer)
    return _weight(base), base.bias, lora_a, lora_b, layer.scaling[name], lanes, p, onednn, low


def _lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    fused = None if args or kwargs else _adapted_args(layer, x)
    if fused is None:
        return layer._peft_forward(x, *args, **kwargs)
    if not torch.is_grad_enabled():  # evaluation, generation: the same arithmetic, no graph node
        y = _adapted(x.reshape(-1, x.shape[-1]), *fused)[0]
        return y.view(*x.shape[:-1], y.shape[-1])
    return LoraLinear.apply(x, *fused)


def _frozen_forward(layer, x: torch.Tensor) -> torch.Tensor:
    args = (_weight(layer), layer.bias, layer._onednn, training_low(layer))
    if not torch.is_grad_enabled():  # as in _lora_forward
        return _frozen_product(x, *args)
    return FrozenLinear.apply(x, *args)


def training_low(layer) -> torch.Tensor | None:
    """The layer's bfloat16 weight where it has one and gradients are being taken (training);
    None in evaluation, which stays float32."""
    low = getattr(layer, "_bf16_weight", None)
    return low if low is not None and torch.is_grad_enabled() else None


def _is_lora_linear(layer) -> bool:
    from peft.tuners.lora.layer import Linear

    return type(layer) is Linear


def _lora_supported(layer) -> bool:
    if not _is_lora_linear(layer) or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    dropout = layer.lora_dropout[name]
    return (
        name in layer.lora_A
        and name not in getattr(layer, "lora_variant", {})
        and not layer.use_dora.get(name, False)
        and layer.lora_B[name].bias is None
        and _frozen(base)
        and isinstance(dropout, (nn.Dropout, nn.Identity))
    )


def _frozen(layer) -> bool:
    from transformers.pytorch_utils import Conv1D

    from loraplace.plan.roles import is_adaptable

    return (
        is_adaptable(layer)
        and type(layer).forward in (nn.Linear.forward, Conv1D.forward)  # not a quantized layer
        and layer.weight.dim() == 2
        and not layer.weight.requires_grad
        and (layer.bias is None or not layer.bias.requires_grad)
    )


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def accelerate(
    model: nn.Module,
    fused_lora: bool = True,
    onednn: bool = True,
    fused_mlp: bool = False,
    bf16_products: bool = False,
    table: dict | None = None,
) -> dict:
    """Give supported layers the fused LoRA function and/or oneDNN frozen products, and SwiGLU
    blocks the fused silu(gate) * up, in place. Returns how many of each it took over.

    With `onednn`, `table` ({"OUTxIN": [forward, input gradient]}, `hardware.product_table`)
    says per weight shape which of a layer's two float32 products go through oneDNN; without
    it, both do.

    With `bf16_products` (and oneDNN) each float32 frozen weight those layers multiply by also
    gets a bfloat16 copy, used for their products while gradients are taken (training);
    evaluation keeps float32. The copies assume frozen weights: made once, never refreshed.
    """
    onednn = onednn and onednn_available()
    taken = {"fused_lora": 0, "onednn_frozen": 0, "fused_mlp": 0, "bf16_products": 0}
    fused_bases: set[int] = set()  # run only through PEFT's own forward: no copy for them

    def libraries(weight) -> tuple[bool, bool]:
        if table is None:
            return (onednn, onednn)
        return directions(table.get("x".join(map(str, weight.shape)), [True, True]))

    def give_low(module, weight):
        if bf16_products and onednn and weight.dtype == torch.float32:
            module._bf16_weight = weight.detach().to(
                torch.bfloat16, memory_format=torch.contiguous_format
            )
            taken["bf16_products"] += 1

    for module in model.modules():
        if fused_mlp and not hasattr(module, "_mlp_forward") and _is_swiglu(module):
            module._mlp_forward = module.forward
            module.forward = partial(_swiglu_forward, module)
            taken["fused_mlp"] += 1
        if hasattr(module, "_peft_forward") or hasattr(module, "_plain_forward"):
            continue
        if fused_lora and _lora_supported(module):
            module._peft_forward = module.forward
            module._fused_onednn = libraries(_weight(module.get_base_layer()))
            module.forward = partial(_lora_forward, module)
            taken["fused_lora"] += 1
            fused_bases.add(id(module.get_base_layer()))
            give_low(module, _weight(module.get_base_layer()))
        elif onednn and _frozen(module):  # also a LoRA layer's base, for PEFT's own forward
            module._plain_forward, module._onednn = module.forward, libraries(_weight(module))
            module.forward = partial(_frozen_forward, module)
            taken["onednn_frozen"] += 1
            if id(module) not in fused_bases:
                give_low(module, _weight(module))
    return taken
