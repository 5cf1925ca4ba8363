"""Segment attention on packed rows gives every example the loss it has alone."""

import pytest
import torch
from conftest import TINY, tiny_model

from loraplace.data.rows import Example, PackedCollator, packing_is_exact
from loraplace.fast.segments import NAME, use_segment_attention


@pytest.mark.parametrize("kind", sorted(TINY))
def test_segment_attention_is_exact_where_it_is_used(kind):
    model = tiny_model(kind).eval()
    if use_segment_attention(model):
        assert model.config._attn_implementation == NAME
        assert packing_is_exact(model, segments=True)
    else:
        assert model.config._attn_implementation != NAME


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_common_architectures_use_it(kind):
    assert use_segment_attention(tiny_model(kind))


def test_the_boundaries_matter():
    """The exactness check can fail: with the boundaries of one long example instead of three,
    later examples attend to earlier ones and their loss changes."""
    model = tiny_model("llama").eval()
    assert use_segment_attention(model)
    examples = [
        Example(list(range(5 + n, 15 + 2 * n)), list(range(5 + n, 15 + 2 * n))) for n in range(3)
    ]
    row = PackedCollator(segments=True).pack(examples)
    with torch.no_grad():
        right = model(**row).loss
        wrong = model(**(row | {"cu_seq_lens_q": row["cu_seq_lens_q"][[0, -1]]})).loss
    assert not torch.allclose(right, wrong)
