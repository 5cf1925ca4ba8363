"""The blocked head loss is the model's own loss, with the same gradients, without whole logits."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from loraplace.data.rows import IGNORE
from loraplace.fast.headloss import (
    ROWS,
    LinearCrossEntropy,
    head_is_frozen,
    head_loss,
    head_loss_matches,
    head_token_losses,
)
from loraplace.fast.kernels import onednn_available

ONEDNN = [False] + ([True] if onednn_available() else [])


@pytest.mark.parametrize("onednn", ONEDNN)
def test_loss_and_hidden_gradient_equal_cross_entropy_across_blocks(onednn):
    gen = torch.Generator().manual_seed(0)
    n = 2 * ROWS + 44  # three blocks, the last one short
    hidden = torch.randn(n, 16, generator=gen, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=gen), torch.randn(50, generator=gen)
    targets = torch.randint(0, 50, (n,), generator=gen)
    targets[::7] = IGNORE
    targets[ROWS : 2 * ROWS] = IGNORE  # a block with nothing to predict

    ours = LinearCrossEntropy.apply(hidden, weight, bias, targets, onednn)
    (grad_ours,) = torch.autograd.grad(2.0 * ours, hidden)
    theirs = F.cross_entropy(
        hidden @ weight.T + bias, targets, ignore_index=IGNORE, reduction="sum"
    )
    (grad_theirs,) = torch.autograd.grad(2.0 * theirs, hidden)

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-6)
    assert not grad_ours[ROWS : 2 * ROWS].any()


@pytest.mark.parametrize("onednn", ONEDNN)
@pytest.mark.parametrize("kind", sorted(TINY))
def test_exact_on_every_tiny_architecture(kind, onednn):
    model = tiny_model(kind).requires_grad_(False)  # frozen, as under LoRA
    assert head_is_frozen(model)
    assert head_loss_matches(model, onednn=onednn)


def test_model_gradients_equal_the_models_own_loss():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :5] = IGNORE
    own = model(input_ids=ids, labels=labels).loss * int((labels[0, 1:] != IGNORE).sum())
    own_grads = torch.autograd.grad(own, [p for p in model.parameters() if p.requires_grad][:4])
    for p in model.get_output_embeddings().parameters():
        p.requires_grad_(False)  # the head is frozen in LoRA training
    ours = head_loss(model, {"input_ids": ids, "labels": labels})
    ours_grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad][:4])
    assert ours.item() == pytest.approx(own.item(), rel=1e-5)
    for a, b in zip(ours_grads, own_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_losses_are_the_models_and_skip_positions_without_a_target(monkeypatch):
    import loraplace.fast.headloss as headloss

    model = tiny_model("llama").requires_grad_(False)
    n = ROWS + 40  # two blocks of the head, were every position counted
    ids = torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, : ROWS - 20] = IGNORE  # a long prompt, masked as with loss_on response
    head_rows = []
    real_linear = headloss.linear
    monkeypatch.setattr(
        headloss, "linear", lambda x, *a, **k: head_rows.append(len(x)) or real_linear(x, *a, **k)
    )

    ours = head_token_losses(model, {"input_ids": ids, "labels": labels})[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    theirs = F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=IGNORE, reduction="none")

    torch.testing.assert_close(ours[:-1], theirs, rtol=1e-5, atol=1e-6)
    assert ours[-1] == 0
    assert sum(head_rows) == int((labels[0, 1:] != IGNORE).sum()) == 60


def test_refused_where_the_model_scales_its_logits_or_trains_its_head():
    cohere = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "cohere",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            logit_scale=0.5,
        )
    )
    for p in cohere.get_output_embeddings().parameters():
        p.requires_grad_(False)
    assert head_is_frozen(cohere)
    assert not head_loss_matches(cohere)
    trained_head = tiny_model("llama")  # requires_grad everywhere, the head too
    assert head_loss_matches(trained_head)
    assert not head_is_frozen(trained_head)
