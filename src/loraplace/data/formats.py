"""The formats a data set's records may be in, each checked and brought to one shape.

    rows, fmt = normalize(records, "'chat.jsonl'", "auto")
    fmt        # 'messages'
    rows[0]    # {'messages': [{'role': 'user', 'content': ...}, {'role': 'assistant', ...}]}

| format | a record | becomes |
|---|---|---|
| `alpaca` | `instruction`, `input` (may be absent), `output` | the same three fields |
| `messages` | `messages`: `[{role, content}, ...]`, or ShareGPT's `conversations`: `[{from, value}, ...]` | `messages` with roles system, user, assistant, tool |
| `prompt_completion` | `prompt`, `completion`: both text, or both lists of messages | the same two fields |
| `text` | `text` | `text` |

`auto` reads each record's format from its fields, first match in this order: `messages` or
`conversations`, `prompt` and `completion`, `instruction` and `output`, `text` (a field that is
null counts as absent, as `datasets` fills the columns a record lacks); every record must be
in the first one's format. A forced `messages` turns Alpaca records into one user turn (the
instruction, a blank line, the input) and one assistant turn (the output). A bad record is a
`RecordError` saying what is wrong with it; the caller names the record.
"""

from __future__ import annotations

from loraplace.core.errors import UserError

FORMATS = ("alpaca", "messages", "prompt_completion", "text")
ALPACA_FIELDS = ("instruction", "input", "output")
FIELDS = {
    "alpaca": "instruction, input, output",
    "messages": "messages (or ShareGPT's conversations)",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
# What a turn's role may be called (ShareGPT says human and gpt); the value is the role used
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
}


class RecordError(ValueError):
    """What is wrong with one record, as the end of a sentence that names it."""


def _has(record, key: str) -> bool:
    return isinstance(record, dict) and record.get(key) is not None


def fits(record, fmt: str) -> bool:
    """Whether the record has the fields of `fmt`."""
    if fmt == "messages":
        return _has(record, "messages") or _has(record, "conversations")
    needs = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}
    return all(_has(record, k) for k in needs.get(fmt, (fmt,)))


def detect(record) -> str | None:
    """The format a record's fields say it is in (the first that fits); None for none."""
    return next(
        (f for f in ("messages", "prompt_completion", "alpaca", "text") if fits(record, f)), None
    )


def kind(row: dict) -> str:
    """The format of a normalized row."""
    for key, fmt in (("messages", "messages"), ("prompt", "prompt_completion"), ("text", "text")):
        if key in row:
            return fmt
    return "alpaca"


def normalize(records: list, source: str, data_format: str = "auto") -> tuple[list[dict], str]:
    """(the records in their format's shape, the format); UserError naming the first bad one."""
    fmt = data_format
    if fmt == "auto":
        fmt = (detect(records[0]) if records else "alpaca") or "alpaca"
    rows = []
    for i, record in enumerate(records):
        try:
            rows.append(_convert(record, fmt, data_format == "auto"))
        except RecordError as err:
            raise UserError(f"record {i} of {source} {err}") from None
    return rows, fmt


def _convert(record, fmt: str, auto: bool) -> dict:
    found = detect(record)
    if fits(record, fmt) and (found == fmt or not auto):
        return {"alpaca": _alpaca, "messages": _messages, "text": _text,
                "prompt_completion": _prompt_completion}[fmt](record)  # fmt: skip
    if not auto and fmt == "messages" and found == "alpaca":  # one user turn, one assistant
        return _from_alpaca(_alpaca(record))
    if auto and found is not None:
        raise RecordError(
            f"is in the {found} format but record 0 is in the {fmt} format; a data set holds "
            "one format"
        )
    if fmt == "alpaca" and auto:  # the seed's words, for the seed's format
        raise RecordError(f"lacks the fields {FIELDS['alpaca']}")
    forced = "" if auto else " (data_format)"
    raise RecordError(f"lacks the fields of the {fmt} format{forced}: {FIELDS[fmt]}")


def _alpaca(record: dict) -> dict:
    if not all(isinstance(record.get(k) or "", str) for k in ALPACA_FIELDS):
        raise RecordError("has a field that is not text")
    return {k: record.get(k, "") or "" for k in ALPACA_FIELDS}


def _from_alpaca(row: dict) -> dict:
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return {"messages": _turns(turns, "messages", learn=True)}


def _messages(record: dict) -> dict:
    key = "messages" if _has(record, "messages") else "conversations"
    return {"messages": _turns(record[key], key, learn=True)}


def _prompt_completion(record: dict) -> dict:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise RecordError("has an empty completion")
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {
            "prompt": _turns(prompt, "prompt", learn=False),
            "completion": _turns(completion, "completion", learn=True),
        }
    raise RecordError("has a prompt and a completion that are not both text or both messages")


def _text(record: dict) -> dict:
    text = record["text"]
    if not isinstance(text, str):
        raise RecordError("has a text that is not text")
    if not text.strip():
        raise RecordError("has an empty text")
    return {"text": text}


def _turns(turns, field: str, learn: bool) -> list[dict]:
    """Turns as {role, content}, checked; with `learn`, at least one assistant turn."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"has no turns in {field}")
    out = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"has a turn that is not an object in {field} (turn {t})")
        sharegpt = turn.get("role") is None and turn.get("from") is not None
        role, content = (turn.get("from"), turn.get("value")) if sharegpt else (
            turn.get("role"), turn.get("content"))  # fmt: skip
        if role not in ROLES:
            raise RecordError(
                f"has a turn with the unknown role {role!r} in {field} (turn {t}); roles are "
                "system, user, assistant, tool (ShareGPT's human and gpt too)"
            )
        if not isinstance(content, str):
            raise RecordError(f"has a turn whose content is not text in {field} (turn {t})")
        if ROLES[role] == "assistant" and not content.strip():
            raise RecordError(f"has an empty assistant turn in {field} (turn {t})")
        out.append({"role": ROLES[role], "content": content})
    if learn and not any(t["role"] == "assistant" for t in out):
        raise RecordError(f"has no assistant turn in {field}, so nothing to learn")
    return out
