"""`loraplace report OUT`: tables, statistics, figures and the report, only from result files.

    loraplace report runs/offline     # writes summary.*, aggregate.csv, comparisons.csv,
                                      # curves.png, tradeoff.png, pareto.png, placement.png,
                                      # report.md and report.html (one self-contained file)

Runs that failed or are missing are listed, never silently dropped; results from an earlier
version without per-example losses still give the tables, and the report says what is missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from loraplace.analysis import plots, stats
from loraplace.analysis.answer import comparison_blocks, headline
from loraplace.analysis.compare import COMPARISON_COLUMNS, Comparison, compare
from loraplace.analysis.metrics import METRICS, per_example
from loraplace.analysis.sweep_report import sweep_blocks
from loraplace.core.errors import UserError
from loraplace.core.results import (
    SUMMARY_COLUMNS,
    damaged_results,
    load_results,
    summary_rows,
    write_text,
)

HYPERPARAMETERS = (
    "rank",
    "alpha",
    "dropout",
    "bias",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "scheduler",
    "warmup_ratio",
    "weight_decay",
    "optimizer",
    "max_length",
    "loss_on",
)


def _fmt(x) -> str:
    if x is pd.NA or x is None:  # a missing count (Int64 columns)
        return "–"
    if isinstance(x, float | np.floating):
        if math.isnan(x):
            return "–"
        return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}"
    if isinstance(x, int | np.integer) and not isinstance(x, bool):
        return f"{x:,}" if abs(x) >= 1e4 else str(x)  # parameter counts: 4,884,480
    return str(x)


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _read_config(out: Path) -> dict:
    path = out / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    except yaml.YAMLError:
        return {}


def _read_study(out: Path, config: dict) -> dict:
    """The study's runs in order (OUT/study.json, written by `loraplace study`); for a folder
    from before it, the same read from its config."""
    try:
        return json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        pass
    names = [s.split("=")[0].strip() for s in config.get("strategies", [])]
    seeds = config.get("seeds", [])
    return {"strategies": names, "seeds": seeds,
            "runs": [{"strategy": n, "seed": s} for s in seeds for n in names]}  # fmt: skip


def _missing(study: dict, results: list[dict]) -> list[str]:
    """Runs the study asks for (its depth sweep included) with no result file."""
    have = {(r["strategy"], r["seed"]) for r in results}
    return [f"{r['strategy']} seed {r['seed']}" for r in study.get("runs", [])
            if (r["strategy"], r["seed"]) not in have]  # fmt: skip


def tables(
    results: list[dict], reference: str, compare_with: str, smallest_effect: float = 0.01
) -> tuple[pd.DataFrame, pd.DataFrame, list[Comparison]]:
    """(one row per run, one per strategy, each metric's comparisons) from the results."""
    summary = pd.DataFrame(summary_rows(results, reference), columns=SUMMARY_COLUMNS)
    agg = stats.aggregate(summary)
    params = summary.groupby("strategy", sort=False)["trainable_params"].first()
    agg.insert(2, "trainable_params", agg["strategy"].map(params))
    comparisons = []
    for metric in METRICS:
        found = per_example(results, metric)
        if found is None or len(found.values) < 2:
            continue
        if next(iter(found.values.values())).shape[1] < 2:
            continue  # a comparison over examples needs two of them
        ref = reference if compare_with == "reference" else None
        comparisons.append(compare(found, ref, smallest_effect))
    return summary, agg, comparisons


def comparisons_csv(comparisons: list[Comparison]) -> pd.DataFrame:
    """Every metric's comparison rows in one table (COMPARISON_COLUMNS)."""
    frames = [c.table for c in comparisons if len(c.table)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=COMPARISON_COLUMNS)  # fmt: skip


def smallest_effect_of(value, config: dict) -> float:
    """The smallest relative difference of interest: the option, else the study's config key,
    else 1 %; UserError for anything but a fraction in (0, 1]."""
    value = config.get("smallest_effect", 0.01) if value is None else value
    try:
        found = float(value)
    except (TypeError, ValueError):
        found = math.nan
    if not 0 < found <= 1:
        raise UserError(
            f"smallest_effect must be a fraction above 0 and at most 1 (0.01 is a 1 % "
            f"difference), not {value!r}"
        )
    return found


def _by_run(runs: list[dict], label) -> tuple[str, bool]:
    """(the runs' common `label(run)`, or each label with its runs; whether they differ)."""
    found: dict[str, list[str]] = {}
    for r in runs:
        found.setdefault(label(r), []).append(f"{r['strategy']} seed {r['seed']}")
    if len(found) == 1:
        return next(iter(found)), False
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in found.items()), True


