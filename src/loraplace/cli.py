"""The `loraplace` command line.

    loraplace plan --model embedded
    loraplace study --config configs/offline.yaml --out runs/offline
    loraplace status runs/offline          # while it runs, after it stopped, on a copy
    loraplace report runs/offline
    loraplace advise --model embedded --data ../shared/data/alpaca_head200.json --budget 921600

Errors a user can cause end in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from loraplace.core.errors import UserError
from loraplace.core.quiet import quiet_libraries


def cmd_plan(args) -> int:
    """What each strategy of the study's config adapts, from the model's config alone."""
    from loraplace.config import load_config
    from loraplace.plan.models import resolve_model
    from loraplace.plan.planning import plan_model, render, to_json
    from loraplace.plan.strategies import resolve_strategies

    flags = {"model": args.model, "strategies": args.strategy, "layer_study": args.layer_study,
             "equal_budget": args.equal_budget, "rank": args.rank, "alpha": args.alpha,
             "dropout": args.dropout, "bias": args.bias,
             "trust_remote_code": args.trust_remote_code or None}  # fmt: skip
    cfg = load_config(args.config, flags, args.set or [])
    source = resolve_model(cfg.model, cfg.trust_remote_code)
    strategies = resolve_strategies(cfg.strategies, cfg.layer_study)
    plan = plan_model(source, strategies, cfg.rank, cfg.bias, cfg.equal_budget)
    if args.json:
        print(json.dumps(to_json(plan), indent=2))
    else:
        tokens = cfg.batch_size * cfg.grad_accum * cfg.max_length  # a step's, packed on a GPU
        print(render(plan, cfg.rank, cfg.alpha, cfg.dropout, cfg.bias, cfg.precision,
                     cfg.quantize, tokens))  # fmt: skip
    return 0


def cmd_study(args) -> int:
    from loraplace.analysis.report import build
    from loraplace.core.lock import release
    from loraplace.study.runner import run_study
    from loraplace.study.sweep import run_sweep_study
    from loraplace.study.terminal import Output

    cfg = study_config(args)
    log = Output(quiet=args.quiet).take_terminal()  # in a terminal, all output goes through it
    try:  # run_study takes OUT's lock; the report is built under it too
        results = (run_sweep_study if cfg.lr_sweep else run_study)(cfg, args.out, log=log)
        paths = build(args.out)
    finally:
        release(args.out)
        log.close()
    print()
    print(_summary_text(paths["summary.csv"]))
    print(
        f"\nreport: {paths['report.html']} (and report.md, summary.csv, aggregate.csv, comparisons.csv, *.png in {args.out})"
    )
    failed = sum(r.get("status") != "ok" for r in results)
    if failed:  # scripts and CI must be able to tell
        print(f"loraplace: {failed} of {len(results)} runs failed", file=sys.stderr)
        return 1
    return 0


def _summary_text(csv_path) -> str:
    import pandas as pd

    df = pd.read_csv(csv_path)
    cols = [
        "strategy",
        "seed",
        "status",
        "eval_loss",
        "perplexity",
        "relative_performance_pct",
        "trainable_params",
        "param_reduction_pct",
        "train_time_s",
        "peak_memory_mb",
        "tokens_per_s",
    ]
    return df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")


def cmd_report(args) -> int:
    from pathlib import Path

    from loraplace.analysis.report import build
    from loraplace.core.lock import holding

    if not Path(args.out).is_dir():  # build() says so in its own words
        build(args.out)
    with holding(args.out, "report"):
        paths = build(args.out, args.reference, args.compare, args.smallest_effect)
    print(_summary_text(paths["summary.csv"]))
    print(f"\nreport: {paths['report.html']} and {paths['report.md']}")
    return 0


def cmd_status(args) -> int:
    from loraplace.study.status import read_status, render, study_parts, watch

    parts = study_parts(args.out)  # a study with --lr-sweep is three studies: each in turn
    if args.watch and len(parts) == 1:
        return watch(args.out, args.watch, args.json, sys.stdout)
    found = [read_status(part) for part in parts]
    if args.json:
        print(json.dumps(found[0] if len(found) == 1 else {"parts": found}, indent=1))
    else:
        print("\n\n".join(render(status) for status in found))
    return 0


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/seed.yaml, configs/offline.yaml, ...)")
    p.add_argument("--model", help="hub id, local dir, .gguf file, or 'embedded'")
    p.add_argument(
        "--data",
        help="'embedded', a JSON/JSONL file, a save_to_disk folder or a datasets id: Alpaca, "
        "messages, ShareGPT, prompt-completion or text records (--set data_format=... forces one)",
    )
    p.add_argument("--train-split", help="e.g. 'train[:100]'")
    p.add_argument("--eval-split", help="e.g. 'train[100:120]'")
    p.add_argument(
        "--strategy", action="append", help="built-in or NAME=ROLE[,ROLE...][@LAYERS] (repeatable)"
    )
    p.add_argument(
        "--layer-study", metavar="ROLES", help="add depth strategies for these roles, e.g. attn,mlp"
    )
    p.add_argument(
        "--equal-budget",
        metavar="STRATEGY",
        help="solve the other strategies' ranks to this one's size",
    )
    p.add_argument(
        "--seed", type=int, action="append", help="repeatable; every strategy runs with every seed"
    )
    p.add_argument("--epochs", type=float)
    p.add_argument(
        "--lr-sweep", type=_rates, metavar="RATES",
        help="pick each strategy's learning rate from these (1e-4,2e-4,5e-4) on a development "
        "split, then run the seeds at the shared and at the picked rates",
    )  # fmt: skip
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="local: runs one after another here (default); ray: runs as Ray tasks on a cluster",
    )
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray for this study)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable)"
    )


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive numbers: {text!r}")
    return rates


def study_config(args, defaults: dict | None = None):
    from loraplace.config import load_config

    overrides = {
        **(defaults or {}),
        "model": args.model,
        "data": args.data,
        "train_split": args.train_split,
        "eval_split": args.eval_split,
        "strategies": args.strategy,
        "seeds": args.seed,
        "epochs": args.epochs,
        "layer_study": args.layer_study,
        "equal_budget": args.equal_budget,
        "lr_sweep": getattr(args, "lr_sweep", None),
        "executor": getattr(args, "executor", None),  # commands without these flags run here
        "ray_address": getattr(args, "ray_address", None),
    }
    if defaults:  # a flag given on the command line still wins over these defaults
        overrides = {k: (v if v is not None else defaults.get(k)) for k, v in overrides.items()}
    return load_config(args.config, overrides, args.set or [])


def cmd_advise(args) -> int:
    from loraplace.advise.recommend import render, run_advise

    # the study's config, as `study` reads it (--config, flags, --set); unset: the seed's
    # setup on the embedded model and data
    given = {"rank": args.rank, "alpha": args.alpha, "bias": args.bias,
             "max_length": args.max_length, "loss_on": args.loss_on,
             "data_format": args.data_format, "chat_template": args.chat_template,
             "trust_remote_code": args.trust_remote_code or None}  # fmt: skip
    defaults = {} if args.config else {"model": "embedded", "data": "embedded"}
    cfg = study_config(args, defaults | {k: v for k, v in given.items() if v is not None})
    if args.validate:
        from loraplace.advise.validate import render_validation, run_validation

        report = run_validation(
            cfg, args.out, args.budget, args.examples, args.candidates,
            log=lambda line: print(line, flush=True),
        )  # fmt: skip
        print(render_validation(report))
        return 0
    report = run_advise(
        cfg.model, cfg.data, cfg.train_split, args.budget, cfg.rank, cfg.alpha, cfg.bias,
        args.examples, cfg.max_length, cfg.loss_on, args.score,
        trust_remote_code=cfg.trust_remote_code, data_format=cfg.data_format,
        chat_template=cfg.chat_template,
    )  # fmt: skip
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    """LoRA flags over the config; unset, the config's values (the seed's: 16, 32, 0.1, none)."""
    p.add_argument("--rank", "-r", type=int, help="LoRA rank (16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (32)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (0.1)")
    p.add_argument("--bias", choices=["none", "lora_only"], help="LoRA bias (none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplace", description="Where should the LoRA adapters go?"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_plan_parser, _study_parsers, _advise_parser, _report_parser, _status_parser):
        add(sub)
    return parser


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show what each strategy adapts and what it costs (no weights)")
    p.add_argument("--config", help="YAML study config: plan what `study` would run")
    p.add_argument(
        "--model",
        help="hub id, local dir, .gguf file, or 'embedded' (the config's: DialoGPT-medium)",
    )
    p.add_argument(
        "--strategy",
        action="append",
        help="built-in name or NAME=ROLE[,ROLE...][@LAYERS] (repeatable); "
        "default: full attention ffn seed-attention seed-ffn",
    )
    p.add_argument(
        "--layer-study", metavar="ROLES", help="add depth strategies for these roles, e.g. attn,mlp"
    )
    p.add_argument(
        "--equal-budget", metavar="STRATEGY", help="solve the others' ranks to this one's size"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow a hub model's own code (off)"
    )
    _add_lora_args(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key")
    p.set_defaults(func=cmd_plan)


def _study_parsers(sub) -> None:
    p = sub.add_parser("study", help="train every strategy x seed and compare them")
    add_study_args(p)
    p.add_argument(
        "--out", required=True, help="results folder (finished runs are kept and skipped)"
    )
    p.add_argument(
        "--quiet", action="store_true", help="print only each run's start and end, and failures"
    )
    p.set_defaults(func=cmd_study)


def _advise_parser(sub) -> None:
    p = sub.add_parser(
        "advise", help="predict where the adapters should go from a few batches of your data"
    )
    p.add_argument("--model", help="hub id, local dir with weights, .gguf file, or 'embedded'")
    p.add_argument(
        "--data",
        help="'embedded', a JSON/JSONL file, a save_to_disk folder or a datasets id: Alpaca, "
        "messages, ShareGPT, prompt-completion or text records",
    )
    p.add_argument(
        "--data-format",
        choices=["auto", "alpaca", "messages", "prompt_completion", "text"],
        help="the records' format (auto: read from their fields)",
    )
    p.add_argument("--chat-template", help="a Jinja file for conversations (auto: the model's)")
    p.add_argument("--train-split", help="rows to score on, e.g. 'train[:100]'")
    p.add_argument(
        "--budget", type=int, help="trainable parameters (default: attention's at --rank)"
    )
    p.add_argument("--rank", "-r", type=int, help="LoRA rank for the budget (16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (32)")
    p.add_argument("--bias", choices=["none", "lora_only"], help="LoRA bias (none)")
    p.add_argument("--examples", type=int, default=16, help="training examples to score on (16)")
    p.add_argument("--max-length", type=int, help="tokens per example (256)")
    p.add_argument(
        "--loss-on",
        choices=["all", "response"],
        help="loss on all tokens or the response (the config's)",
    )
    p.add_argument(
        "--score",
        default="lora_b",
        help="score that picks the placement: lora_b, grad, plop, params (lora_b: docs/advise.md)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow a hub model's own code (off)"
    )
    p.add_argument(
        "--validate", action="store_true",
        help="train the candidates at the budget with every --seed and measure the scores",
    )  # fmt: skip
    p.add_argument("--out", default="runs/advise", help="validation folder (runs/advise)")
    p.add_argument("--config", help="YAML study config (model, data, LoRA and training settings)")
    p.add_argument("--eval-split", help="--validate: evaluation rows, e.g. 'train[100:120]'")
    p.add_argument("--seed", type=int, action="append", help="--validate: repeatable")
    p.add_argument("--epochs", type=float, help="--validate: epochs per run")
    p.add_argument("--candidates", help="--validate: comma-separated candidate names (all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any study config key")
    p.set_defaults(func=cmd_advise, strategy=None, layer_study=None, equal_budget=None)


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="rebuild tables, statistics, figures and report.html from results"
    )
    p.add_argument("out", help="results folder of a study")
    p.add_argument("--reference", help="reference strategy (default: the study's, else full)")
    p.add_argument(
        "--compare", choices=["all", "reference"], help="all pairs, or each against the reference"
    )
    p.add_argument(
        "--smallest-effect",
        type=float,
        metavar="FRACTION",
        help="the power plan's smallest relative difference of interest (default: the study's "
        "smallest_effect, else 0.01: 1 %%)",
    )
    p.set_defaults(func=cmd_report)


def _status_parser(sub) -> None:
    p = sub.add_parser("status", help="where a study stands: its runs and when it will end")
    p.add_argument("out", help="results folder of a study (running, stopped or a copy)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
        help="print it again every SECONDS (2) until the study has ended",
    )  # fmt: skip
    p.set_defaults(func=cmd_status)


def _resume_hint(args, argv: list[str] | None) -> str:
    """For a study stopped by Ctrl-C: the command that carries on where it stopped."""
    if args.command != "study":
        return ""
    import shlex

    command = shlex.join(["loraplace", *(sys.argv[1:] if argv is None else argv)])
    return f"; finished runs and checkpoints are kept; carry on with: {command}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        quiet_libraries()
        return args.func(args)
    except UserError as err:
        print(f"loraplace: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraplace: interrupted{_resume_hint(args, argv)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
