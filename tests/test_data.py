"""Instruction data: the Alpaca prompt, tokenizing, collating (pad == eos), loading, eval loss."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from conftest import ALPACA_HEAD, tiny_model
from transformers import AutoTokenizer

from loraplace.core.errors import UserError
from loraplace.data.rows import (
    IGNORE,
    Collator,
    Example,
    PackedCollator,
    balanced_groups,
    load_rows,
    prompt,
    tokenize,
)
from loraplace.train.evaluate import example_losses, token_weighted

EOS = 127  # the tiny tokenizer's <|endoftext|>, also its pad token (as for GPT-2)
FIELDS = {"instruction", "input", "output"}
WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "Hello there!"}
ALPACA = json.loads(ALPACA_HEAD.read_text())
ASCII = [r for r in ALPACA if all(v.isascii() for v in r.values())]  # one token per character


def chars(text: str) -> list[int]:
    """The tiny tokenizer is one token per ASCII character."""
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    assert tokenizer.pad_token is None  # like GPT-2; loraplace's load_model sets pad = eos
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def test_tokenizer_is_gpt2_like(tok):
    assert tok.eos_token_id == tok.pad_token_id == EOS
    assert tok("a\n\nb", add_special_tokens=False)["input_ids"] == chars("a\n\nb")


# ---------------------------------------------------------------- prompt


def test_prompt_with_input_is_the_alpaca_template():
    assert prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_prompt_without_input_is_the_alpaca_template():
    assert prompt(NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )


@pytest.mark.parametrize(
    "row, has_input",
    [
        (WITH_INPUT, True),
        (NO_INPUT, False),
        ({"instruction": "Say hi.", "output": "hi"}, False),  # no input key at all
        (ALPACA[0], bool(ALPACA[0]["input"])),
        (next(r for r in ALPACA if r["input"]), True),
    ],
    ids=["input", "empty-input", "no-input-key", "alpaca-0", "alpaca-with-input"],
)
def test_prompt_sections(row, has_input):
    text = prompt(row)
    assert ("### Input:" in text) == has_input
    assert f"### Instruction:\n{row['instruction']}\n\n" in text
    assert text.endswith("### Response:\n")
    if has_input:
        assert f"### Input:\n{row['input']}\n\n### Response:\n" in text


# ---------------------------------------------------------------- tokenize


@pytest.mark.parametrize("row", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_tokenize_all(tok, row):
    (ex,) = tokenize([row], tok, max_length=1000, loss_on="all")
    assert ex.input_ids == chars(prompt(row) + row["output"]) + [EOS]
    # every token is a target except the first, which nothing precedes
    assert ex.labels == [IGNORE] + ex.input_ids[1:]


@pytest.mark.parametrize("row", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_tokenize_response_masks_the_prompt(tok, row):
    (ex,) = tokenize([row], tok, max_length=1000, loss_on="response")
    n_prompt = len(prompt(row))
    assert ex.input_ids == chars(prompt(row) + row["output"]) + [EOS]
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == chars(row["output"]) + [EOS]


@pytest.mark.parametrize("loss_on", ["all", "response"])
@pytest.mark.parametrize("max_length", [1, 10, 120, 200])
def test_tokenize_truncates_to_max_length(tok, loss_on, max_length):
    full = chars(prompt(WITH_INPUT) + WITH_INPUT["output"]) + [EOS]
    n_prompt = len(prompt(WITH_INPUT))
    if max_length == 1 or (loss_on == "response" and max_length <= n_prompt):
        # nothing left to learn (issue 28): refused, naming the record, not a NaN loss later
        words = "record 0 of the data leaves no token to learn within max_length"
        with pytest.raises(UserError, match=words):
            tokenize([WITH_INPUT], tok, max_length=max_length, loss_on=loss_on)
        return
    (ex,) = tokenize([WITH_INPUT], tok, max_length=max_length, loss_on=loss_on)
    assert len(full) > max_length
    assert ex.input_ids == full[:max_length]
    assert len(ex.labels) == max_length
    if loss_on == "all":
        assert ex.labels == [IGNORE] + ex.input_ids[1:]


def test_tokenize_keeps_eos_when_it_fits(tok):
    full = len(prompt(NO_INPUT)) + len(NO_INPUT["output"]) + 1
    (ex,) = tokenize([NO_INPUT], tok, max_length=full)
    assert len(ex.input_ids) == full and ex.input_ids[-1] == ex.labels[-1] == EOS


def test_tokenize_one_example_per_row_in_order(tok):
    rows = ASCII[:5]
    examples = tokenize(rows, tok, max_length=1000)
    assert [ex.input_ids for ex in examples] == [
        chars(prompt(r) + r["output"]) + [EOS] for r in rows
    ]


# ---------------------------------------------------------------- Collator


@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_collator_pads_to_longest_and_keeps_the_real_eos(tok, loss_on):
    examples = tokenize([WITH_INPUT, NO_INPUT, ALPACA[1]], tok, max_length=1000, loss_on=loss_on)
    lengths = [len(ex.input_ids) for ex in examples]
    assert len(set(lengths)) == 3  # the batch really needs padding
    batch = Collator(tok.pad_token_id)(examples)
    width = max(lengths)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (3, width),
        "attention_mask": (3, width),
        "labels": (3, width),
    }
    for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
        assert batch["input_ids"][i, :n].tolist() == ex.input_ids
        assert batch["labels"][i, :n].tolist() == ex.labels
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [EOS] * (width - n)  # pad == eos
        # the GPT-2 trap: the real EOS keeps its label, the identical pad tokens get none
        assert batch["labels"][i, n - 1].item() == EOS
        assert batch["labels"][i, n:].tolist() == [IGNORE] * (width - n)


@pytest.mark.parametrize("pad_to", [300, 512])
def test_collator_pads_to_a_fixed_width(tok, pad_to):
    examples = tokenize([WITH_INPUT, NO_INPUT], tok, max_length=256)
    batch = Collator(tok.pad_token_id, pad_to=pad_to)(examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert tuple(batch[key].shape) == (2, pad_to)
    assert batch["attention_mask"].sum(1).tolist() == [len(ex.input_ids) for ex in examples]
    assert (batch["labels"][:, -1] == IGNORE).all()


def test_collator_dtypes(tok):
    batch = Collator(tok.pad_token_id)(tokenize([NO_INPUT], tok, max_length=256))
    assert all(v.dtype == torch.long for v in batch.values())


# ---------------------------------------------------------------- load_rows


@pytest.mark.parametrize(
    "split, expected",
    [
        ("train[:100]", slice(0, 100)),
        ("train[100:120]", slice(100, 120)),
        ("train[:10%]", slice(0, 20)),
        ("train[90%:]", slice(180, 200)),
        ("train[10%:20%]", slice(20, 40)),
        ("train[-5:]", slice(195, 200)),
        ("train", slice(0, 200)),
        (" train [ 3 : 7 ] ", slice(3, 7)),
    ],
)
def test_load_rows_slices_the_file(split, expected):
    rows = load_rows(str(ALPACA_HEAD), split)
    want = ALPACA[expected]
    assert len(rows) == len(want)
    assert rows == [{k: r.get(k, "") for k in FIELDS} for r in want]


def test_seed_splits():
    train = load_rows(str(ALPACA_HEAD), "train[:100]")
    evaluation = load_rows(str(ALPACA_HEAD), "train[100:120]")
    assert len(train) == 100 and len(evaluation) == 20
    assert evaluation[0]["instruction"] == ALPACA[100]["instruction"]
    assert train[0]["instruction"] == ALPACA[0]["instruction"]


def test_load_rows_embedded():
    rows = load_rows("embedded", "train[:100]")
    assert len(rows) == 100
    for row in rows:
        assert set(row) == FIELDS
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"] and row["output"]
    assert load_rows("embedded", "train[:100]") == rows  # deterministic
    evaluation = load_rows("embedded", "train[100:120]")
    assert len(evaluation) == 20
    assert not {tuple(r.values()) for r in evaluation} & {tuple(r.values()) for r in rows}


@pytest.mark.parametrize(
    "name, text",
    [
        ("rows.json", json.dumps([{"instruction": "a", "output": "b"}, WITH_INPUT])),
        ("rows.json", json.dumps({"train": [{"instruction": "a", "output": "b"}, WITH_INPUT]})),
        (
            "rows.jsonl",
            json.dumps({"instruction": "a", "output": "b"}) + "\n\n" + json.dumps(WITH_INPUT),
        ),
    ],
    ids=["list", "train-key", "jsonl"],
)
def test_load_rows_file_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert load_rows(str(path), "train") == [
        {"instruction": "a", "input": "", "output": "b"},
        WITH_INPUT,
    ]


def _write(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("bad.json", "this is not json", "is not valid JSON"),
        ("bad.json", '[{"instruction": "a", "output": "b"},', "is not valid JSON"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\nnot json\n', "not valid JSON lines"),
        ("rows.json", json.dumps([{"instruction": "a", "input": ""}]), "record 0 .* lacks"),
        (
            "rows.json",
            json.dumps([WITH_INPUT, {"instruction": "a", "input": "b"}]),
            "record 1 .* lacks",
        ),
        ("rows.json", json.dumps([WITH_INPUT, "just text"]), "record 1 .* lacks"),
        ("rows.json", json.dumps([{"instruction": "a", "output": 5}]), "not text"),
        ("rows.json", json.dumps({"rows": []}), "must hold a list of records"),
        ("rows.json", json.dumps("hello"), "must hold a list of records"),
    ],
    ids=[
        "text",
        "truncated-json",
        "bad-jsonl-line",
        "no-output",
        "second-lacks-output",
        "record-not-object",
        "output-not-text",
        "dict-without-train",
        "json-string",
    ],
)
def test_load_rows_bad_file(tmp_path, name, content, words):
    path = _write(tmp_path, name, content)
    with pytest.raises(UserError, match=words) as err:
        load_rows(path, "train")
    assert path in str(err.value)


def test_load_rows_binary_file_is_a_user_error(tmp_path):
    path = _write(tmp_path, "bad.json", b"\xff\xfe\x00\x81not text")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_rows(path, "train")


@pytest.mark.parametrize(
    "split, words",
    [
        ("train[5:5]", r"'train\[5:5\]' selects no rows"),
        ("train[7:3]", "selects no rows"),
        ("train[190:260]", r"rows 190 to 259 .* has 200 rows"),
        ("train[:201]", "has 200 rows"),
        ("train[-300:]", "has 200 rows"),
        ("train[1:2", "is not of the form train"),
        ("train[a:b]", "is not of the form train"),
        ("train[1:2:3]", "is not of the form train"),
        ("train[:10%%]", "is not of the form train"),
        ("", "is not of the form train"),
    ],
)
def test_load_rows_bad_split(split, words):
    with pytest.raises(UserError, match=words):
        load_rows(str(ALPACA_HEAD), split)


@pytest.mark.parametrize("data", ["/nope/x.json", "/nope/x.jsonl", "missing.json", "./nope"])
def test_load_rows_missing_file(data):
    with pytest.raises(UserError, match=re.escape(f"data file '{data}' does not exist")):
        load_rows(data, "train[:10]")


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    "per_example, expected",
    [
        ([(2.0, 1), (6.0, 3), (1.5, 2)], 9.5 / 6),
        ([(3.0, 3)], 1.0),
        ([(0.0, 0), (4.0, 2)], 2.0),  # an example with no target tokens adds nothing
        ([(10.0, 1), (1.0, 9)], 11.0 / 10),  # not the mean of the per-example means (5.06)
    ],
)
def test_token_weighted(per_example, expected):
    assert token_weighted(per_example) == pytest.approx(expected)
    # grouping examples (as a batch would) changes nothing: merge them in pairs
    pairs = [
        (sum(s for s, _ in per_example[i : i + 2]), sum(n for _, n in per_example[i : i + 2]))
        for i in range(0, len(per_example), 2)
    ]
    assert token_weighted(pairs) == pytest.approx(expected)
    assert token_weighted(list(reversed(per_example))) == pytest.approx(expected)


def test_token_weighted_without_tokens_is_nan():
    assert math.isnan(token_weighted([]))
    assert math.isnan(token_weighted([(0.0, 0)]))


def _examples() -> list[Example]:
    """Alpaca examples of different lengths (so batches are padded), one with a masked prompt."""
    examples = []
    for row, length in zip(ASCII, (40, 97, 23, 120, 64, 81, 50), strict=False):
        ids = chars(prompt(row) + row["output"])[: length - 1] + [EOS]
        examples.append(Example(ids, list(ids)))
    masked = examples[1]
    examples[1] = dataclasses.replace(masked, labels=[IGNORE] * 30 + masked.labels[30:])
    return examples


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2")
    model.eval()
    return model


def test_example_losses_do_not_depend_on_batch_size(gpt2):
    examples = _examples()
    collate = Collator(EOS)
    one = example_losses(gpt2, examples, collate, batch_size=1)
    three = example_losses(gpt2, examples, collate, batch_size=3)
    assert [n for _, n in one] == [
        len(ex.labels) - 1 - ex.labels[1:].count(IGNORE) for ex in examples
    ]
    assert [n for _, n in three] == [n for _, n in one]
    for (s1, _), (s3, _) in zip(one, three, strict=True):
        assert s3 == pytest.approx(s1, rel=1e-5, abs=1e-5)
    assert token_weighted(three) == pytest.approx(token_weighted(one), abs=1e-5)


@pytest.mark.parametrize("index", [0, 1, 3])
def test_example_loss_matches_the_models_own_loss(gpt2, index):
    example = _examples()[index]
    batch = Collator(EOS)([example])
    expected = gpt2(**batch).loss.item()
    ((total, count),) = example_losses(gpt2, [example], Collator(EOS), batch_size=1)
    assert total / count == pytest.approx(expected, abs=1e-5)


def test_padded_batch_loss_matches_the_models_own_loss(gpt2):
    # one padded batch: the model's mean over target tokens ignores the (pad == eos) padding
    examples = _examples()[:3]
    batch = Collator(EOS)(examples)
    assert (batch["attention_mask"] == 0).any()
    expected = gpt2(**batch).loss.item()
    got = token_weighted(example_losses(gpt2, examples, Collator(EOS), batch_size=3))
    assert got == pytest.approx(expected, abs=1e-5)


def test_example_losses_restore_training_mode():
    model = tiny_model("gpt2")
    model.train()
    example_losses(model, _examples()[:2], Collator(EOS), batch_size=2)
    assert model.training


@pytest.mark.parametrize(
    "lengths,capacity,expected",
    [
        ([120, 150, 90, 87], 256, [[0, 2], [1, 3]]),  # in order this would take 3 chunks
        ([50, 50, 50, 50], 256, [[0, 1, 2, 3]]),
        ([200, 200, 200], 256, [[0], [1], [2]]),
        ([300, 10, 20], 256, [[0], [1, 2]]),  # too long for any chunk: a chunk of its own
    ],
)
def test_balanced_groups(lengths, capacity, expected):
    groups = balanced_groups(lengths, capacity)
    assert groups == expected
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= capacity or len(g) == 1 for g in groups)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("head", [None, "blocks", "onednn"])
def test_packed_evaluation_gives_every_example_its_padded_loss(kind, segments, head, monkeypatch):
    from loraplace.fast import headloss
    from loraplace.fast.kernels import onednn_available
    from loraplace.fast.segments import use_segment_attention

    if head == "onednn" and not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(headloss, "ROWS", 7)  # several blocks a row, one cut inside an example
    model = tiny_model(kind).eval()
    if segments:
        assert use_segment_attention(model)
    if head:
        assert headloss.head_loss_matches(model, onednn=head == "onednn")
    examples = _examples()
    padded = example_losses(model, examples, Collator(EOS), batch_size=2)
    capacity = sum(len(e.input_ids) for e in examples) // 2  # two rows or more
    collate = PackedCollator(capacity, segments)
    packed = example_losses(model, examples, collate, batch_size=2, head=head)
    assert [n for _, n in packed] == [n for _, n in padded]
    for (got, _), (want, _) in zip(packed, padded, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_evaluation_leaves_a_training_model_training_even_when_it_fails():
    model = tiny_model("gpt2")
    model.train()

    def broken(batch):
        raise ValueError("bad batch")

    with pytest.raises(ValueError):
        example_losses(model, _examples(), broken, batch_size=2)
    assert model.training and all(m.training for m in model.modules())
    example_losses(model, _examples(), Collator(EOS), batch_size=2)
    assert model.training
    model.eval()
    example_losses(model, _examples(), Collator(EOS), batch_size=2)
    assert not model.training
