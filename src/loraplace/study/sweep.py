"""Each strategy at its own learning rate: `--lr-sweep`, and the verdict at both rates.

    loraplace study --config configs/offline.yaml --lr-sweep 1e-4,2e-4,5e-4,1e-3 --out runs/x

A placement can look worse only because the one learning rate suits another placement better
(LoRA Without Regret swept the rate per configuration). With `lr_sweep` a study runs in three
parts, each an ordinary study in a folder of its own:

1. the sweep, OUT/sweep/lr-<rate>/: every strategy at every rate with the first seed, trained
   on the training rows less a development split (`dev_split`; unset: the last fifth of the
   training rows) and evaluated on that split, never on the evaluation rows;
2. the study at the shared rate (the config's `lr`), in OUT itself, as without a sweep;
3. the study at the tuned rates, OUT/tuned/: every strategy at the rate with its lowest
   development loss, every seed.

The report (OUT) shows the sweep's curves, the rates chosen, and the verdict at both; OUT/tuned
has a report of its own.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from loraplace.analysis.sweep_report import CHOSEN, TUNED
from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import write_json

SWEEP = "sweep"


def dev_splits(cfg: StudyConfig) -> tuple[str, str]:
    """(the sweep's training split, its development split): `dev_split` and the training rows
    less those, or the last fifth of the training rows and the rest."""
    from loraplace.data.rows import load_rows, split_slice

    name = cfg.train_split.split("[")[0].strip()
    total = len(load_rows(cfg.data, name))
    train = split_slice(cfg.train_split, total, f"{cfg.data!r}")
    if cfg.dev_split:
        dev = split_slice(cfg.dev_split, total, f"{cfg.data!r}")
        dev_name = cfg.dev_split.split("[")[0].strip()
        ev = split_slice(cfg.eval_split, total, f"{cfg.data!r}")
        if dev_name == cfg.eval_split.split("[")[0].strip() and _overlap(dev, ev):
            raise UserError(f"dev_split {cfg.dev_split!r} shares rows with eval_split "
                            f"{cfg.eval_split!r}; the sweep must not see the evaluation rows")  # fmt: skip
        rest = [i for i in range(train.start, train.stop) if not dev.start <= i < dev.stop]
        if not rest or rest != list(range(rest[0], rest[-1] + 1)):
            raise UserError(
                f"dev_split {cfg.dev_split!r} must be the start or the end of train_split "
                f"{cfg.train_split!r}, or lie outside it"
            )
        return f"{name}[{rest[0]}:{rest[-1] + 1}]", cfg.dev_split
    size = train.stop - train.start
    if size < 5:
        raise UserError(
            f"train_split {cfg.train_split!r} has {size} rows; the sweep's development split "
            "takes a fifth of them: give it at least 5 rows, or set dev_split"
        )
    cut = train.stop - size // 5
    return f"{name}[{train.start}:{cut}]", f"{name}[{cut}:{train.stop}]"


def _overlap(a: slice, b: slice) -> bool:
    return a.start < b.stop and b.start < a.stop


def sweep_config(cfg: StudyConfig, lr: float, train: str, dev: str) -> StudyConfig:
    return dataclasses.replace(cfg, lr=lr, seeds=cfg.seeds[:1], train_split=train,
                               eval_split=dev, lr_sweep=[], generations=0,
                               task_metrics=[])  # picked on loss alone  # fmt: skip


def choose(results: list[dict]) -> dict:
    """{strategy: {"curve": {rate: dev loss}, "lr": the rate with the lowest}} from the sweep's
    results; a strategy whose runs all failed is left out."""
    found: dict[str, dict] = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        loss = r["metrics"]["eval_loss"]
        curve = found.setdefault(r["strategy"], {"curve": {}})["curve"]
        curve[repr(r["config"]["lr"])] = loss
    for entry in found.values():
        finite = {lr: v for lr, v in entry["curve"].items() if math.isfinite(v)}
        entry["lr"] = float(min(finite, key=finite.get)) if finite else None
    return {k: v for k, v in found.items() if v["lr"] is not None}


def run_sweep_study(cfg: StudyConfig, out: Path, log=print) -> list[dict]:
    """The sweep, the study at the shared rate, and the study at the tuned rates; the results
    of the last two (a failed run in any part is counted by the caller through them)."""
    from loraplace.study.runner import run_study

    out = Path(out)
    train, dev = dev_splits(cfg)
    log(f"lr sweep: {len(cfg.lr_sweep)} rates x each strategy, seed {cfg.seeds[0]}, trained on "
        f"{train}, chosen on {dev} (evaluation rows {cfg.eval_split} untouched)")  # fmt: skip
    swept = []
    for lr in cfg.lr_sweep:
        log(f"lr sweep: rate {lr:g}")
        swept += _study(sweep_config(cfg, lr, train, dev), out / SWEEP / f"lr-{lr:g}", log)
    chosen = choose(swept)
    write_json(out / CHOSEN, {"train_split": train, "dev_split": dev, "shared_lr": cfg.lr,
                              "seed": cfg.seeds[0], "rates": list(cfg.lr_sweep),
                              "strategies": chosen})  # fmt: skip
    for name, entry in chosen.items():
        log(f"lr sweep: {name} takes {entry['lr']:g}")
    log(f"the study at the shared rate {cfg.lr:g}")
    shared = run_study(dataclasses.replace(cfg, lr_sweep=[]), out, log)
    log("the study at the tuned rates")
    rates = {name: entry["lr"] for name, entry in chosen.items()}
    tuned = _study(dataclasses.replace(cfg, lr_sweep=[]), out / TUNED, log, rates, report=True)
    return shared + tuned


def _study(cfg: StudyConfig, out: Path, log, rates=None, report: bool = False) -> list[dict]:
    """One part of the sweep study, in a folder of its own, its lock let go when it ends
    (OUT's stays with the caller, as for any study); `report`: its own report too."""
    from loraplace.analysis.report import build
    from loraplace.core.lock import release
    from loraplace.study.runner import run_study

    try:
        found = run_study(cfg, out, log, lr_by_strategy=rates)
        if report:
            build(out)
        return found
    finally:
        release(out)
