"""A model's weights and tokenizer, from a source `plan.models.resolve_model` found.

    model, tokenizer = load_model(resolve_model("embedded"))         # float32, ready for PEFT
    model, tokenizer = load_model(source, quantize="4bit", device="cuda", dtype=torch.bfloat16)

A quantized base (bitsandbytes: NF4 with double quantization as QLoRA, or LLM.int8) is placed
on its device as it loads; its linear layers stay `nn.Linear` subclasses, so placement and
PEFT see the same modules as on a float base.
"""

from __future__ import annotations

import torch

from loraplace.plan.models import (
    ModelSource,
    clear_quantized_flag,
    hub_call,
    load_tokenizer,
    pretrained_args,
)

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
    device: str = "cpu",
    attention: str | None = None,
):
    """The model with its weights and its tokenizer (a pad token is set if it has none)."""
    from transformers import AutoModelForCausalLM

    path, kwargs = pretrained_args(source)
    tokenizer = load_tokenizer(source)
    if attention:
        kwargs["attn_implementation"] = attention
    if quantize != "none":
        kwargs["quantization_config"] = bnb_config(quantize, dtype)
    if quantize != "none" or device != "cpu":  # straight onto the device, in `dtype`
        kwargs["device_map"] = {"": device}
    model = hub_call(source, AutoModelForCausalLM.from_pretrained, path, dtype=dtype, **kwargs)
    if source.kind == "gguf" and quantize == "none":  # de-quantized GGUF, not a bitsandbytes base
        clear_quantized_flag(model)
    if quantize == "4bit":
        keep_4bit_differentiable(model)
    return model, tokenizer


def bnb_config(quantize: str, compute: torch.dtype):
    """QLoRA's settings for 4 bits (NF4, double quantization, computing in `compute`)."""
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def keep_4bit_differentiable(model) -> None:
    """Turn off bitsandbytes' AVX-512 BF16 inference layout for 4-bit weights.

    On CPUs with AVX-512 BF16, a 4-bit layer's first forward without gradients (the base
    evaluation) repacks its weights for a kernel that has no backward pass, and every later
    forward, training's too, goes through that kernel; it also fails on layers narrower than
    one quantization block. LoRA needs the input gradient through every frozen layer."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
