"""Attention over packed rows, one example at a time: no masked blocks computed.

    use_segment_attention(model)               # once, after loading
    model(**chunk, cu_seq_lens_q=bounds)      # bounds: [0, len_1, len_1 + len_2, ...]

A packed row of several examples with a block-diagonal causal mask makes SDPA compute the whole
T x T score matrix and throw most of it away. Given the example boundaries, this computes causal
attention for each example on its own (SDPA with `is_causal`, no mask), which is what the mask
says, with the work of sum(len^2) instead of T^2. Without boundaries, or for attention this
cannot reproduce (sliding windows, soft-capping, attention sinks, biases), it is SDPA unchanged.
Whether it holds on a given model is checked at run start (`data.packing_is_exact`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "loraplace_segments"


def segment_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    unsupported = (
        bounds is None
        or query.shape[0] != 1
        or query.shape[2] != key.shape[2]
        or getattr(module, "sliding_window", None) is not None
        or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    )
    if unsupported:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cuts = bounds.tolist()
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, a:b],
                key[:, :, a:b],
                value[:, :, a:b],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def use_segment_attention(model) -> bool:
    """Switch a model that runs SDPA to segment attention; False (and unchanged) otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks exactly as SDPA gets them
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, TypeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME
