"""Conversations through chat templates: the labelled tokens are exactly the assistant turns
(decoded back and compared, for ChatML, Llama 3 and Mistral templates), truncation keeps the end
of the last one, packing stays exact, and what cannot be trained on is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from chat_tokenizers import llama3_tokenizer, mistral_tokenizer
from conftest import TINY
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loraplace.core.errors import UserError
from loraplace.data import chat
from loraplace.data.rows import (
    IGNORE,
    Collator,
    PackedCollator,
    Rows,
    generation_prompt,
    load_rows,
    prompt,
    reference,
    tokenize,
    truncation,
)
from loraplace.train.evaluate import example_losses

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
TALK = [
    {"role": "user", "content": "Hello there, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from loraplace.plan.models import load_tokenizer, resolve_model

    root = tmp_path_factory.mktemp("chat-tokenizers")
    return {
        "chatml": load_tokenizer(resolve_model("embedded")),  # SmolLM2-135M-Instruct's own
        "llama3": llama3_tokenizer(root / "llama3"),
        "mistral": mistral_tokenizer(root / "mistral"),
    }


def talk(template: str) -> list[dict]:
    return TALK if template == "mistral" else [SYSTEM, *TALK]  # Mistral's has no system role


def learned(tok, example) -> list[str]:
    """The labelled tokens, decoded a contiguous run at a time."""
    runs, run = [], []
    for label in example.labels + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


# ---------------------------------------------------------------- what the loss covers


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_response_labels_are_exactly_every_assistant_turn(toks, template):
    tok = toks[template]
    (ex,) = tokenize([{"messages": talk(template)}], tok, 1000, "response")
    assistant = [t["content"] for t in TALK if t["role"] == "assistant"]
    assert learned(tok, ex) == [text + END[template] for text in assistant]
    rendered = tok.apply_chat_template(talk(template), tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_all_labels_every_token_but_the_first(toks, template):
    (ex,) = tokenize([{"messages": talk(template)}], toks[template], 1000, "all")
    assert ex.labels == [IGNORE] + ex.input_ids[1:]


def test_a_template_with_generation_markers_gives_the_same_labels(toks):
    tok = toks["chatml"]
    marked = AutoTokenizer.from_pretrained(tok.name_or_path)
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in tok.chat_template
    marked.chat_template = tok.chat_template.replace(
        turn,
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}",
    )
    row = {"messages": talk("chatml")}
    assert tokenize([row], marked, 1000, "response") == tokenize([row], tok, 1000, "response")


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_a_tokenizer_without_offsets_is_tokenized_a_piece_at_a_time(toks, template, monkeypatch):
    tok = toks[template]
    (want,) = tokenize([{"messages": talk(template)}], tok, 1000, "response")
    call = type(tok).__call__

    def without_offsets(self, *args, **kwargs):  # as a Python (slow) tokenizer answers
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available")
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", without_offsets)
    (got,) = tokenize([{"messages": talk(template)}], tok, 1000, "response")
    assert learned(tok, got) == learned(tok, want)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_a_conversational_completion_is_learned_not_the_prompts_assistant_turns(toks, template):
    tok = toks[template]
    row = {"prompt": [SYSTEM, *TALK[:3]], "completion": [TALK[3]]}
    (ex,) = tokenize([row], tok, 1000, "response")
    assert learned(tok, ex) == [TALK[3]["content"] + END[template]]
    (whole,) = tokenize([{"messages": [SYSTEM, *TALK]}], tok, 1000, "response")
    assert ex.input_ids == whole.input_ids  # the same conversation, fewer turns to learn


@pytest.fixture(scope="module")
def chars(tiny_gpt2_dir):
    """One token per ASCII character, EOS 127, no chat template (GPT-2 like)."""
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.pad_token = tok.eos_token
    return tok


def ords(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_plain_prompt_completion_and_text(chars, loss_on):
    pc, text = {"prompt": "2 + 3 =", "completion": " 5"}, {"text": "The sky is blue."}
    (a, b) = tokenize([pc, text], chars, 1000, loss_on)
    assert a.input_ids == ords("2 + 3 = 5") + [127]
    learn = [IGNORE] * len("2 + 3 =") + ords(" 5") + [127]
    assert a.labels == (learn if loss_on == "response" else [IGNORE] + a.input_ids[1:])
    assert b.input_ids == ords("The sky is blue.") + [127]
    assert b.labels == [IGNORE] + b.input_ids[1:]  # text: every token, whatever loss_on says
    (c,) = tokenize([{"text": "ab<|endoftext|>"}], chars, 1000)
    assert c.input_ids == ords("ab") + [127]  # one EOS, not two


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "learn, max_length, keep, window",
    [
        ("..LL..LL..", 20, "end", (0, 10)),  # fits: everything
        ("..LL..LL..", 8, "end", (0, 8)),  # the tokens after the last assistant turn go first
        ("..LL..LL..", 6, "end", (2, 8)),  # ... then tokens from the start
        ("..LL..LLLL", 3, "end", (7, 10)),  # the end of the last turn, never its start
        ("..LL..LL..", 6, "start", (0, 6)),  # Alpaca and text: the seed's, the start
    ],
)
def test_truncation_keeps_the_end_of_the_last_assistant_turn(learn, max_length, keep, window):
    assert truncation([c == "L" for c in learn], max_length, keep) == slice(*window)


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
def test_a_long_conversation_keeps_its_final_answer(toks, template):
    tok = toks[template]
    turns = talk(template) + ([TALK[0]] if template != "mistral" else [])  # a last user turn
    (full,) = tokenize([{"messages": turns}], tok, 1000, "response")
    (cut,) = tokenize([{"messages": turns}], tok, 12, "response")
    last = TALK[3]["content"] + END[template]
    stop = max(i for i, label in enumerate(full.labels) if label != IGNORE) + 1
    assert cut.input_ids == full.input_ids[stop - 12 : stop]  # the 12 tokens that end there
    assert tok.decode(cut.input_ids).endswith(last) and learned(tok, cut) == [last]
    assert len(full.input_ids) > stop or template == "mistral"  # the last user turn went first


def test_nothing_to_learn_is_refused_naming_the_record(chars, tmp_path):
    records = [{"instruction": "Say hi.", "output": "hi"}] * 6
    records[4] = {"instruction": "x" * 300, "output": "hi"}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    rows = load_rows(str(path), "train[2:6]")
    tokenize(rows, chars, 200, "all")  # the prompt's tokens are learned: fine
    words = (
        f"record 4 of {str(path)!r} leaves no token to learn within max_length 200 (loss_on is "
        f"response and the prompt takes {len(prompt(records[4]))} tokens); raise max_length or "
        "drop the record"
    )
    with pytest.raises(UserError) as err:
        tokenize(rows, chars, 200, "response")
    assert str(err.value) == words
    with pytest.raises(UserError, match="record 0 of the data leaves no token to learn within"):
        tokenize([{"text": "The sky."}], chars, 1)


# ---------------------------------------------------------------- templates


def test_conversations_without_a_chat_template_name_the_fix(chars, tmp_path):
    rows = Rows([{"messages": TALK}], "'chat.jsonl'", 0, "messages")
    with pytest.raises(UserError) as err:
        tokenize(rows, chars, 100)
    assert str(err.value) == (
        "'chat.jsonl' holds conversations but the model's tokenizer has no chat template; set "
        "chat_template to a Jinja file (--set chat_template=PATH) or give the data as Alpaca or "
        "text records"
    )
    template = tmp_path / "chatml.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    chat.use_chat_template(chars, str(template))
    try:
        (ex,) = tokenize(rows, chars, 1000, "response")
        assert learned(chars, ex) == [
            "I am fine, thank you.<|endoftext|>",
            "Paris is the capital of France.<|endoftext|>",
        ]
    finally:
        chars.chat_template = None
    with pytest.raises(UserError, match="chat_template 'nope.jinja' is neither auto"):
        chat.use_chat_template(chars, "nope.jinja")


def test_a_template_that_refuses_a_record_names_it(toks):
    rows = Rows([{"messages": TALK}, {"messages": [SYSTEM, *TALK]}], "'c.jsonl'", 7, "messages")
    with pytest.raises(UserError) as err:
        tokenize(rows, toks["mistral"], 100)
    assert str(err.value) == (
        "record 8 of 'c.jsonl' is refused by the chat template (Conversation roles must "
        "alternate user/assistant/user/assistant/...)"
    )


def test_a_template_that_renders_turns_differently_later_is_refused(chars):
    tok = AutoTokenizer.from_pretrained(chars.name_or_path)
    # like templates that drop earlier turns' reasoning: the last turn renders differently
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if loop.last %}{{ m['content'] }}"
        "{% else %}{{ m['content'][:3] }}{% endif %}{{ '\n' }}{% endfor %}"
    )
    with pytest.raises(UserError, match="record 0 of the data renders differently with and"):
        tokenize([{"messages": TALK}], tok, 1000)


# ---------------------------------------------------------------- generation prompts


def test_generation_prompts_and_references(toks, chars):
    tok = toks["chatml"]
    alpaca = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert (generation_prompt(alpaca, tok), reference(alpaca)) == (prompt(alpaca), "hi")
    turns = [SYSTEM, *TALK, {"role": "user", "content": "Thanks."}]
    want = tok.apply_chat_template(turns[:4], tokenize=False, add_generation_prompt=True)
    assert want.endswith("<|im_start|>assistant\n") and "France" in want
    assert generation_prompt({"messages": turns}, tok) == want
    assert reference({"messages": turns}) == TALK[3]["content"]
    pc = {"prompt": turns[:4], "completion": [TALK[3]]}
    assert (generation_prompt(pc, tok), reference(pc)) == (want, TALK[3]["content"])
    plain = {"prompt": "2 + 3 =", "completion": " 5"}
    assert (generation_prompt(plain, chars), reference(plain)) == ("2 + 3 =", " 5")
    text = {"text": "The sky."}
    assert (generation_prompt(text, chars), reference(text)) == (None, None)
    mistral = generation_prompt({"messages": TALK}, toks["mistral"])  # no generation prompt
    assert mistral.endswith("[INST] What is the capital of France? [/INST]")


# ---------------------------------------------------------------- packing


def test_packed_conversations_keep_each_examples_loss(toks):
    tok = toks["llama3"]
    config = AutoConfig.for_model("llama", **(TINY["llama"] | {"vocab_size": len(tok)}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    rows = [{"messages": talk("llama3")}, {"messages": TALK[:2]},
            {"prompt": [SYSTEM, *TALK[:3]], "completion": [TALK[3]]}]  # fmt: skip
    examples = tokenize(rows, tok, 1000, "response")
    padded = example_losses(model, examples, Collator(tok.eos_token_id), batch_size=3)
    packed = example_losses(model, examples, PackedCollator(1000), batch_size=3)
    assert [n for _, n in packed] == [n for _, n in padded]
    assert [n for _, n in padded] == [sum(x != IGNORE for x in e.labels) for e in examples]
    for (got, _), (want, _) in zip(packed, padded, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
