"""Instruction data: load, slice, format with the Alpaca template, tokenize, collate.

    rows = load_rows("../shared/data/alpaca_head200.json", "train[:100]")
    examples = tokenize(rows, tokenizer, max_length=256, loss_on="all")
    batch = Collator(tokenizer.pad_token_id)(examples[:4])   # padded to the longest

Sources: `embedded` (loraplace's own generated data), a local JSON / JSONL file of
instruction/input/output records, or a Hugging Face datasets id. Labels are built before padding,
so padding is never trained on while a real EOS always is, even when pad == eos (GPT-2).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplace.core.errors import UserError
from loraplace.core.modes import evaluating
from loraplace.data import embedded as embedded_data

FIELDS = ("instruction", "input", "output")
IGNORE = -100
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
EMBEDDED_ROWS = 1000


def prompt(row: dict) -> str:
    return (PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT).format(**row)


def _slice(spec: str, n_rows: int, source: str) -> slice:
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d*)(%?)\s*:\s*(-?\d*)(%?)\s*\])?\s*", spec)
    if not m:
        raise UserError(f"split {spec!r} is not of the form train[a:b] (rows a to b-1, or percent)")
    lo, hi = m[2] or "", m[4] or ""
    lo = int(lo) * n_rows // 100 if m[3] and lo else int(lo or 0)
    hi = int(hi) * n_rows // 100 if m[5] and hi else (int(hi) if hi else n_rows)
    lo, hi = (lo + n_rows if lo < 0 else lo), (hi + n_rows if hi < 0 else hi)
    if lo >= n_rows and n_rows:
        raise UserError(f"split {spec!r} starts at row {lo} but {source} has {n_rows} rows")
    if lo >= hi:
        raise UserError(f"split {spec!r} selects no rows")
    if hi > n_rows or lo < 0:
        raise UserError(
            f"split {spec!r} asks for rows {lo} to {hi - 1} but {source} has {n_rows} rows"
        )
    return slice(lo, hi)


def _read_file(path: Path) -> list:
    jsonl = path.suffix == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8")
        data = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if jsonl
            else json.loads(text)
        )
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            f"data file {str(path)!r} is not valid JSON{' lines' if jsonl else ''}"
        ) from None
    if isinstance(data, dict):  # {"train": [...]} is accepted too
        data = data.get("train", data)
    if not isinstance(data, list):
        raise UserError(f"data file {str(path)!r} must hold a list of records")
    return data


def _check_rows(rows: list, source: str) -> list[dict]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"instruction", "output"} <= set(row):
            raise UserError(f"record {i} of {source} lacks the fields instruction, input, output")
        if not all(isinstance(row.get(k) or "", str) for k in FIELDS):
            raise UserError(f"record {i} of {source} has a field that is not text")
    return [{k: row.get(k, "") or "" for k in FIELDS} for row in rows]


def _hub_rows(data: str, split: str) -> list[dict]:
    import datasets
    from datasets.exceptions import DatasetsError

    name = split.split("[")[0]
    try:
        ds = datasets.load_dataset(data, split=name)
    except (OSError, ValueError, RuntimeError, DatasetsError) as err:
        # OSError: not on the hub, the hub unreachable or offline (DatasetNotFoundError,
        # ConnectionError, HTTP errors); ValueError: no such split or config; RuntimeError: a
        # script dataset, which `datasets` no longer runs; DatasetsError: a download or build
        # that failed (checksums, generation)
        raise UserError(
            f"cannot load dataset {data!r} ({type(err).__name__}); without the Hugging Face hub use "
            "--data embedded or a local JSON file of instruction/input/output records"
        ) from None
    return _check_rows(list(ds), f"dataset {data!r}")


def load_rows(data: str, split: str) -> list[dict]:
    """The records of `split` (e.g. 'train[:100]') from `data`."""
    if data == "embedded":
        rows, source = embedded_data.records(EMBEDDED_ROWS), "the embedded dataset"
    elif Path(data).expanduser().is_file():
        name = re.match(r"\s*(\w*)", split)[1]
        if name and name != "train":
            raise UserError(
                f"a local data file has one split, 'train' (slice it: train[a:b]), not {split!r}"
            )
        rows, source = _check_rows(_read_file(Path(data).expanduser()), f"{data!r}"), f"{data!r}"
    elif data.endswith((".json", ".jsonl")) or data.startswith((".", "/", "~")):
        raise UserError(f"data file {data!r} does not exist")
    else:
        rows, source = _hub_rows(data, split), f"dataset {data!r}"
    return rows[_slice(split, len(rows), source)]


def dataset_name(data: str) -> str:
    return embedded_data.NAME if data == "embedded" else data


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize(rows: list[dict], tokenizer, max_length: int, loss_on: str = "all") -> list[Example]:
    """Prompt + response + EOS, truncated to max_length; prompt tokens masked if loss_on='response'."""
    examples = []
    for row in rows:
        head = tokenizer(prompt(row), add_special_tokens=False)["input_ids"]
        tail = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        bos = (
            [tokenizer.bos_token_id]
            if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
            else []
        )
        ids = (bos + head + tail)[:max_length]
        n_prompt = len(bos) + len(head)
        # Position 0 is never a target (nothing precedes it); marking it keeps Trainer's count of
        # target tokens, which does not always shift the labels, equal to the true count.
        labels = [
            IGNORE if i == 0 or (loss_on == "response" and i < n_prompt) else t
            for i, t in enumerate(ids)
        ]
        examples.append(Example(ids, labels))
    return examples


@dataclass
class Collator:
    """Right-pads a batch to its longest sequence (or to `pad_to` tokens); padding gets no loss."""

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = (
                torch.tensor(e.input_ids),
                torch.tensor(e.labels),
                1,
            )
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class PackedCollator:
    """Packs a batch into rows with a block-diagonal causal mask: no padding at all.

    Positions restart at every example and no token attends across examples, so each example's
    loss is what it would be alone; the first token of each example gets no label (nothing
    before it in its own sequence predicts it). The loss over a row is then the token-weighted
    mean over its examples, exactly what gradient accumulation over the examples computes.

    With `max_tokens`, the batch is split into as few chunks of at most that many tokens as a
    longest-first fit finds, as even in size as it can make them (fewer, larger matrix products;
    an example longer than that is a chunk of its own), returned as
    {"chunks": [row, ...], "labels": all labels, "targets": each chunk's target tokens}, for
    `ChunkedTrainer` to run one at a time.
    The grouping does not change the step's gradient: every chunk is weighted by its tokens.
    """

    max_tokens: int | None = None
    segments: bool = False  # also pass the example boundaries, for segment attention
    # How a row tells its examples apart: "mask", the block-diagonal mask above (the CPU path);
    # "positions", transformers' padding-free rows (DataCollatorWithFlattening: positions restart,
    # the model's attention derives the blocks from them); "varlen", those plus FlashAttention's
    # varlen arguments (cu_seq_lens, max_length), for flash_attention_2.
    form: str = "mask"

    def pack(self, batch: list[Example]) -> dict:
        if self.form != "mask":
            from transformers import DataCollatorWithFlattening

            flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=self.form == "varlen")
            row = flatten([{"input_ids": e.input_ids, "labels": e.labels} for e in batch])
            return row | {"use_cache": False}  # with a cache, the blocks are not derived
        ids = torch.tensor([t for e in batch for t in e.input_ids])
        labels = torch.tensor(
            [IGNORE if i == 0 else t for e in batch for i, t in enumerate(e.labels)]
        )
        positions = torch.cat([torch.arange(len(e.input_ids)) for e in batch])
        segment = torch.cat([torch.full((len(e.input_ids),), i) for i, e in enumerate(batch)])
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        mask = causal & (segment[:, None] == segment[None, :])  # (tokens, tokens)
        bounds = {}
        if self.segments:
            lengths = torch.tensor([0] + [len(e.input_ids) for e in batch])
            bounds = {"cu_seq_lens_q": lengths.cumsum(0).to(torch.int32)}
        return bounds | {
            "input_ids": ids[None],
            "position_ids": positions[None],
            "attention_mask": mask[None, None],  # (batch 1, heads 1, tokens, tokens)
            "labels": labels[None],
        }

    def __call__(self, batch: list[Example]) -> dict:
        if self.max_tokens is None:
            return self.pack(batch)
        chunks = [
            self.pack([batch[i] for i in g])
            for g in balanced_groups([len(e.input_ids) for e in batch], self.max_tokens)
        ]
        # each chunk's target tokens, counted here on the CPU: the trainer weighs the chunks by
        # them without reading tensors back from a GPU at every step
        targets = [int((c["labels"][..., 1:] != IGNORE).sum()) for c in chunks]
        labels = torch.cat([c["labels"] for c in chunks], dim=1)
        return {"chunks": chunks, "labels": labels, "targets": targets}


def balanced_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens: start with the fewest bins the
    total allows, put each example (longest first) into the least-filled bin it fits, open a new
    bin only when none fits. Each bin keeps the batch's order."""
    bins: list[list[int]] = [[] for _ in range(max(1, -(-sum(lengths) // capacity)))]
    loads = [0] * len(bins)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if not bins[b] or loads[b] + lengths[i] <= capacity]
        if not fits:
            bins.append([])
            loads.append(0)
            fits = [len(bins) - 1]
        b = min(fits, key=lambda b: loads[b])
        bins[b].append(i)
        loads[b] += lengths[i]
    return sorted((sorted(b) for b in bins if b), key=lambda b: b[0])


def to_device(batch: dict, device: str) -> dict:
    """A batch's tensors on `device` (FlashAttention's max_length stays a Python int)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def packing_is_exact(
    model,
    device: str = "cpu",
    tolerance: float = 1e-4,
    segments: bool = False,
    form: str = "mask",
) -> bool:
    """Check on this model that a packed row (of `form`, see PackedCollator) gives every
    token of every example the loss it has when the example runs alone: the tokens' losses
    differ by at most `tolerance` nats on average (every token compared, not a sum in which
    differences could cancel).

    False where the model cannot take the packed row's arguments at all (its forward takes no
    position_ids, or, with `segments`, no example boundaries): a verdict on the model. A
    forward that raises is no verdict: the error goes to the caller."""
    deltas = packing_token_deltas(model, device, segments, form)
    return deltas is not None and float(deltas.abs().mean()) <= tolerance


@torch.no_grad()
def packing_token_deltas(
    model, device: str = "cpu", segments: bool = False, form: str = "mask", leak: bool = False
) -> torch.Tensor | None:
    """Every target token's loss in a packed row of three examples minus its loss with its
    example alone; None where the model's forward takes no such row. `leak`: positions that do
    not restart, so examples see the ones before them (how the check's tolerances were set
    apart from a real leak)."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 1000)
    examples = [
        Example(ids, ids)
        for ids in (torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (9, 14, 6))
    ]
    packed = PackedCollator(segments=segments, form=form).pack(examples)
    if leak:
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    if not _forward_takes(model, packed):
        return None
    with evaluating(model):
        alone = torch.cat([_token_losses(model, Collator(0)([e]), device)[0] for e in examples])
        together = _token_losses(model, packed, device)[0]
    starts = torch.tensor([0] + [len(e.input_ids) for e in examples]).cumsum(0)[:-1].tolist()
    # a packed row's token t predicts t + 1: drop each example's last position, which predicts
    # the next example's first token
    keep = torch.ones(together.shape[0], dtype=torch.bool)
    keep[[s - 1 for s in starts[1:]]] = False
    return together[keep] - alone


def _token_losses(model, batch: dict, device: str) -> torch.Tensor:
    """(rows, tokens - 1): each position's loss predicting the next input token, in float32."""
    inputs = {k: v for k, v in to_device(batch, device).items() if k != "labels"}
    logits = model(**inputs).logits.float()
    targets = inputs["input_ids"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


def _forward_takes(model, inputs: dict) -> bool:
    """Whether model(**inputs) passes only keywords its forward takes (by name or **kwargs)."""
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params) or set(inputs) <= {p.name for p in params}