def _products(runs: list[dict]) -> str:
    """How training's frozen products were rounded, run by run where they differ (results
    from before the switch: float32)."""
    words = {
        "bfloat16": "bfloat16, float32 accumulation (adapters, optimizer, evaluation in float32)"
    }
    dtype = lambda r: r.get("product_dtype") or "float32"  # noqa: E731
    return _by_run(runs, lambda r: words.get(dtype(r), dtype(r)))[0]


def _threads(runs: list[dict]) -> str:
    """Each run's threads and how many runs went at once, run by run where they differ:
    training times compare between runs that ran alike."""
    beside = _overlap(runs)

    def label(r: dict) -> str:
        if r.get("threads") is None:
            return "not recorded"
        threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''} a run"
        at_once, cpus = r.get("runs_at_once"), (r.get("machine") or {}).get("cpus")
        if at_once is None:
            return threads
        at_once = min(at_once, beside.get(id(r), at_once))  # a last round may hold fewer
        if at_once <= 1:
            return threads + ", one run at a time"
        shared = cpus and at_once * r["threads"] > cpus  # the OS shares the cores out
        return threads + f", {at_once} runs at once" + (f" sharing {cpus} cores" if shared else "")

    text, differ = _by_run(runs, label)
    return text + (" (training times compare only between runs that ran alike)" if differ else "")


def _overlap(runs: list[dict]) -> dict[int, int]:
    """How many runs were going, on average over each run's time, itself included (runs with
    their wall-clock start and end; keyed by id)."""
    spans = {id(r): (t["started"], t["finished"]) for r in runs
             if "started" in (t := r.get("timing") or {}) and "finished" in t}  # fmt: skip
    found = {}
    for key, (start, end) in spans.items():
        if end <= start:
            continue
        shared = sum(
            max(0.0, min(end, e) - max(start, s)) for k, (s, e) in spans.items() if k != key
        )
        found[key] = round(1 + shared / (end - start))
    return found


def _setup(first: dict, runs: list[dict]) -> list[tuple[str, str]]:
    cfg = first.get("config", {})
    data = first.get("data", {})
    rows = [
        ("model", str(cfg.get("model"))),
        (
            "data",
            f"{data.get('name', cfg.get('data'))}{_format(data)}: train {cfg.get('train_split')} ({data.get('train_rows', '?')} rows), eval {cfg.get('eval_split')} ({data.get('eval_rows', '?')} rows, {data.get('eval_target_tokens', '?')} target tokens)",
        ),
        (
            "device",
            f"{first.get('device')} on {first.get('machine', {}).get('platform')} ({first.get('machine', {}).get('cpus')} CPUs)",
        ),
        ("frozen products in training", _products(runs or [first])),
        ("threads", _threads(runs or [first])),
        ("git", str(first.get("git_hash"))),
        ("packages", ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items() if v)),
    ]
    rows += [(k, str(cfg[k])) for k in HYPERPARAMETERS if k in cfg]
    return rows + [("fast paths", _fast_paths(cfg))]


def _format(data: dict) -> str:
    """' (messages)': the records' format, where a result says it (older ones are Alpaca)."""
    return f" ({data['format']})" if data.get("format") else ""


def _fast_paths(cfg: dict) -> str:
    """Which speed switches were at their plain-pipeline value; the rest were on."""
    from loraplace.config import FAST_PATHS

    off = [p.key for p in FAST_PATHS if p.key in cfg and cfg[p.key] == p.plain]
    return "all on or auto (README, Fast paths)" if not off else "off: " + ", ".join(off)


REPORT_FILES = (
    "summary.csv",
    "summary.md",
    "aggregate.csv",
    "comparisons.csv",
    "curves.png",
    "tradeoff.png",
    "pareto.png",
    "placement.png",
    "report.md",
    "report.html",
)


