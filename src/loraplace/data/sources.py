"""Where records come from: the embedded data, a JSON / JSONL file, a `datasets` folder saved
with `save_to_disk`, or a Hugging Face datasets id.

    records, source = read("chat.jsonl", "train")        # source: "'chat.jsonl'", for messages
    records, source = read("runs/my-set", "test")         # a DatasetDict's split, or a Dataset

Records come back as they are stored (dicts); `formats.normalize` checks and converts them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loraplace.core.errors import UserError
from loraplace.data import embedded as embedded_data

EMBEDDED_ROWS = 1000
SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes into its folder


def read(data: str, split: str) -> tuple[list, str]:
    """(every record of `split`'s named part, a description of the source for messages)."""
    name = re.match(r"\s*(\w*)", split)[1]
    path = Path(data).expanduser()
    if data == "embedded":
        return embedded_data.records(EMBEDDED_ROWS), "the embedded dataset"
    if path.is_file():
        _one_split(name, split, "a local data file")
        return _read_file(path), f"{data!r}"
    if path.is_dir():
        return _read_saved(path, data, name, split), f"{data!r}"
    if data.endswith((".json", ".jsonl")) or data.startswith((".", "/", "~")):
        raise UserError(f"data file {data!r} does not exist")
    return _read_hub(data, name), f"dataset {data!r}"


def _one_split(name: str, split: str, what: str) -> None:
    if name and name != "train":
        raise UserError(f"{what} has one split, 'train' (slice it: train[a:b]), not {split!r}")


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


def _read_saved(path: Path, data: str, name: str, split: str) -> list:
    """A folder written by `Dataset.save_to_disk` (one split, 'train') or
    `DatasetDict.save_to_disk` (the split by name)."""
    import datasets

    if not any((path / f).is_file() for f in SAVED):
        raise UserError(
            f"data folder {data!r} is not a datasets folder saved with save_to_disk "
            "(it has neither dataset_dict.json nor state.json)"
        )
    try:
        saved = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read datasets folder {data!r} ({type(err).__name__})") from None
    if isinstance(saved, datasets.DatasetDict):
        if name not in saved:
            raise UserError(
                f"datasets folder {data!r} has no split {name!r}; its splits: {', '.join(saved)}"
            )
        saved = saved[name]
    else:
        _one_split(name, split, f"datasets folder {data!r} holds one Dataset, so it")
    return list(saved)


def _read_hub(data: str, name: str) -> list:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(data, split=name)
    except (OSError, ValueError, RuntimeError, DatasetsError) as err:
        # OSError: not on the hub, the hub unreachable or offline (DatasetNotFoundError,
        # ConnectionError, HTTP errors); ValueError: no such split or config; RuntimeError: a
        # script dataset, which `datasets` no longer runs; DatasetsError: a download or build
        # that failed (checksums, generation)
        raise UserError(
            f"cannot load dataset {data!r} ({type(err).__name__}); without the Hugging Face hub use "
            "--data embedded, a local JSON / JSONL file or a folder saved with save_to_disk"
        ) from None
    return list(ds)
