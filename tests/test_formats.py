"""Record formats: each detected from its fields in JSON, JSONL and save_to_disk folders, forced
with data_format, and every kind of bad record refused in one sentence naming it."""

from __future__ import annotations

import json

import pytest

from loraplace.core.errors import UserError
from loraplace.data.formats import FORMATS, detect, normalize
from loraplace.data.rows import Rows, load_rows

USER, BOT = {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."}
SYSTEM = {"role": "system", "content": "Be brief."}
MESSAGES = {"messages": [SYSTEM, USER, BOT, {"role": "user", "content": "And 4?"}, BOT]}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Add 2 and 3."},
        {"from": "gpt", "value": "5."},
    ]
}
PROMPT_COMPLETION = {"prompt": "2 + 3 =", "completion": " 5"}
CHAT_PROMPT_COMPLETION = {"prompt": [SYSTEM, USER], "completion": [BOT]}
TEXT = {"text": "The sky is blue."}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


def write(tmp_path, name: str, records) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize(
    "record, fmt, row",
    [
        (MESSAGES, "messages", MESSAGES),
        (SHAREGPT, "messages", {"messages": [SYSTEM, USER, BOT]}),
        (PROMPT_COMPLETION, "prompt_completion", PROMPT_COMPLETION),
        (CHAT_PROMPT_COMPLETION, "prompt_completion", CHAT_PROMPT_COMPLETION),
        (TEXT, "text", TEXT),
        (ALPACA, "alpaca", ALPACA),
        ({"instruction": "Say hi.", "output": "hi"}, "alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"}),
        (ALPACA | {"text": "the Alpaca prompt, formatted"}, "alpaca", ALPACA),  # tatsu-lab/alpaca
        ({"messages": [USER, BOT], "instruction": None, "text": None}, "messages", {"messages": [USER, BOT]}),
    ],
    ids=["messages", "sharegpt", "prompt-completion", "chat-prompt-completion", "text", "alpaca",
         "alpaca-no-input", "alpaca-with-text", "nulls-are-absent"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_each_format_is_read_from_its_fields(tmp_path, name, record, fmt, row):
    rows = load_rows(write(tmp_path, name, [record, record]), "train")
    assert rows.format == fmt and list(rows) == [row, row]


@pytest.mark.parametrize("record", [MESSAGES, SHAREGPT, PROMPT_COMPLETION, TEXT, ALPACA])
def test_a_save_to_disk_folder_is_read_like_a_file(tmp_path, record):
    import datasets

    records = [record] * 5
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(records),
            "test": datasets.Dataset.from_list(records[:2]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    from_file = load_rows(write(tmp_path, "data.jsonl", records), "train[1:4]")
    assert load_rows(str(tmp_path / "one"), "train[1:4]") == from_file
    assert load_rows(str(tmp_path / "dict"), "train[1:4]") == from_file
    assert load_rows(str(tmp_path / "dict"), "test").start == 0
    assert len(load_rows(str(tmp_path / "dict"), "test")) == 2


def test_save_to_disk_folder_errors(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([TEXT])}).save_to_disk(
        str(tmp_path / "dict")
    )
    with pytest.raises(UserError, match="has no split 'test'; its splits: train"):
        load_rows(str(tmp_path / "dict"), "test")
    datasets.Dataset.from_list([TEXT]).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UserError, match="holds one Dataset, so it has one split, 'train'"):
        load_rows(str(tmp_path / "one"), "test")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="is not a datasets folder saved with save_to_disk"):
        load_rows(str(tmp_path / "plain"), "train")


def test_forcing_messages_makes_alpaca_rows_conversations(tmp_path):
    path = write(tmp_path, "a.json", [ALPACA, {"instruction": "Say hi.", "output": "Hello!"}])
    rows = load_rows(path, "train", "messages")
    assert rows.format == "messages"
    assert list(rows) == [
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hello!"}]},
    ]  # fmt: skip
    assert load_rows("embedded", "train[:3]", "messages").format == "messages"


