"""Which fast paths a run takes on the model at hand: each one's start-of-run check, what falls
back (with a note), and the adapters attached with the fused functions that hold.

    notes = Notes()
    head = check_head(model, "cpu", paths, products, notes)   # the blocked head loss: exact here?
    plan = batching(cfg, model, tokenizer, paths, notes)     # packed where checked exact
    model, taken = adapt(model, spec.plan, cfg, paths, notes, products, plan["packed"], head)

A check is remembered per architecture and machine (`fast.hardware.remembered_check`); one that
raised is no verdict: the switch is off for this run, with the error in its note.
"""

from __future__ import annotations

from loraplace.config import StudyConfig
from loraplace.data.rows import Collator, PackedCollator, packing_is_exact
from loraplace.fast.hardware import Paths, remembered_check


def pack_rows(cfg: StudyConfig, device: str) -> int:
    """Tokens per packed training chunk. On a CPU, rows of 1.5 x max_length (the step's
    micro-batches in a few chunks: products of that size run near the CPU's peak, and
    a chunk's activations stay small); elsewhere the whole step as one row (a GPU is
    fastest with few, large launches)."""
    if cfg.pack_tokens:
        return cfg.pack_tokens
    if device == "cpu":
        return cfg.max_length * 3 // 2
    return cfg.batch_size * cfg.grad_accum * cfg.max_length


class Notes(list):
    """Fast paths a run asked for and could not take here, each said once, in the log and in
    result.json."""

    def add(self, switch: str, why: str) -> None:
        self.append({"switch": switch, "why": why})
        print(f"  note: {switch} is off for this run: {why}", flush=True)


# How far a packed row's per-token losses may be, on average, from each example's own (nats a
# token), per precision. Measured on CPU (docs/gpu.md, 2026-12-06), the embedded SmolLM2 with
# its real weights: exact rows differ by 5e-6 in float32, 9e-3 in fp16 and 6e-2 in bf16 (their
# own rounding), rows that leak across examples by 1.4 in all three; tiny random models' leaks
# by 2.5e-2 and more, their exact rows by under 2e-4. Each tolerance lies several times above
# the exact rows' and below the leaks'.
PACKING_TOLERANCE = {"float32": 1e-3, "bf16": 0.25, "fp16": 0.05}


def batching(cfg: StudyConfig, model, tokenizer, paths: Paths, notes: Notes) -> dict:
    """How training and evaluation batch their examples: packed where checked exact."""
    from loraplace.fast.segments import use_segment_attention

    device, form = paths.device, paths.packed_rows
    pad_to = cfg.max_length if cfg.pad_to == "max_length" else None
    wanted = cfg.packing and cfg.fuse_accumulation and pad_to is None
    tolerance = PACKING_TOLERANCE[paths.precision]
    exact = (wanted or cfg.pack_eval) and checked(
        notes, "packing", "packing", model, device, packing_is_exact, tolerance, False, form
    )
    packed = bool(wanted and exact)
    if wanted and exact is False:
        notes.add("packing", "packed rows did not give each example its own loss on this model")
    # segment attention is one of our CPU functions: with the library's rows it is off, as they are
    segments, wants_segments = False, packed and cfg.segment_attention and form == "mask"
    if wants_segments and paths.attention != "sdpa":
        notes.add("segment_attention", f"it replaces SDPA, and attention is {paths.attention}")
    elif wants_segments:
        segments = use_segment_attention(model)
        if not segments:
            notes.add("segment_attention", "the model does not run SDPA attention")
        elif not (
            ok := checked(notes, "segment_attention", "segments", model, device,
                          packing_is_exact, PACKING_TOLERANCE["float32"], True)
        ):  # fmt: skip
            model.set_attn_implementation("sdpa")
            segments = False
            if ok is False:
                notes.add("segment_attention", "attention per example was not exact on this model")
    collate = Collator(tokenizer.pad_token_id, pad_to)
    if packed:
        collate = PackedCollator(pack_rows(cfg, device), segments, form)
    eval_packed = cfg.pack_eval and bool(exact)
    if cfg.pack_eval and not exact:
        why = (
            "its check raised"
            if exact is None
            else "packed rows did not give each example its own loss"
        )
        notes.add("pack_eval", f"{why} on this model")
    eval_collate = Collator(tokenizer.pad_token_id)  # both paths: the same evaluation
    if eval_packed:  # no padding; rows of up to eval_batch_size x max_length tokens, as padded
        eval_collate = PackedCollator(cfg.eval_batch_size * cfg.max_length, segments, form)
    return {"packed": packed, "segments": segments, "collate": collate,
            "eval_packed": eval_packed, "eval_collate": eval_collate}  # fmt: skip


