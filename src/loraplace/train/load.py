"""A model's weights and tokenizer, from a source `plan.models.resolve` found.

model, tokenizer = load_model(resolve("embedded"))  # float32, ready for PEFT and Trainer
"""

from __future__ import annotations

import torch

from loraplace.plan.models import ModelSource, _hub_call, _pretrained_args, clear_quantized_flag


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """The model with its weights and its tokenizer (a pad token is set if it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = _pretrained_args(source)
    tokenizer = _hub_call(source, AutoTokenizer.from_pretrained, path, **kwargs)
    model = _hub_call(source, AutoModelForCausalLM.from_pretrained, path, dtype=dtype, **kwargs)
    if source.kind == "gguf":
        clear_quantized_flag(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
