"""`make bench`: the same study the plain way and loraplace's way, side by side.

    python benchmarks/bench.py --data ../shared/data/alpaca_head200.json --out runs/bench

(a) plain: the seed's pipeline, Hugging Face Trainer + PEFT, every example padded to
    max_length, batch 1 x grad-accum 4, one placement after another, each in a fresh process
    that reloads the model (every fast path off: `StudyConfig.plain`); (b) loraplace: the defaults, no
    padding (examples packed in chunks of at most 1.5 x max_length tokens, attention per
    example), the 4 micro-batches as one optimizer step, fused LoRA layers and SwiGLU blocks,
    the output head and its loss in token blocks, frozen products through oneDNN (in bfloat16
    with float32 accumulation where the CPU multiplies it natively: `product_dtype`, the one
    switch that changes rounding; evaluation stays float32), freed buffers
    returned to the OS, the untrained model evaluated once per study, and every run forked from
    one server process that imported the ML stack once, all of them one study, as
    `loraplace study` runs them (on a CPU several at once where that ends it sooner).
Both are evaluated by the same code (packed rows, the head in token blocks). loraplace's study
runs after the first plain run and before the others, so both see the machine in much the
same state. Results: OUT/bench.json and OUT/bench.md. Not a test: no asserts.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraplace.config import StudyConfig
from loraplace.core.results import write_json, write_text


def matmul_peak_gflops(size: int = 2048, reps: int = 8) -> dict[str, float]:
    """Best float32 matrix-product rate of this machine in GFLOP/s, per library torch can use
    here: the default BLAS and, on CPU, oneDNN (on the AMD development machine MKL reached 149
    and oneDNN 211: MFU is taken against the faster)."""
    from loraplace.fast.kernels import linear, onednn_available

    a, b = torch.randn(size, size), torch.randn(size, size)
    found = {}
    for name, onednn in (("blas", False), ("onednn", True)):
        if onednn and not onednn_available():
            continue
        linear(a, b, onednn=onednn)
        best = 0.0
        for _ in range(reps):
            start = time.perf_counter()
            linear(a, b, onednn=onednn)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
        found[name] = best
    return found


def training_flops(result: dict, lengths: list[int], epochs: float) -> float:
    """The arithmetic training really needs: real tokens only, no padding, no masked blocks.

    Per token, every frozen linear (decoder blocks and output head) costs 2*in*out forward and
    2*in*out backward (input gradient only); every adapter 2*r*(in+out) forward and twice that
    backward (input and weight gradients); causal attention 4*L*d per layer forward for a
    sequence of L tokens (half of L^2 scores, QK and AV), twice that backward.
    """
    arch = result["architecture"]
    tokens = sum(lengths)
    frozen = 4 * arch["linear_macs_per_token"] * tokens
    lora = 6 * sum(r * (i + o) for _, i, o, r in arch["adapters"]) * tokens
    attention = 3 * 4 * arch["n_layers"] * arch["attn_dim"] * sum(n * n / 2 for n in lengths)
    return (frozen + lora + attention) * epochs


def _row(name: str, plain: dict, fast: dict, peak: float, flops: tuple[float, float]) -> dict:
    row = {"strategy": name}
    for tag, r, f in (("plain", plain, flops[0]), ("loraplace", fast, flops[1])):
        m = r.get("metrics", {})
        row[f"{tag}_wall_s"] = r["wall_s"]
        row[f"{tag}_train_s"] = m.get("train_time_s")
        row[f"{tag}_tokens_per_s"] = m.get("tokens_per_s")
        row[f"{tag}_gflops"] = f / m["train_time_s"] / 1e9 if m else None
        row[f"{tag}_mfu_pct"] = 100 * row[f"{tag}_gflops"] / peak if m else None
        row[f"{tag}_peak_memory_mb"] = m.get("peak_memory_mb")
        row[f"{tag}_eval_loss"] = m.get("eval_loss")
        row[f"{tag}_product_dtype"] = r.get("product_dtype")
        # a run's fixed cost: everything but training (load, checks, evaluations, saving)
        row[f"{tag}_outside_train_s"] = r["wall_s"] - m["train_time_s"] if m else None
        row[f"{tag}_phases_s"] = r.get("phases_s")
    # runs that went at once shared the machine: only the study's total compares end to end;
    # a run that failed gives no speedup (it ended early, not fast)
    ok = plain.get("status") == "ok" and fast.get("status") == "ok"
    row["speedup"] = plain["wall_s"] / fast["wall_s"] if ok and _alone(fast) else None
    row["status"] = "ok" if ok else "failed: " + "; ".join(
        f"{tag} {r.get('error')}" for tag, r in (("plain", plain), ("loraplace", fast))
        if r.get("status") != "ok"
    )  # fmt: skip
    if plain.get("metrics") and fast.get("metrics"):
        a, b = plain["metrics"]["eval_loss"], fast["metrics"]["eval_loss"]
        row["eval_loss_diff_pct"] = 100 * (b - a) / a
    return row


def _alone(result: dict) -> bool:
    return (result.get("runs_at_once") or 1) <= 1


def render(report: dict) -> str:
    cols = [("strategy", "strategy"), ("plain_wall_s", "plain wall s"), ("loraplace_wall_s", "loraplace wall s"), ("speedup", "speedup"),
            ("plain_tokens_per_s", "plain tok/s"), ("loraplace_tokens_per_s", "loraplace tok/s"), ("plain_mfu_pct", "plain MFU %"),
            ("loraplace_mfu_pct", "loraplace MFU %"), ("plain_peak_memory_mb", "plain peak MB"), ("loraplace_peak_memory_mb", "loraplace peak MB"),
            ("plain_eval_loss", "plain eval loss"), ("loraplace_eval_loss", "loraplace eval loss"), ("eval_loss_diff_pct", "eval loss diff %"),
            ("plain_outside_train_s", "plain outside training s"), ("loraplace_outside_train_s", "loraplace outside training s")]  # fmt: skip
    cells = [
        ["–" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)
         for v in (row.get(key) for key, _ in cols)]
        for row in report["rows"] + [report["total"]]
    ]  # fmt: skip
    table = _md_table(cells, [h for _, h in cols])
    head = (
        f"Machine: {report['machine']}; float32 matmul peak measured at {report['peak_gflops']:.0f} GFLOP/s "
        f"(best of {', '.join(f'{k} {v:.0f}' for k, v in report.get('peak_gflops_by_library', {}).items())}). "
        f"Study: {report['study']}. MFU counts only the arithmetic training needs (real tokens, "
        "no padding) over training time, against the float32 peak."
    )
    low = sorted({r.get("loraplace_product_dtype") for r in report["rows"]} - {None, "float32"})
    if low:
        head += (
            f" loraplace's frozen training products ran in {', '.join(low)} with float32 "
            "accumulation (`product_dtype`), the plain path's in float32; evaluation is float32 "
            "on both."
        )
    if report.get("paths"):
        head += f" loraplace's {report['paths']}."
    at_once = report.get("loraplace_runs_at_once") or 1
    if at_once > 1:
        threads = report.get("loraplace_threads")
        head += (
            f" loraplace ran the strategies as one study, {at_once} runs at once"
            + (f", {threads} thread{'s' if threads != 1 else ''} each" if threads else "")
            + " (as `loraplace study` chooses here): a run's times and rates are its share of "
            "the machine, so speedups are the study's, end to end (total row; its tok/s and "
            "MFU over the study's wall time), against the plain runs one after another."
        )
    return head + "\n\n" + table + "\n\n" + render_fixed_costs(report["rows"])


def _md_table(cells: list[list[str]], columns: list[str]) -> str:
    """The report's markdown table of already formatted cells. Imported here, not at the top:
    `make bench-gpu` imports this module in a bare GPU python (the report needs matplotlib)."""
    import pandas as pd

    from loraplace.analysis.report import md_table

    return md_table(pd.DataFrame(cells, columns=columns))


# A run's parts outside training, as the run times them (train/run.py, `phases_s`).
PHASES = {"load": "load", "checks": "checks", "base_eval": "base evaluation", "attach": "attach",
          "epoch_evals": "epoch evaluations", "generations": "generations", "save": "save"}  # fmt: skip


def render_fixed_costs(rows: list[dict]) -> str:
    """Where each run's time outside training went, in seconds: the phases the run timed, and
    the rest of its wall time as `other` (on the plain path the whole script's: starting the
    process, the study's own setup)."""
    found = [k for k in PHASES if any(k in (r.get(f"{t}_phases_s") or {}) for r in rows
                                      for t in ("plain", "loraplace"))]  # fmt: skip
    cols = ["strategy", "path"] + [PHASES[k] for k in found] + ["other", "outside training"]
    cells = []
    for row in rows:
        for tag in ("plain", "loraplace"):
            outside, phases = row.get(f"{tag}_outside_train_s"), row.get(f"{tag}_phases_s") or {}
            if outside is None:
                continue
            timed = [phases.get(k, 0.0) for k in found]
            cells.append([row["strategy"], tag] + [
                f"{v:.2f}" for v in (*timed, outside - sum(timed), outside)
            ])  # fmt: skip
    table = _md_table(cells, cols)
    return "Time outside training, per run (s):\n\n" + table + "\n"


def run_bench(cfg: StudyConfig, out: Path, log=print) -> dict:
    """Each strategy the plain way, and all of them as loraplace's study; bench.json and
    bench.md."""
    from loraplace.study.prepare import describe_paths, prepare

    out = Path(out)
    prepared = prepare(cfg)
    strategies = prepared.strategies
    peaks = matmul_peak_gflops()
    peak = max(peaks.values())
    log(
        f"bench: float32 matmul peak {peak:.0f} GFLOP/s; {len(strategies)} strategies, plain one by one, loraplace as one study after the first"
    )
    lengths = _train_lengths(cfg)
    results, study_wall = _run_both(cfg, strategies, out, log, prepared.paths.precision)
    rows = []
    for s in strategies:
        plain, fast = results["plain"][s.name], results["loraplace"][s.name]
        flops = tuple(
            training_flops(r, lengths, cfg.epochs) if r.get("architecture") else 0.0
            for r in (plain, fast)
        )
        rows.append(_row(s.name, plain, fast, peak, flops))
    first = next(iter(results["loraplace"].values()))
    report = {
        "study": f"{cfg.model} on {cfg.data} {cfg.train_split} / {cfg.eval_split}, {cfg.epochs:g} epochs, "
        f"{', '.join(s.name for s in strategies)}, seed {cfg.seeds[0]}",
        "machine": f"{first.get('machine', {}).get('platform')}, {first.get('machine', {}).get('cpus')} CPUs, device {first.get('device')}",
        "peak_gflops": peak,
        "peak_gflops_by_library": peaks,
        "paths": describe_paths(prepared.paths, prepared.products),
        "train_tokens_per_epoch": sum(lengths),
        "rows": rows,
        "total": _total(rows, peak, sum(lengths) * cfg.epochs, study_wall, not _alone(first)),
        "loraplace_runs_at_once": first.get("runs_at_once"),
        "loraplace_threads": first.get("threads"),
        "config": cfg.to_dict(),
    }
    write_json(out / "bench.json", report)
    write_text(out / "bench.md", render(report))
    return report


def _train_lengths(cfg: StudyConfig) -> list[int]:
    """Tokens of every training example, for the FLOP count."""
    from loraplace.data.chat import use_chat_template
    from loraplace.data.rows import load_rows, tokenize
    from loraplace.plan.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.trust_remote_code))
    use_chat_template(tokenizer, cfg.chat_template)
    rows = load_rows(cfg.data, cfg.train_split, cfg.data_format)
    return [len(e.input_ids) for e in tokenize(rows, tokenizer, cfg.max_length, cfg.loss_on)]


