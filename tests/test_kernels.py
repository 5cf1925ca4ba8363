"""The fused LoRA layer computes what PEFT computes: same outputs, same gradients."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from loraplace.fast.hardware import Machine
from loraplace.fast.kernels import (
    LANES,
    LoraLinear,
    accelerate,
    drop_threshold,
    keep_mask,
    random_lanes,
)

LLAMA = LlamaConfig(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
GPT2 = GPT2Config(
    vocab_size=100, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
)
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: fan_in_fan_out
}


def _peft_pair(arch: str, targets: list[str] | None = None, **lora):
    torch.manual_seed(0)
    config = LLAMA if arch == "llama" else GPT2
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets or TARGETS[arch], **lora),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapter path matter
            torch.nn.init.normal_(p, std=0.1)
    return model, copy.deepcopy(model)


def _train_step_losses(*models) -> list[float]:
    """Each model's loss on one fixed batch, its gradients left in place."""
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in models:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_loss_and_gradients_as_peft(arch):
    peft_model, fast_model = _peft_pair(arch, lora_dropout=0.0, fan_in_fan_out=arch == "gpt2")
    taken = accelerate(fast_model)
    assert taken["fused_lora"] == (14 if arch == "llama" else 8)
    assert taken["onednn_frozen"] == taken["fused_lora"] + 1  # + the output head
    losses = _train_step_losses(peft_model, fast_model)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    fast_grads = dict(fast_model.named_parameters())
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[name].grad, p.grad, rtol=1e-5, atol=1e-7)


def test_dropout_gradients_match_autograd_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    weight_t, bias = torch.randn(8, 6), torch.randn(6)  # frozen, stored (in, out)
    a = torch.randn(2, 8, requires_grad=True)
    b = torch.randn(6, 2, requires_grad=True)
    lanes = random_lanes(x.shape, x.device)
    mask = keep_mask(lanes, 0.3)
    scale = LANES / (LANES - drop_threshold(0.3))
    fast = LoraLinear.apply(x, weight_t.t(), bias, a, b, 1.5, lanes, 0.3, True)
    reference = x @ weight_t + bias + ((x * mask * scale) @ a.t() @ b.t()) * 1.5
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(fast)
    grads = torch.autograd.grad(fast, (x, a, b), upstream)
    expected = torch.autograd.grad(reference, (x, a, b), upstream)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_backward_keeps_the_shared_input_not_masked_copies():
    """q, k and v read one input: their functions keep that one float tensor and int16 lanes."""
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    layers = [(torch.randn(n, 16), torch.randn(4, 16, requires_grad=True), torch.randn(n, 4))
              for n in (16, 8, 8)]  # fmt: skip
    kept = []

    def keep(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        for weight, a, b in layers:
            LoraLinear.apply(x, weight, None, a, b, 2.0, random_lanes(x.shape, "cpu"), 0.1, False)
    params = {t.untyped_storage().data_ptr() for layer in layers for t in layer}
    floats = {
        t.untyped_storage().data_ptr()
        for t in kept
        if t.numel() >= x.numel() and t.dtype == torch.float32
    }
    assert floats - params == {x.untyped_storage().data_ptr()}
    assert sum(t.dtype == torch.int16 for t in kept) == 3  # one set of lanes a layer


def test_mask_keeps_each_lane_with_probability_one_minus_p():
    torch.manual_seed(0)
    lanes = random_lanes(torch.Size([400_000]), torch.device("cpu"))
    mask = keep_mask(lanes, 0.1)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(mask.bool(), lanes >= drop_threshold(0.1) - LANES // 2)
    for lane in mask.view(-1, 4).t():  # the 4 lanes of every 64-bit random word
        assert lane.mean().item() == pytest.approx(0.9, abs=0.003)
    assert drop_threshold(0.1) / LANES == pytest.approx(0.1, abs=1e-5)


def test_lanes_follow_torch_manual_seed():
    shape = torch.Size([3, 1001])  # not a multiple of 4 lanes
    torch.manual_seed(7)
    first, second = random_lanes(shape, "cpu"), random_lanes(shape, "cpu")
    torch.manual_seed(7)
    assert torch.equal(random_lanes(shape, "cpu"), first)
    assert not torch.equal(first, second)
    assert first.dtype == torch.int16 and first.shape == shape


def test_mask_at_the_ends_of_the_lane_range():
    lanes = torch.tensor([-32768, -32767, 0, 32766, 32767], dtype=torch.int16)
    assert keep_mask(lanes, 1e-7).tolist() == [1.0] * 5  # rounds to p = 0: keep all
    assert keep_mask(lanes, 1 - 1e-7).tolist() == [0.0] * 5  # rounds to p = 1: drop all
    assert keep_mask(lanes, 1 - 2 / LANES).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_training_dropout_is_random_and_eval_is_not():
    _, model = _peft_pair("llama", lora_dropout=0.5)
    accelerate(model)
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(1))
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_disable_adapter_gives_the_base_model():
    peft_model, fast_model = _peft_pair("llama", lora_dropout=0.0)
    accelerate(fast_model)
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(1))
    with fast_model.disable_adapter():
        base = fast_model(input_ids=ids).logits
    adapted = fast_model(input_ids=ids).logits
    with peft_model.disable_adapter():
        torch.testing.assert_close(base, peft_model(input_ids=ids).logits)
    assert not torch.allclose(base, adapted)


