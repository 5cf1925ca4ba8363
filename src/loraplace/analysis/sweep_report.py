"""The report's part for a study run with `--lr-sweep` (study/sweep.py): the sweep's curves,
the rate each strategy took, and the verdict at the shared rate and at the tuned rates.

    blocks = sweep_blocks(out, shared_headline, tables)   # [] for a study without a sweep
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from loraplace.analysis import plots
from loraplace.core.results import load_results

CHOSEN = "lr_sweep.json"  # OUT/lr_sweep.json: the sweep's splits, curves and picks
TUNED = "tuned"  # OUT/tuned/: the study at each strategy's picked rate
FIGURE = "lr_sweep.png"


def read_sweep(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / CHOSEN).read_text())
    except (OSError, ValueError):
        return None


def sweep_table(sweep: dict) -> pd.DataFrame:
    """One row per strategy: its development loss at every rate, and the rate it took."""
    rates = [repr(float(r)) for r in sweep["rates"]]
    rows = []
    for name, entry in sweep["strategies"].items():
        row = {"strategy": name}
        row |= {f"lr {float(r):g}": entry["curve"].get(r, float("nan")) for r in rates}
        rows.append(row | {"picked lr": entry["lr"]})
    return pd.DataFrame(rows)


def sweep_blocks(out: Path, shared: str, tables) -> list[tuple[str, object]]:
    """The report's blocks for the sweep. `shared`: the verdict at the shared rate (the
    study's own headline); `tables(results)` -> (agg, comparisons, headline) for OUT/tuned."""
    sweep = read_sweep(out)
    if sweep is None:
        return []
    plots.lr_sweep(sweep, Path(out) / FIGURE)
    tuned = load_results(Path(out) / TUNED)
    tuned_text = tables(tuned)[2] if tuned else "The study at the tuned rates has no results yet."
    return [
        ("h2", "Each strategy at its own learning rate"),
        (
            "p",
            f"Every strategy was trained at each rate with seed {sweep['seed']} on "
            f"{sweep['train_split']} and evaluated on the development rows "
            f"{sweep['dev_split']}, never on the evaluation rows; each took the rate with its "
            "lowest development loss (eval loss, token-weighted).",
        ),  # fmt: skip
        ("table", sweep_table(sweep)),
        ("img", FIGURE),
        ("p", f"At the shared rate ({sweep['shared_lr']:g}): {shared}"),
        ("p", f"At each strategy's own rate (OUT/{TUNED}, its own report): {tuned_text}"),
    ]