def test_forcing_a_format_picks_its_fields(tmp_path):
    record = ALPACA | {"text": "### Instruction: Add the numbers. ### Response: 5"}
    path = write(tmp_path, "a.json", [record])
    assert load_rows(path, "train").format == "alpaca"
    assert list(load_rows(path, "train", "text")) == [{"text": record["text"]}]
    with pytest.raises(
        UserError,
        match=r"record 0 of .* lacks the fields of the prompt_completion format \(data_format\)",
    ):
        load_rows(path, "train", "prompt_completion")  # fmt: skip


def test_every_format_is_a_config_choice():
    from loraplace.config import CHOICES

    assert CHOICES["data_format"] == ("auto", *FORMATS)


def _turns(*turns) -> dict:
    return {"messages": list(turns)}


BAD = [
    ([MESSAGES, _turns(USER, {"role": "narrator", "content": "x"}, BOT)], 1,
     r"has a turn with the unknown role 'narrator' in messages \(turn 1\)"),
    ([{"conversations": [{"from": "bot", "value": "hi"}]}], 0, "unknown role 'bot' in conversations"),
    ([_turns(USER, {"role": "assistant", "content": "  "})], 0,
     r"has an empty assistant turn in messages \(turn 1\)"),
    ([_turns(SYSTEM, USER)], 0, "has no assistant turn in messages, so nothing to learn"),
    ([{"messages": []}], 0, "has no turns in messages"),
    ([_turns(USER, {"role": "assistant", "content": 5})], 0, "content is not text"),
    ([_turns(USER, "just text")], 0, r"has a turn that is not an object in messages \(turn 1\)"),
    ([MESSAGES, MESSAGES, PROMPT_COMPLETION], 2,
     "is in the prompt_completion format but record 0 is in the messages format; a data set holds one format"),
    ([ALPACA, TEXT], 1, "is in the text format but record 0 is in the alpaca format"),
    ([MESSAGES, ALPACA], 1, "is in the alpaca format but record 0 is in the messages format"),
    ([TEXT, {"txt": "typo"}], 1, "lacks the fields of the text format: text"),
    ([{"prompt": "2 + 3 =", "completion": " "}], 0, "has an empty completion"),
    ([{"prompt": [USER], "completion": "5"}], 0, "not both text or both messages"),
    ([{"prompt": [USER], "completion": [USER]}], 0, "has no assistant turn in completion"),
    ([{"text": ""}], 0, "has an empty text"),
    ([{"text": ["a"]}], 0, "has a text that is not text"),
    ([{"question": "?"}], 0, "lacks the fields instruction, input, output"),
]  # fmt: skip


@pytest.mark.parametrize("records, index, words", BAD)
def test_a_bad_record_is_one_sentence_naming_the_file_and_record(tmp_path, records, index, words):
    path = write(tmp_path, "bad.jsonl", records)
    with pytest.raises(UserError, match=words) as err:
        load_rows(path, "train")
    message = str(err.value)
    assert message.startswith(f"record {index} of {path!r} ")
    assert "\n" not in message and message.count(". ") == 0


def test_rows_remember_where_their_records_are():
    rows = Rows([{"text": str(i)} for i in range(10)], "'x.jsonl'", 100, "text")
    part = rows[3:7]
    assert isinstance(part, Rows) and part.start == 103 and part.source == "'x.jsonl'"
    assert part.format == "text" and part[1:][0] == {"text": "4"} and part[1:].start == 104
    assert load_rows("embedded", "train[100:120]").start == 100


def test_detect_and_normalize_without_files():
    assert [detect(r) for r in (MESSAGES, SHAREGPT, PROMPT_COMPLETION, TEXT, ALPACA, {}, "x")] == [
        "messages", "messages", "prompt_completion", "text", "alpaca", None, None,
    ]  # fmt: skip
    assert normalize([], "'empty.json'") == ([], "alpaca")
    with pytest.raises(UserError, match="record 0 of 'x' has an empty text"):
        normalize([{"text": " "}], "'x'", "auto")