def build(
    out: Path,
    reference: str | None = None,
    compare_with: str | None = None,
    smallest_effect: float | None = None,
) -> dict[str, Path]:
    """Write every table, figure and report under `out`; return their paths.

    Args:
        out: The study's folder.
        reference: The reference strategy (default: the study's config, else full).
        compare_with: "all" pairs or each against the "reference" (default: the config's).
        smallest_effect: The power plan's smallest relative difference of interest (default:
            the config's smallest_effect, else 0.01).
    """
    out = Path(out)
    results, damaged = _results(out)
    config = _read_config(out)
    study = _read_study(out, config)
    _sort_as_configured(results, study)
    reference = reference or config.get("reference", "full")
    compare_with = compare_with or config.get("compare", "all")
    effect = smallest_effect_of(smallest_effect, config)
    summary, agg, comparisons = tables(results, reference, compare_with, effect)
    ok = [r for r in results if r.get("status") == "ok"]
    paths = {name: out / name for name in REPORT_FILES}
    _write_tables(paths, summary, agg, comparisons_csv(comparisons))
    if ok:
        _draw_figures(paths, agg, ok)
    notes = _notes(results, ok, damaged, _missing(study, results), agg, comparisons)
    blocks = report_blocks(ok[0] if ok else results[0], summary, agg, comparisons, notes, ok, paths)

    def tuned(found: list[dict]):
        _, t_agg, t_comparisons = tables(found, reference, compare_with, effect)
        return t_agg, t_comparisons, headline(t_agg, t_comparisons)

    sweep = sweep_blocks(out, headline(agg, comparisons), tuned)
    blocks[3:3] = sweep  # after the answer
    write_text(paths["report.md"], render_md(blocks))
    write_text(paths["report.html"], render_html(blocks, out))
    return paths


def _results(out: Path) -> tuple[list[dict], list[str]]:
    """(the run results under `out`, a line per damaged result file); refused if none loads."""
    if not out.is_dir():
        raise UserError(f"results folder {str(out)!r} does not exist")
    results = load_results(out)
    damaged = [
        f"{p.parent.parent.name} {p.parent.name.replace('-', ' ')}: result.json {why}"
        for p, why in damaged_results(out)
    ]
    if not results:
        also = f" ({'; '.join(damaged)})" if damaged else ""
        raise UserError(
            f"no run results under {str(out / 'runs')!r}{also}; run `loraplace study --out {out}` "
            "first"
        )
    return results, damaged


def _sort_as_configured(results: list[dict], study: dict) -> None:
    """Sort in place: strategies in the study's order (others after, by name), then by seed."""
    order = study.get("strategies", [])
    results.sort(
        key=lambda r: (
            order.index(r["strategy"]) if r["strategy"] in order else len(order),
            r["strategy"],
            r["seed"],
        )
    )


def _write_tables(paths: dict[str, Path], summary, agg, comparisons) -> None:
    write_text(paths["summary.csv"], summary.to_csv(index=False))
    write_text(paths["summary.md"], md_table(summary) + "\n")
    write_text(paths["aggregate.csv"], agg.to_csv(index=False))
    write_text(paths["comparisons.csv"], comparisons.to_csv(index=False))


def _draw_figures(paths: dict[str, Path], agg: pd.DataFrame, ok: list[dict]) -> None:
    plots.curves(ok, paths["curves.png"])
    plots.tradeoff(agg, paths["tradeoff.png"])
    plots.tradeoff(
        agg, paths["pareto.png"], panels=("trainable_params", "train_time_s", "peak_memory_mb")
    )
    plots.placement_map(ok, paths["placement.png"])


def _notes(
    results: list[dict], ok: list[dict], damaged: list[str], missing: list[str], agg,
    comparisons: list[Comparison],
) -> list[str]:  # fmt: skip
    """What the report's tables leave out or cannot say, a paragraph each: failed, damaged and
    missing runs, fast paths that fell back, runs without per-example losses, examples left
    out, a single seed."""
    notes = []
    failed = [
        f"{r['strategy']} seed {r['seed']}: {r.get('error', 'unknown error')}"
        for r in results
        if r.get("status") != "ok"
    ]
    old = [f"{r['strategy']} seed {r['seed']}" for r in ok if "per_example" not in r]
    if failed:
        notes.append("Failed runs (left out of every table below): " + "; ".join(failed))
    fallbacks = sorted({f"{n['switch']} ({n['why']})" for r in ok for n in r.get("fallbacks", [])})
    if fallbacks:
        notes.append("Fast paths that fell back to the plain path here: " + "; ".join(fallbacks))
    if damaged:
        notes.append(
            "Damaged result files (left out of every table; `loraplace study` runs them again): "
            + "; ".join(damaged)
        )
    if missing:
        notes.append("Missing runs (no result file yet): " + ", ".join(missing))
    if old:
        notes.append(
            "Runs without per-example losses (an earlier version; left out of the comparisons): "
            + ", ".join(old)
        )
    for c in comparisons:
        if c.found.dropped:
            notes.append(
                f"{c.found.dropped} evaluation examples without target tokens or with a missing "
                f"{c.found.metric.label} in some run are left out of the comparisons of "
                f"{c.found.metric.label}."
            )
    if agg["n_seeds"].max() < 2:
        notes.append(
            "One seed per strategy: the intervals over seeds are empty, and the comparisons "
            "across training seeds give no verdict, since the seed-to-seed variance cannot be "
            "measured from one seed; the per-example tests below hold these trained adapters "
            "fixed and say nothing about another seed. Run several seeds (--seed 42 --seed 43 "
            "--seed 44) for that."
        )
    return notes