def test_layers_it_cannot_reproduce_keep_peft_forward():
    _, model = _peft_pair("llama", lora_dropout=0.0, use_dora=True)
    assert accelerate(model)["fused_lora"] == 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("targets", ["all", "attention"])  # gate/up/down adapted, or plain Linear
def test_fused_mlp_gives_the_same_loss_and_gradients(targets, dropout):
    modules = TARGETS["llama"] if targets == "all" else TARGETS["llama"][:4]
    model, fused = _peft_pair("llama", modules, lora_dropout=dropout)
    assert accelerate(fused, fused_lora=True, onednn=False, fused_mlp=True)["fused_mlp"] == 2
    accelerate(model, fused_lora=True, onednn=False, fused_mlp=False)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (model, fused):
        torch.manual_seed(5)  # the same dropout lanes, drawn in the same order
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == losses[1]  # the same floating-point operations
    fused_params = dict(fused.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(fused_params[name].grad, p.grad), name


def test_fused_mlp_keeps_no_copy_of_the_down_projection_input():
    """With down adapted, the block keeps gate and up, not also silu(gate) * up."""
    model, fused = _peft_pair("llama", lora_dropout=0.1)
    accelerate(model, fused_lora=True, onednn=False, fused_mlp=False)
    accelerate(fused, fused_lora=True, onednn=False, fused_mlp=True)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(1))
    kept = {}
    for m in (model, fused):
        storages, params = {}, {p.untyped_storage().data_ptr() for p in m.parameters()}

        def keep(t, storages=storages, params=params):
            wide = t.dim() >= 2 and t.shape[-1] == LLAMA.intermediate_size
            if wide and t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            m(input_ids=ids, labels=ids).loss.backward()
        kept[m is fused] = len(storages)
    # a layer (of 2): gate and up; autograd's own: gate, silu(gate), up and the down input
    assert kept == {False: 2 * 4, True: 2 * 2}


def test_fused_mlp_leaves_other_blocks_alone():
    gelu = AutoModelForCausalLM.from_config(
        LlamaConfig(**(LLAMA.to_dict() | {"hidden_act": "gelu"}))
    )
    assert accelerate(gelu, fused_lora=False, onednn=False, fused_mlp=True)["fused_mlp"] == 0
    gpt2 = AutoModelForCausalLM.from_config(GPT2)
    assert accelerate(gpt2, fused_lora=False, onednn=False, fused_mlp=True)["fused_mlp"] == 0


def test_onednn_caches_are_capped_unless_the_user_chose(monkeypatch):
    import os

    from loraplace.fast.kernels import limit_onednn_caches

    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    limit_onednn_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == "16"  # else ideep keeps a primitive per length
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


@pytest.mark.skipif(
    not Machine.here().bf16_products,
    reason="oneDNN builds no bfloat16 product on this CPU (no AVX-512 BF16 / AMX, or ISA capped)",
)
def test_bf16_products_train_close_to_float32_and_evaluate_exactly():
    """Training's frozen products in bfloat16: each step's loss within 1 % of float32's, and the
    same adapters evaluate (no gradients) exactly as float32 does."""
    reference, low = _peft_pair("llama", lora_dropout=0.1)
    accelerate(reference)
    assert accelerate(low, bf16_products=True)["bf16_products"] == 14 + 1  # + the head
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, m in (("float32", reference), ("bfloat16", low)):
        torch.manual_seed(5)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.setdefault(name, []).append(float(loss))
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.01)
    assert losses["bfloat16"] != losses["float32"]  # the products did run in bfloat16
    low.load_state_dict(reference.state_dict())
    low.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(low(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_without_gradients_the_same_outputs_and_no_autograd_functions(monkeypatch):
    from loraplace.fast import kernels

    _, model = _peft_pair("llama", lora_dropout=0.0)
    accelerate(model)
    model.eval()
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(1))
    with_graph = model(input_ids=ids).logits
    calls = []
    for cls in (kernels.LoraLinear, kernels.FrozenLinear):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, real=real: calls.append(1) or real(*a))
    with torch.no_grad():  # evaluation and generation
        without = model(input_ids=ids).logits
    assert with_graph.grad_fn is not None and torch.equal(with_graph, without)
    assert calls == []


@pytest.mark.skipif(not Machine.here().onednn, reason="torch here has no oneDNN")
def test_products_of_a_few_rows_take_the_default_blas_where_onednn_was_chosen(monkeypatch):
    from loraplace.fast.kernels import ONEDNN_MIN_ROWS, linear

    real, rows_seen = torch.ops.mkldnn._linear_pointwise, []

    def spy(x, *rest):
        rows_seen.append(x.shape[0])
        return real(x, *rest)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    weight = torch.randn(16, 8)
    for rows in (1, ONEDNN_MIN_ROWS - 1, ONEDNN_MIN_ROWS, 64):  # decoding steps: a row or a few
        x = torch.randn(rows, 8)
        torch.testing.assert_close(linear(x, weight, None, onednn=True), x @ weight.t())
    assert rows_seen == [ONEDNN_MIN_ROWS, 64]
