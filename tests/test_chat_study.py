"""`study`, `report`, `advise` and `plan --config` from every data format, on the embedded model
(SmolLM2-135M-Instruct and its ChatML template), tiny sizes; bad data ends before anything runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO

from loraplace.cli import main
from loraplace.data.embedded import records

TINY = ["--train-split", "train[:4]", "--eval-split", "train[4:6]", "--strategy",
        "qv=attn.q,attn.v@top:2", "--seed", "1", "--epochs", "1", "--set", "max_length=64",
        "--set", "generations=1", "--set", "max_new_tokens=4", "--set", "loss_on=response"]  # fmt: skip


def _conversation(row: dict) -> list[dict]:
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def _write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """The embedded instruction rows in each format: a file (or folder) per format."""
    import datasets

    root, rows = tmp_path_factory.mktemp("formats"), records(6)
    system = {"role": "system", "content": "Answer in one short sentence."}
    messages = [{"messages": [system, *_conversation(r)]} for r in rows]
    messages[0]["messages"] += _conversation(rows[5])  # one conversation of two exchanges
    sharegpt = [
        {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]],
                            "value": t["content"]} for t in _conversation(r)]}
        for r in rows
    ]  # fmt: skip
    chat_pc = [{"prompt": c[:1], "completion": c[1:]} for c in map(_conversation, rows)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(chat_pc[:4]), "test": datasets.Dataset.from_list(chat_pc[4:])}
    ).save_to_disk(str(root / "saved"))  # fmt: skip
    return {
        "messages": _write(root / "messages.jsonl", messages),
        "sharegpt": _write(root / "sharegpt.json", sharegpt),
        "prompt_completion": _write(
            root / "pc.jsonl",
            [{"prompt": f"Q: {r['instruction']} {r['input']}\nA:", "completion": " " + r["output"]}
             for r in rows],
        ),  # fmt: skip
        "text": _write(root / "text.jsonl", [{"text": f"{r['instruction']} {r['output']}"} for r in rows]),
        "saved": str(root / "saved"),
    }  # fmt: skip


CASES = {  # what each study reads: its format, and whether its prompts go through the template
    "messages": ("messages", True),
    "sharegpt": ("messages", True),
    "prompt_completion": ("prompt_completion", False),
    "text": ("text", False),
    "saved": ("prompt_completion", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_study_runs_end_to_end_from_each_format(data, tmp_path, name, capsys):
    fmt, templated = CASES[name]
    out = tmp_path / "out"
    split = ["--eval-split", "test[:2]"] if name == "saved" else []
    assert main(["study", "--model", "embedded", "--data", data[name], *TINY, *split,
                 "--out", str(out)]) == 0  # fmt: skip
    (result_file,) = out.glob("runs/*/seed-1/result.json")
    result = json.loads(result_file.read_text())
    assert result["status"] == "ok" and result["data"]["format"] == fmt
    assert math.isfinite(result["metrics"]["eval_loss"])
    assert result["data"]["train_rows"] == 4 and result["data"]["eval_rows"] == 2
    if fmt == "text":
        assert result["generations"] == []  # plain text has no prompt to answer
    else:
        (g,) = result["generations"]
        assert g["reference"] and g["base"] is not None and g["adapted"] is not None
        assert g["prompt"].endswith("<|im_start|>assistant\n") == templated
    report = (out / "report.md").read_text()
    assert f"({fmt}): train" in report
    if templated:  # the conversation as the template renders it, and the reference answer
        assert "<|im_start|>user" in report and "| reference |" in report
    assert main(["report", str(out)]) == 0


def test_bad_data_ends_the_study_before_anything_runs(tiny_gpt2_dir, tmp_path, capsys):
    chat = _write(tmp_path / "chat.jsonl", [{"messages": _conversation(r)} for r in records(8)])
    out = tmp_path / "out"
    argv = ["study", "--model", str(tiny_gpt2_dir), "--data", chat, "--train-split", "train[:4]",
            "--eval-split", "train[4:8]", "--strategy", "full", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"loraplace: error: {chat!r} holds conversations but the model's tokenizer has no chat "
        "template; set chat_template to a Jinja file (--set chat_template=PATH) or give the data "
        "as Alpaca or text records"
    )
    assert not (out / "runs").exists()
    rows = [{"messages": _conversation(r)} for r in records(8)]
    rows[6]["messages"][1]["content"] = ""
    _write(tmp_path / "chat.jsonl", rows)
    assert main(argv) == 2  # the evaluation split is checked too
    err = capsys.readouterr().err.strip()
    assert err == (
        f"loraplace: error: record 6 of {chat!r} has an empty assistant turn in messages (turn 1)"
    )


def test_the_chat_config_is_the_offline_study_through_the_chat_template():
    from loraplace.config import load_config

    offline = load_config(str(REPO / "configs" / "offline.yaml")).to_dict()
    chat = load_config(str(REPO / "configs" / "offline-chat.yaml")).to_dict()
    # the same study but for the records' format (both learn the response: the default)
    assert {k: v for k, v in chat.items() if offline[k] != v} == {"data_format": "messages"}


def test_plan_reads_the_chat_config(capsys):
    assert main(["plan", "--config", str(REPO / "configs" / "offline-chat.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategies"]


@pytest.mark.slow
def test_advise_scores_conversations(data, capsys):
    argv = ["advise", "--model", "embedded", "--data", data["sharegpt"], "--train-split",
            "train[:4]", "--examples", "4", "--max-length", "64", "--loss-on", "response", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data_format"] == "messages" and report["examples"] == 4
    assert report["recommended"]