def check_head(model, device: str, paths: Paths, products: dict, notes: Notes) -> dict:
    """Whether the head-and-loss functions give this model's loss, with the default BLAS and
    with the head's chosen libraries: checked once, here, for training and evaluation."""
    from loraplace.fast.headloss import head_loss_matches

    if not paths.cpu_kernels:  # a float32 CPU function: not for this base
        return {"blocks": False, "onednn": (False, False)}
    pair = tuple(products.get("head", (paths.onednn_head,) * 2))
    blocks = bool(
        checked(notes, "fused_head_loss", "head", model, device, head_loss_matches, 1e-4,
                (False, False))
    )  # fmt: skip
    if any(pair) and not (
        blocks
        and (
            ok := checked(
                notes, "onednn_head", "head", model, device, head_loss_matches, 1e-4, pair
            )
        )
    ):
        if blocks and ok is False:
            notes.add("onednn_head", "the head's products through oneDNN were not exact here")
        pair = (False, False)
    return {"blocks": blocks, "onednn": pair}


def checked(notes: Notes, switch: str, name: str, model, device: str, check, *args) -> bool | None:
    """`remembered_check`'s answer, or None where the check raised: the switch is off for this
    run, with the error in its note, and nothing is remembered for the next run."""
    try:
        return remembered_check(name, model, device, check, *args)
    except (RuntimeError, ValueError) as err:  # NotImplementedError, out of memory included
        first = (str(err).strip().splitlines() or [""])[0][:200]
        notes.add(switch, f"its start-of-run check raised {type(err).__name__}: {first}")
        return None


def eval_head(batching: dict, head: dict) -> str | None:
    """How evaluation computes the head's loss: in blocks (through oneDNN where chosen), no
    whole logits, wherever evaluation is packed; the same for every run of a study."""
    if batching["eval_packed"] and head["blocks"]:
        return "onednn" if head["onednn"][0] else "blocks"
    return None


def adapt(model, plan, cfg: StudyConfig, paths: Paths, notes: Notes, products: dict, packed: bool,
          head: dict):  # fmt: skip
    """Attach exactly the planned adapters (`plan`, an AdapterPlan), then the fused functions
    that hold on this model; (the model, what was taken)."""
    from loraplace.fast.headloss import head_is_frozen
    from loraplace.fast.kernels import accelerate
    from loraplace.plan.adapters import attach

    cpu = paths.cpu_kernels
    model = attach(model, plan, cfg.alpha, cfg.dropout, cfg.bias, cfg.alpha_scaling,
                   cfg.rank)  # fmt: skip
    bf16 = paths.product_dtype == "bfloat16"
    taken = accelerate(model, cfg.fused_lora and cpu, paths.onednn, cfg.fused_mlp and cpu,
                       bf16, products.get("decoder"))  # fmt: skip
    if cfg.fused_lora and plan.ranks and cpu and not taken["fused_lora"]:
        notes.add("fused_lora", "no adapted layer is one the fused function reproduces exactly")
    if bf16 and not taken["bf16_products"]:
        notes.add("product_dtype", "no frozen float32 product to run in bfloat16")
    fused_head = packed and cfg.fused_head_loss and head["blocks"] and head_is_frozen(model)
    if packed and cfg.fused_head_loss and cpu and not fused_head:
        notes.add("fused_head_loss", "the model's own loss differs from the blocked head loss")
    taken["fused_head"] = bool(fused_head)
    taken["head_libraries"] = head["onednn"] if fused_head else (False, False)
    taken["liger"] = paths.liger and liger_applies(model)
    if paths.liger and not taken["liger"]:
        notes.add("liger_kernel", f"Liger has no functions for {model.config.model_type} models")
    return model, taken


def liger_applies(model) -> bool:
    """Whether Liger Kernel patches this model's architecture (the Trainer's
    `use_liger_kernel` does nothing for the others, GPT-2 among them)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return model.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
