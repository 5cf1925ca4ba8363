"""Shared fixtures: tiny random causal LMs built from configs (no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# No test reaches the network: set before transformers / huggingface_hub read them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tiny import GPT2, save_tiny_gpt2  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # bench.py, gpubench.py: outside the package
SHARED = REPO.parent / "shared"
ALPACA_HEAD = SHARED / "data" / "alpaca_head200.json"
DIALOGPT = SHARED / "models" / "dialogpt-medium"

# Every architecture the role classifier must handle, at toy size.
TINY = {
    "gpt2": GPT2,
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    ),
    "mistral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    ),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=128,
    ),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        vocab_size=128,
    ),
    "falcon": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, vocab_size=128),
    "phi": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=128,
    ),
    "gemma": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    ),
}


def tiny_config(kind: str):
    return AutoConfig.for_model(kind, **TINY[kind])


def tiny_model(kind: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(tiny_config(kind))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with a real GPT-2-style byte-level tokenizer, saved like a hub model."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_study(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """A finished two-seed study of three strategies on the tiny model, built through the CLI."""
    from loraplace.cli import main

    out = tmp_path_factory.mktemp("tiny-study") / "out"
    argv = ["study", "--model", str(tiny_gpt2_dir), "--data", str(ALPACA_HEAD), "--train-split", "train[:8]",
            "--eval-split", "train[100:106]", "--epochs", "1", "--strategy", "full", "--strategy", "attention",
            "--strategy", "ffn", "--seed", "1", "--seed", "2", "--set", "max_length=64", "--set", "loss_on=all", "--set", "generations=2",
            "--set", "max_new_tokens=4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out
