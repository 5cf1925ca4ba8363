"""Conversations through a chat template: the tokens the model reads, which of them it learns,
and the prompt it answers.

    use_chat_template(tokenizer, "auto")      # the model's own; a Jinja file's replaces it
    ids, learn = encode(row, tokenizer)       # learn[i]: token i is an assistant turn's
    generation_prompt(row, tokenizer)         # the conversation before its last assistant turn
    reference(row)                            # ... and that turn's text

What a conversation teaches (TRL's `assistant_only_loss`): every assistant turn of a `messages`
row, or the completion of a conversational prompt-completion row, as the template renders it
after its generation prompt: the content and the end-of-turn token (ChatML's <|im_end|>,
Llama 3's <|eot_id|>, Mistral's </s>), not the whitespace after it. A template with
`{% generation %}` markers says so itself (transformers' assistant masks). Otherwise the turn is
read off the template by rendering the conversation up to it with the generation prompt and
through it (as TRL splits prompt-completion data); a template that renders earlier turns
differently inside a longer conversation is refused for that record. The ids are the whole
rendered conversation tokenized once, special tokens read from the text, as
`apply_chat_template` does; a token that straddles the edge of a turn counts as the assistant's.
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import TemplateError

from loraplace.core.errors import UserError
from loraplace.data.formats import RecordError

MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def use_chat_template(tokenizer, chat_template: str) -> None:
    """`auto`: keep the model's own template; else the Jinja file `chat_template` replaces it."""
    if chat_template == "auto":
        return
    path = Path(chat_template).expanduser()
    if not path.is_file():
        raise UserError(
            f"chat_template {chat_template!r} is neither auto (the model's own) nor a Jinja file "
            "that exists"
        )
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def require_template(tokenizer, source: str) -> None:
    if not tokenizer.chat_template:
        raise UserError(
            f"{source} holds conversations but the model's tokenizer has no chat template; set "
            "chat_template to a Jinja file (--set chat_template=PATH) or give the data as Alpaca "
            "or text records"
        )


def conversation(row: dict) -> tuple[list[dict], list[tuple[int, int]]]:
    """The row's turns and the ranges of turns it teaches: each assistant turn of a `messages`
    row, a prompt-completion row's completion."""
    if "messages" in row:
        turns = row["messages"]
        return turns, [(i, i + 1) for i, t in enumerate(turns) if t["role"] == "assistant"]
    turns = row["prompt"] + row["completion"]
    return turns, [(len(row["prompt"]), len(turns))]


def encode(row: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """The rendered conversation's token ids, and for each whether the model learns it."""
    turns, ranges = conversation(row)
    try:
        if "messages" in row and MARKERS.search(_template(tokenizer)):
            out = tokenizer.apply_chat_template(
                turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        text, spans = _spans(tokenizer, turns, ranges)
    except RecordError:
        raise
    except (TemplateError, ValueError) as err:  # the template's raise_exception, a bad template
        raise RecordError(f"is refused by the chat template ({err})") from None
    return _tokens(tokenizer, text, spans)


def generation_prompt(row: dict, tokenizer) -> str:
    """The conversation before its last assistant turn (a prompt-completion row: the prompt),
    rendered by the template with the generation prompt."""
    turns, ranges = conversation(row)
    return _render(tokenizer, turns[: ranges[-1][0]], generation=True)


def reference(row: dict) -> str:
    """The text of the turns `generation_prompt` leaves for the model to say."""
    turns, ranges = conversation(row)
    a, b = ranges[-1]
    return "\n".join(t["content"] for t in turns[a:b] if t["role"] == "assistant")


def _template(tokenizer) -> str:
    template = tokenizer.chat_template or ""
    return template.get("default", "") if isinstance(template, dict) else template


def _render(tokenizer, turns: list[dict], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)


def _spans(tokenizer, turns, ranges) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the characters of each range of turns it teaches:
    from where the generation prompt ends to the end of the turns, trailing whitespace off."""
    text = _render(tokenizer, turns)
    spans = []
    for a, b in ranges:
        before, through = (
            _render(tokenizer, turns[:a], generation=True),
            _render(tokenizer, turns[:b]),
        )
        if not (through.startswith(before) and text.startswith(through)):
            raise RecordError(
                f"renders differently with and without the turns after turn {a} under the chat "
                "template, so its assistant text cannot be told apart; use a chat_template with "
                "{% generation %} markers"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def _tokens(tokenizer, text: str, spans) -> tuple[list[int], list[bool]]:
    """`text`'s token ids and whether each overlaps a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a tokenizer without offsets: tokenized a piece at a time
        return _pieces(tokenizer, text, spans)
    learn = [any(b < end and start < e for start, end in spans) for b, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), learn


def _pieces(tokenizer, text: str, spans) -> tuple[list[int], list[bool]]:
    ids, learn, at = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, taught in ((text[at:start], False), (text[start:end], True)):
            if piece:
                got = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += got
                learn += [taught] * len(got)
        at = end
    return ids, learn
