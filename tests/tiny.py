"""Tiny random models saved like hub models: for the tests (conftest.py) and the GPU benchmark's
dry run (benchmarks/gpubench.py --dry-run). No downloads.

    save_tiny_gpt2(folder)    # GPT-2, 4 layers of 32, a one-token-per-ASCII-character tokenizer
    save_tiny_llama(folder)   # Llama, 2 layers of 64 (GQA), weights only
"""

from __future__ import annotations

from pathlib import Path

import torch

GPT2 = dict(n_embd=32, n_layer=4, n_head=4, n_positions=512, vocab_size=128, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
EOS = "<|endoftext|>"


def save_tiny_gpt2(path: Path) -> Path:
    """A tiny random GPT-2 with a real GPT-2-style byte-level tokenizer, saved like a hub model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = Path(path)
    vocab = {chr(i): i for i in range(127)} | {EOS: 127}  # one token per ASCII character
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS).save_pretrained(
        path
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2, bos_token_id=127, eos_token_id=127))
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return Path(path)