def _run_both(
    cfg: StudyConfig, strategies, out: Path, log, precision: str = "float32"
) -> tuple[dict[str, dict], float]:
    """({"plain": {strategy: result}, "loraplace": {...}}, loraplace's study wall time), each
    result with its run's wall time. The plain path runs the placements one after another,
    each a study of its own, as the seed's scripts do; loraplace runs them as one study."""
    from loraplace.study.runner import run_study

    results: dict[str, dict] = {"plain": {}, "loraplace": {}}
    for tag in results:  # nothing carried over from an earlier benchmark
        (out / tag / "base_eval.json").unlink(missing_ok=True)
        shutil.rmtree(out / tag / "runs", ignore_errors=True)
    settings = dict(
        seeds=cfg.seeds[:1],
        generations=0,
        checkpoint_minutes=None,  # both paths: training speed, not checkpoint writes
        checkpoint_every=None,
        report_to=[],
    )

    def study(tag: str, base: StudyConfig, names: list[str]) -> tuple[dict, float]:
        start = time.perf_counter()
        found = run_study(replace(base, strategies=names, **settings), out / tag,
                          log=lambda line: log(f"[{tag}] {line}"))  # fmt: skip
        for r in found:
            timing = r.get("timing", {})
            r["wall_s"] = timing.get("finished", 0.0) - timing.get("started", 0.0)
        return {r["strategy"]: r for r in found}, time.perf_counter() - start

    # the plain pipeline computes in loraplace's precision (bf16 on a GPU): a speedup is never
    # one precision against another
    plain_cfg = replace(cfg.plain(), precision=precision)

    def plain(s) -> None:  # a ranked strategy needs the others to be planned
        found, wall = study("plain", plain_cfg, [s.name] if not s.rank_by_role else cfg.strategies)
        results["plain"][s.name] = found[s.name] | {"wall_s": wall}  # the script, as one waits

    plain(strategies[0])
    results["loraplace"], study_wall = study("loraplace", cfg, cfg.strategies)
    for s in strategies[1:]:
        plain(s)
    return results, study_wall


