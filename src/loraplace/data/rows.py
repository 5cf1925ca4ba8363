"""Training data: load, slice, tokenize with what each token teaches, collate, pack.

    rows = load_rows("../shared/data/alpaca_head200.json", "train[:100]")   # or data_format=...
    examples = tokenize(rows, tokenizer, max_length=256, loss_on="all")
    batch = Collator(tokenizer.pad_token_id)(examples[:4])   # padded to the longest
    generation_prompt(rows[0], tokenizer), reference(rows[0])   # what a run generates from

Sources (`sources`): `embedded` (loraplace's own generated data), a JSON / JSONL file, a
`datasets` folder saved with `save_to_disk`, or a Hugging Face datasets id; formats
(`formats`): Alpaca, messages (and ShareGPT), prompt-completion, text. What the loss covers:

| format | `loss_on: all` | `loss_on: response` | truncation to max_length keeps |
|---|---|---|---|
| alpaca | every token | the output and EOS | the start (the seed's) |
| messages | every token | every assistant turn (`chat`) | the end of the last assistant turn |
| prompt_completion | every token | the completion (and EOS, or the end-of-turn token) | the end of the completion |
| text | every token | every token | the start |

"Every token" is every token but the first, which nothing precedes. Alpaca rows take the seed's
template; conversations take the model's chat template (`chat`); a plain prompt-completion row
is BOS (where the tokenizer adds one), prompt, completion, EOS, like Alpaca without a template.
Keeping the end: a row longer than max_length loses the tokens after its last assistant turn
(or completion) first, then tokens from its start (the system prompt, early turns), never the
end of the answer. A row left with no token to learn is refused, naming it. Labels are built
before padding, so padding is never trained on while a real EOS always is, even when pad == eos
(GPT-2).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplace.core.errors import UserError
from loraplace.core.modes import evaluating
from loraplace.data import chat, sources
from loraplace.data import embedded as embedded_data
from loraplace.data.formats import RecordError, kind, normalize

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


def prompt(row: dict) -> str:
    return (PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT).format(**row)


def split_slice(spec: str, n_rows: int, source: str) -> slice:
    """The rows `spec` (train[a:b], percents too) selects of `n_rows`; UserError where none."""
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


class Rows(list):
    """Normalized records (`formats`) that remember where they came from: `source` and the
    index in it of the first (`start`), for messages that name a record, and their `format`.
    A contiguous slice keeps both."""

    def __init__(self, rows=(), source: str = "the data", start: int = 0, format: str = "alpaca"):
        super().__init__(rows)
        self.source, self.start, self.format = source, start, format

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if isinstance(index, slice):
            first = index.indices(len(self))[0]
            return Rows(got, self.source, self.start + first, self.format)
        return got


def load_rows(data: str, split: str, data_format: str = "auto") -> Rows:
    """The records of `split` (e.g. 'train[:100]') from `data`, checked and in their format's
    shape (`formats.normalize`; `data_format` forces a format)."""
    records, source = sources.read(data, split)
    rows, fmt = normalize(records, source, data_format)
    part = split_slice(split, len(rows), source)
    return Rows(rows[part], source, part.start, fmt)


def dataset_name(data: str) -> str:
    return embedded_data.NAME if data == "embedded" else data


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize(rows: list[dict], tokenizer, max_length: int, loss_on: str = "all") -> list[Example]:
    """One example per row, in order (see the module's table for what each label covers).

    Raises UserError naming the first record that cannot be trained on: a conversation without
    a chat template to render it, one the template refuses, or one with no token to learn
    within max_length."""
    source, start = getattr(rows, "source", "the data"), getattr(rows, "start", 0)
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(_example(row, tokenizer, max_length, loss_on, source))
        except RecordError as err:
            raise UserError(f"record {start + i} of {source} {err}") from None
    return examples


def _example(row: dict, tokenizer, max_length: int, loss_on: str, source: str) -> Example:
    fmt = kind(row)
    eos = tokenizer.eos_token_id
    if fmt == "alpaca" or (fmt == "prompt_completion" and isinstance(row["prompt"], str)):
        head_text, tail_text = (prompt(row), row["output"]) if fmt == "alpaca" else (
            row["prompt"], row["completion"])  # fmt: skip
        head = _bos(tokenizer) + tokenizer(head_text, add_special_tokens=False)["input_ids"]
        tail = tokenizer(tail_text, add_special_tokens=False)["input_ids"] + [eos]
        ids, learn = head + tail, [False] * len(head) + [True] * len(tail)
    elif fmt == "text":
        ids = _bos(tokenizer) + tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        ids += [eos] if ids[-1:] != [eos] else []
        learn, loss_on = [True] * len(ids), "all"  # plain text has no prompt to leave out
    else:
        chat.require_template(tokenizer, source)
        ids, learn = chat.encode(row, tokenizer)
    keep = "start" if fmt in ("alpaca", "text") else "end"
    example = _labelled(ids, learn, max_length, loss_on, keep)
    if all(label == IGNORE for label in example.labels):
        why = ""
        if loss_on == "response" and keep == "start":
            why = f" (loss_on is response and the prompt takes {learn.index(True)} tokens)"
        raise RecordError(
            f"leaves no token to learn within max_length {max_length}{why}; raise max_length or "
            "drop the record"
        )
    return example


def _bos(tokenizer) -> list[int]:
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def _labelled(ids: list[int], learn: list[bool], max_length: int, loss_on: str, keep: str):
    """The example in its max_length window, labelled: every token but the first with `all`,
    the tokens to `learn` (but the first) with `response`."""
    window = truncation(learn, max_length, keep)
    ids, learn = ids[window], learn[window]
    # Position 0 is never a target (nothing precedes it); marking it keeps Trainer's count of
    # target tokens, which does not always shift the labels, equal to the true count.
    labels = [
        IGNORE if i == 0 or (loss_on == "response" and not taught) else t
        for i, (t, taught) in enumerate(zip(ids, learn, strict=True))
    ]
    return Example(ids, labels)


def truncation(learn: list[bool], max_length: int, keep: str) -> slice:
    """Which max_length tokens a longer example keeps. `start`: the first ones. `end`: the
    tokens after the last one to learn go first, then tokens from the start, so the window
    ends with the end of the last assistant turn (or the completion) wherever it fits."""
    n = len(learn)
    if n <= max_length or keep == "start":
        return slice(0, min(n, max_length))
    last = max((i for i, taught in enumerate(learn) if taught), default=n - 1)
    stop = max(max_length, last + 1)
    return slice(stop - max_length, stop)


def generation_prompt(row: dict, tokenizer) -> str | None:
    """The text a run's greedy generations continue: the Alpaca prompt; a conversation up to
    its last assistant turn rendered by the chat template with the generation prompt; a plain
    prompt. None for plain text, which has no prompt."""
    fmt = kind(row)
    if fmt == "alpaca":
        return prompt(row)
    if fmt == "text":
        return None
    if fmt == "prompt_completion" and isinstance(row["prompt"], str):
        return row["prompt"]
    return chat.generation_prompt(row, tokenizer)


def reference(row: dict) -> str | None:
    """What the row says the answer to `generation_prompt` is; None for plain text."""
    fmt = kind(row)
    if fmt == "alpaca":
        return row["output"]
    if fmt == "text":
        return None
    if fmt == "prompt_completion" and isinstance(row["completion"], str):
        return row["completion"]
    return chat.reference(row)


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
