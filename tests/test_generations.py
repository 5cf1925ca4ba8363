"""Greedy generations for the report: prompts generated together give what each gives alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplace.train.evaluate import greedy_generations


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_generations_equal_one_at_a_time(tiny_gpt2_dir, kind):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = (
        AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir) if kind == "gpt2" else tiny_model(kind)
    )
    with torch.no_grad():  # a random model repeats itself; sharpen it so the texts differ
        model.get_output_embeddings().weight.mul_(8)
    prompts = ["Name three colours.", "Hi", "Write a very short poem about the sea, please."]
    together = greedy_generations(model, tokenizer, prompts, max_new_tokens=6)
    alone = [greedy_generations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert len(set(together)) > 1 and all(together)
    assert greedy_generations(model, tokenizer, [], max_new_tokens=6) == []