def _total(
    rows: list[dict], peak: float, tokens_per_run: float, study_wall: float, concurrent: bool
) -> dict:
    """The totals row: times summed (loraplace's wall: its study's), memory the largest,
    throughput over all training time, or, for runs that went at once, over the study's wall
    time (their training overlapped: their times do not add up)."""
    total = {"strategy": "total"}
    for key in ("plain_wall_s", "plain_train_s", "loraplace_train_s",
                "plain_outside_train_s", "loraplace_outside_train_s"):  # fmt: skip
        total[key] = sum(r[key] or 0 for r in rows)
    total["loraplace_wall_s"] = study_wall
    failed = any(r.get("status", "ok") != "ok" for r in rows)
    total["speedup"] = None if failed else total["plain_wall_s"] / study_wall
    for tag in ("plain", "loraplace"):
        total[f"{tag}_peak_memory_mb"] = max(r[f"{tag}_peak_memory_mb"] or 0 for r in rows)
        train_s = sum(r[f"{tag}_train_s"] or 0 for r in rows)
        gflop = sum((r[f"{tag}_gflops"] or 0) * (r[f"{tag}_train_s"] or 0) for r in rows)
        if tag == "loraplace" and concurrent:
            total[f"{tag}_gflops"] = gflop / study_wall
            total[f"{tag}_tokens_per_s"] = tokens_per_run * len(rows) / study_wall
            total[f"{tag}_mfu_pct"] = 100 * total[f"{tag}_gflops"] / peak
            continue
        total[f"{tag}_gflops"] = gflop / train_s if train_s else None
        total[f"{tag}_mfu_pct"] = 100 * total[f"{tag}_gflops"] / peak if train_s else None
        total[f"{tag}_tokens_per_s"] = tokens_per_run * len(rows) / train_s if train_s else None
    return total


def main(argv: list[str] | None = None) -> int:
    import argparse

    from loraplace.cli import add_study_args, study_config
    from loraplace.core.errors import UserError
    from loraplace.core.quiet import quiet_libraries

    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py", description=__doc__.split("\n")[0]
    )
    add_study_args(parser)
    parser.add_argument("--out", default="runs/bench", help="benchmark folder (runs/bench)")
    args = parser.parse_args(argv)
    quiet_libraries()
    defaults = {} if args.config else {"model": "embedded", "data": "embedded",
                                       "strategies": ["full", "attention", "ffn"]}  # fmt: skip
    try:
        report = run_bench(
            study_config(args, defaults), args.out, log=lambda x: print(x, flush=True)
        )
    except UserError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    print()
    print(render(report))
    print(f"results: {args.out}/bench.json and {args.out}/bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