RESULT_COLUMNS = [
    "strategy",
    "n_seeds",
    "trainable_params",
    "eval_loss_mean",
    "eval_loss_ci_low",
    "eval_loss_ci_high",
    "perplexity_mean",
    "eval_loss_all_tokens_mean",
    "rouge_l_mean",
    "exact_match_mean",
    "train_time_s_mean",
    "peak_memory_mb_mean",
]
FIGURES = (
    ("tradeoff.png", "Trainable parameters against eval loss (dashed: Pareto frontier)"),
    ("pareto.png", "Parameters, training time and peak memory against eval loss"),
    ("curves.png", "Loss curves"),
    ("placement.png", "Where the adapters sit (LoRA rank by layer and role)"),
)


def report_blocks(first, summary, agg, comparisons, notes, ok, paths) -> list[tuple[str, object]]:
    """The report as (kind, content) blocks, in order: answer, setup, what is missing, results,
    every run, the comparisons (answer.py), the figures drawn, generations."""
    blocks: list[tuple[str, object]] = [
        ("h1", "loraplace report: where should the LoRA adapters go?"),
        ("h2", "Answer"),
        ("p", headline(agg, comparisons)),
    ]
    blocks += [("h2", "Setup"), ("table", pd.DataFrame(_setup(first, ok), columns=["", "value"]))]
    if notes:
        blocks += [("h2", "What is missing")] + [("p", n) for n in notes]
    blocks += [
        ("h2", "Results (mean over seeds, 95% Student-t interval)"),
        ("table", agg[[c for c in RESULT_COLUMNS if c in agg]]),
    ]
    blocks += [("h2", "Every run"), ("table", summary)]
    blocks += comparison_blocks(comparisons)
    for name, title in FIGURES:
        if paths[name].is_file():
            blocks += [("h2", title), ("img", name)]
    return blocks + _generation_blocks(ok)


def _generation_blocks(ok: list[dict]) -> list[tuple[str, object]]:
    """Each evaluation prompt with the untrained model's generation and every strategy's (from
    its lowest seed); nothing where no run generated."""
    gens = [
        (r["strategy"], r["generations"])
        for r in ok
        if r.get("generations")
        and r["seed"] == min(x["seed"] for x in ok if x["strategy"] == r["strategy"])
    ]
    if not gens:
        return []
    blocks: list[tuple[str, object]] = [("h2", "Greedy generations for evaluation prompts")]
    for i, g in enumerate(gens[0][1]):
        rows = [("reference", g["reference"])] if g.get("reference") is not None else []
        rows += [("untrained model", g["base"])] + [
            (name, gs[i]["adapted"]) for name, gs in gens if i < len(gs)
        ]
        blocks += [
            ("pre", g["prompt"].strip()),
            ("table", pd.DataFrame(rows, columns=["model", "generation"])),
        ]
    return blocks


def render_md(blocks) -> str:
    parts = []
    for kind, content in blocks:
        if kind == "h1":
            parts.append(f"# {content}")
        elif kind == "h2":
            parts.append(f"## {content}")
        elif kind == "p":
            parts.append(str(content))
        elif kind == "pre":
            parts.append("```\n" + str(content) + "\n```")
        elif kind == "table":
            parts.append(
                md_table(
                    content.map(
                        lambda v: (
                            str(v).replace("\n", " ").replace("|", "/") if isinstance(v, str) else v
                        )
                    )
                )
            )
        elif kind == "img":
            parts.append(f"![{content}]({content})")
    return "\n\n".join(parts) + "\n"


def render_html(blocks, out: Path) -> str:
    body = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(str(content))}</{kind}>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(str(content))}</pre>")
        elif kind == "table":
            table = content.map(_fmt).to_html(index=False, na_rep="–", border=0, classes="t")
            body.append(f'<div class="wide">{table}</div>')  # scrolls inside itself if wide
        elif kind == "img":
            data = base64.b64encode((out / content).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(content)}" src="data:image/png;base64,{data}">')
    style = "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}table.t{border-collapse:collapse;font-size:13px;margin:1em 0}table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}table.t td:first-child{text-align:left}div.wide{max-width:100%;overflow-x:auto}img{max-width:100%}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>loraplace report</title><style>{style}</style></head><body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )
