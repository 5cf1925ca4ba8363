"""`make bench-gpu`: one prepared GPU benchmark that writes every result as it goes.

    python benchmarks/gpubench.py --out runs/bench-gpu            # one H100/H200: under 6 min (planned)
    python benchmarks/gpubench.py --out /tmp/gpubench --dry-run   # tiny random models, CPU, seconds

What it measures, each part guarded (a part that raises is recorded as failed, the rest go on):
(b) training throughput and MFU of a PEFT LoRA (rank 16 on every attention and MLP projection)
    trained with AdamW on random token batches, for the embedded SmolLM2-135M and for
    DialoGPT-medium and Llama-3.2-1B built from their config.json with random weights (their
    speed does not depend on the weights); bfloat16 autocast on CUDA, float32 on CPU; FLOPs
    count the frozen linears and head (forward and input gradient), the adapters (forward and
    both gradients) and causal attention (forward and backward);
(c) the peak memory of each of those runs and of each study run;
(a) the seed-size offline study, the plain way and loraplace's way (`bench.run_bench`), one
    strategy at a time so a kill keeps the strategies that finished, both in the precision
    loraplace resolves (bf16 on a GPU that has it).
(b) comes first: it is short and bounded, (a) is the long part. After every measurement
OUT/results.jsonl (the environment first, then one record per measurement) and OUT/results.md
are rewritten atomically; OUT/bench.log has the study's log. The study's run folders go to
--work (a temporary folder unless given), so OUT holds three files. Its only inputs outside
the repository are the documented shared data and model configs (../shared, or --shared).
No part starts after --budget-s (240 s), so the whole run ends within 6 minutes on one H200
if no single part takes more than about 2 minutes: planned, not yet measured on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraplace.core.results import environment, write_text
from loraplace.train.run import peak_memory_mb

# Dense bfloat16 peaks from NVIDIA's data sheets, the first name found in the device's name
# wins: the SXM parts (H200 has H100's compute) at 989 TFLOP/s, the PCIe and NVL cards lower.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12,
                   "H100": 989e12, "H200": 989e12}  # fmt: skip
STRATEGIES = ("full", "attention", "ffn")
REPO = Path(__file__).resolve().parents[1]
RANDOM = "random weights"


@dataclass(frozen=True)
class ModelSpec:
    """One throughput model: `pretrained` loads its weights; otherwise config.json in `source`
    gives the architecture and the weights are random."""

    name: str
    source: str
    pretrained: bool


@dataclass
class Plan:
    """What one invocation measures and how big."""

    device: str
    models: list[ModelSpec]
    batch: int
    seq: int
    warmup: int
    steps: int
    study: object | None  # a StudyConfig for part (a), or None to leave it out
    strategies: tuple[str, ...]
    budget_s: float | None  # start no part after this many seconds
    notes: list[str] = field(default_factory=list)


class Recorder:
    """Every record so far, rewritten atomically to results.jsonl and results.md after each one,
    so a benchmark killed at any moment leaves whole files holding what finished."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)
        lines = (json.dumps(r, default=str, allow_nan=True) for r in self.records)
        write_text(self.out / "results.jsonl", "".join(line + "\n" for line in lines))
        write_text(self.out / "results.md", render(self.records))

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(self.out / "bench.log", "a") as f:  # a log, not a result: appended
            f.write(line + "\n")


# --- the environment ---------------------------------------------------------------------------


def peak_flops(device: str) -> float | None:
    """The accelerator's dense bfloat16 peak, where this table knows it (None: no MFU)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def environment_record(device: str) -> dict:
    cuda = device == "cuda"
    return {
        "part": "environment",
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_bf16_flops": peak_flops(device),
        # float32 products in TF32 (fewer mantissa bits, faster) or not: what a float32
        # number here means
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        **environment(),
    }


# --- (b) and (c): throughput, MFU and peak memory ----------------------------------------------


def build_model(spec: ModelSpec, device: str) -> torch.nn.Module:
    """The model on `device` in float32 (autocast does the bfloat16 products)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.pretrained:
        from loraplace.plan.models import resolve_model
        from loraplace.train.load import load_model

        return load_model(resolve_model(spec.source))[0].to(device)
    config = AutoConfig.from_pretrained(spec.source)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model in a second on a GPU
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def attach_lora(model: torch.nn.Module, rank: int = 16) -> tuple[torch.nn.Module, dict]:
    """LoRA on every attention and MLP projection, placed and checked as a study does; also
    the frozen multiply-adds per token of the decoder's linears and the output head."""
    from loraplace.plan.adapters import attach, trainable_params
    from loraplace.plan.placement import place
    from loraplace.plan.planning import architecture
    from loraplace.plan.roles import classify
    from loraplace.plan.strategies import BUILTINS

    placement = place(classify(model), BUILTINS["full"], rank=rank)
    arch = architecture(model, placement.ranks)
    total = sum(p.numel() for p in model.parameters())
    peft_model = attach(model, placement, alpha=2 * rank, dropout=0.1)
    facts = {"params": total, "frozen_linear_params": arch["linear_macs_per_token"],
             "adapter_macs_per_token": sum(r * (i + o) for _, i, o, r in arch["adapters"]),
             "n_layers": arch["n_layers"], "attn_dim": arch["attn_dim"], "lora_rank": rank}  # fmt: skip
    return peft_model, facts | {"trainable_params": trainable_params(peft_model)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_training(model: torch.nn.Module, plan: Plan) -> dict:
    """AdamW steps on random token batches; the clock runs after `plan.warmup` steps."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(vocab, (plan.batch, plan.seq), generator=gen) for _ in range(4)]
    batches = [b.to(plan.device) for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=plan.device == "cuda")
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if plan.device == "cuda" else nullcontext()
    model.train()

    def step(i: int) -> torch.Tensor:
        ids = batches[i % len(batches)]
        with cast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(plan.warmup):
        step(i)
    sync(plan.device)
    start = time.perf_counter()
    for i in range(plan.steps):
        loss = step(i)
    sync(plan.device)
    seconds = time.perf_counter() - start
    tokens = plan.batch * plan.seq * plan.steps
    return {"train_s": seconds, "tokens_per_s": tokens / seconds, "final_loss": float(loss)}


def measure_throughput(spec: ModelSpec, plan: Plan) -> dict:
    """Part (b) and (c) for one model: tokens/s, MFU against the bf16 peak, peak memory."""
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, facts = attach_lora(build_model(spec, plan.device))
    timing = time_training(model, plan)
    flops = flops_per_token(facts, plan.seq) * timing["tokens_per_s"]
    peak = peak_flops(plan.device)
    row = {
        "weights": "pretrained" if spec.pretrained else RANDOM,
        "dtype": "bfloat16 autocast" if plan.device == "cuda" else "float32",
        "batch": plan.batch,
        "seq": plan.seq,
        "steps": plan.steps,
        "warmup_steps": plan.warmup,
        **facts,
        **timing,
        "tflops": flops / 1e12,
        "mfu_pct": 100 * flops / peak if peak else None,
        "peak_memory_mb": peak_memory_mb(plan.device),
    }
    del model
    free(plan.device)
    return row


def flops_per_token(facts: dict, seq: int) -> float:
    """Training FLOPs a token of a `seq`-token sequence needs: every frozen linear and the head
    2 x in x out forward and as much for the input gradient; every adapter 2 r (in + out)
    forward and twice that backward (input and weight gradients); causal attention, QK and
    AV over half the sequence on average, 2 x 2 x d x seq / 2 per layer forward and twice
    that backward (as `bench.training_flops` counts a study's)."""
    frozen = 4 * facts["frozen_linear_params"]
    adapters = 6 * facts["adapter_macs_per_token"]
    attention = 3 * 2 * facts["n_layers"] * facts["attn_dim"] * seq
    return frozen + adapters + attention


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- (a): the seed-size study, plain and loraplace -------------------------------------------


def study_config(study: dict, strategy: str):
    """configs/offline.yaml with this benchmark's model, data, splits, epochs and device."""
    from loraplace.config import load_config

    overrides = {k: v for k, v in study.items() if k != "sets"} | {"strategies": [strategy]}
    return load_config(str(REPO / "configs" / "offline.yaml"), overrides, study["sets"])


def measure_study(plan: Plan, strategy: str, work: Path, rec: Recorder) -> dict:
    """One strategy the plain way and loraplace's way (`bench.run_bench`), each run in its own
    process. A strategy per call, so each one's row is kept as soon as it exists; the cost is
    that loraplace's untrained-model evaluation, shared by a study's runs, is redone each time."""
    from bench import run_bench

    cfg = study_config(plan.study, strategy)
    report = run_bench(cfg, work / strategy, log=rec.log)
    (row,) = report["rows"]
    # bench's MFU columns are against this machine's CPU float32 peak: not kept on a GPU
    row = {k: v for k, v in row.items() if "mfu" not in k and "gflops" not in k}
    return row | {"study": report["study"], "paths": report["paths"], "device": cfg.device}


# --- running the parts -------------------------------------------------------------------------


def guarded(rec: Recorder, plan: Plan, started: float, ids: dict, measure) -> None:
    """Run one measurement and record it: ok with its numbers, failed with the error (the
    traceback goes to the log), or skipped once the time budget is spent."""
    record = dict(ids)
    if plan.budget_s is not None and time.perf_counter() - started > plan.budget_s:
        rec.add(
            record | {"status": "skipped", "error": f"time budget of {plan.budget_s:g} s spent"}
        )
        return
    rec.log(f"gpubench: {' '.join(str(v) for v in ids.values())}")
    begin = time.perf_counter()
    try:
        record |= {"status": "ok", **measure()}
    except Exception as err:  # recorded, and the next part still runs
        rec.log(traceback.format_exc())
        first = (str(err).strip().splitlines() or [""])[0]
        record |= {"status": "failed", "error": f"{type(err).__name__}: {first}"[:300]}
    finally:
        free(plan.device)
    rec.add(record | {"part_wall_s": time.perf_counter() - begin})


def run_parts(plan: Plan, rec: Recorder, work: Path) -> None:
    started = time.perf_counter()
    rec.add(environment_record(plan.device) | {"notes": plan.notes})
    for spec in plan.models:
        ids = {"part": "throughput", "model": spec.name, "source": spec.source}
        guarded(rec, plan, started, ids, lambda s=spec: measure_throughput(s, plan))
    if plan.study is not None:
        for name in plan.strategies:
            ids = {"part": "study", "strategy": name}
            guarded(rec, plan, started, ids, lambda n=name: measure_study(plan, n, work, rec))
    rec.log(f"gpubench: done in {time.perf_counter() - started:.1f} s; results in {rec.out}")


# --- the markdown table ------------------------------------------------------------------------

THROUGHPUT_COLUMNS = [("model", "model"), ("weights", "weights"), ("params", "params M"),
    ("frozen_linear_params", "frozen linear+head M"), ("trainable_params", "trainable M"),
    ("shape", "batch x seq"), ("tokens_per_s", "tokens/s"), ("tflops", "TFLOP/s"),
    ("mfu_pct", "MFU %"), ("peak_memory_mb", "peak memory MB"), ("status", "status")]  # fmt: skip
STUDY_COLUMNS = [("strategy", "strategy"), ("plain_wall_s", "plain wall s"),
    ("loraplace_wall_s", "loraplace wall s"), ("speedup", "speedup"),
    ("plain_train_s", "plain train s"), ("loraplace_train_s", "loraplace train s"),
    ("plain_tokens_per_s", "plain tok/s"), ("loraplace_tokens_per_s", "loraplace tok/s"),
    ("plain_peak_memory_mb", "plain peak MB"), ("loraplace_peak_memory_mb", "loraplace peak MB"),
    ("plain_eval_loss", "plain eval loss"), ("loraplace_eval_loss", "loraplace eval loss"),
    ("eval_loss_diff_pct", "eval loss diff %"), ("status", "status")]  # fmt: skip
MILLIONS = ("params", "frozen_linear_params", "trainable_params")


def _cell(record: dict, key: str) -> str:
    if key == "status" and record.get("status") != "ok":
        return f"{record.get('status')}: {record.get('error', '')}".replace("|", "/")
    if key == "shape":
        return f"{record['batch']} x {record['seq']}" if "batch" in record else "–"
    v = record.get(key)
    if key in MILLIONS and v is not None:
        v = v / 1e6
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _table(records: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(_cell(r, k) for k, _ in columns) + " |")
    return lines


def render(records: list[dict]) -> str:
    env = next((r for r in records if r["part"] == "environment"), {})
    peak = env.get("peak_bf16_flops")
    lines = [
        "# GPU benchmark (`make bench-gpu`)",
        "",
        f"Device: {env.get('device_name')} ({env.get('gpu_count')} GPUs), torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, git {env.get('git_hash')}. TF32: matmul "
        f"{env.get('tf32_matmul')}, cuDNN {env.get('tf32_cudnn')}, float32 matmul precision "
        f"{env.get('float32_matmul_precision')}.",
        *(f"Note: {n}" for n in env.get("notes", [])),
        "",
        "## (b, c) Training throughput, MFU and peak memory",
        "",
        "LoRA rank 16 on every attention and MLP projection, AdamW, random token batches; "
        "bfloat16 autocast on CUDA, float32 on CPU. TFLOP/s counts the frozen linears and the "
        "output head (forward and input gradient), the adapters (forward and both gradients) "
        "and causal attention (forward and backward); MFU is that against "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16." if peak else "no known peak (left empty).")
        + f" '{RANDOM}': the model is built from its config.json and never loaded.",
        "",
        *_table([r for r in records if r["part"] == "throughput"], THROUGHPUT_COLUMNS),
        "",
        "## (a) The seed-size offline study, plain vs loraplace",
        "",
        "One strategy at a time, each the plain way (every fast path off) and loraplace's way, "
        "both in the precision loraplace resolves here; wall time includes process start, "
        "model load and evaluations. A side that failed gives no speedup.",
        "",
        *_table([r for r in records if r["part"] == "study"], STUDY_COLUMNS),
    ]
    return "\n".join(lines) + "\n"


# --- what to measure: the GPU plan and the dry run ---------------------------------------------


def find_shared(given: str | None) -> Path:
    """The project's shared folder: --shared, else ../shared beside the repository (the
    documented place); SystemExit with one sentence where it is not there."""
    shared = Path(given) if given else REPO.parent / "shared"
    if not (shared / "data" / "alpaca_head200.json").is_file():
        raise SystemExit(f"gpubench: no shared data at {shared}; pass --shared FOLDER")
    return shared


def gpu_plan(args, device: str) -> Plan:
    shared = find_shared(args.shared)
    models = [
        ModelSpec("embedded", "embedded", pretrained=True),
        ModelSpec("dialogpt-medium", str(shared / "models" / "dialogpt-medium"), False),
        ModelSpec("llama-3.2-1b", str(shared / "models" / "llama-3.2-1b"), False),
    ]
    study = {
        "model": args.study_model or "embedded",
        "data": str(shared / "data" / "alpaca_head200.json"),
        "train_split": "train[:100]",
        "eval_split": "train[100:120]",
        "epochs": 3,
        "sets": [f"device={device}"],
    }
    big = device == "cuda"  # a GPU-sized run forced onto a CPU gets a small shape
    return Plan(device, models, 8 if big else 2, 512 if big else 128, 5 if big else 1,
                30 if big else 3, study, STRATEGIES, args.budget_s)  # fmt: skip


def dry_plan(args, root: Path) -> Plan:
    """The same parts on tiny random models on the CPU, in seconds: proves the script, not speed.
    The embedded model's place is taken by a tiny GPT-2 loaded with its weights."""
    sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny models
    from tiny import save_tiny_gpt2, save_tiny_llama

    gpt2, llama = save_tiny_gpt2(root / "tiny-gpt2"), save_tiny_llama(root / "tiny-llama")
    models = [
        ModelSpec("embedded", str(gpt2), pretrained=True),
        ModelSpec("dialogpt-medium", str(gpt2), pretrained=False),
        ModelSpec("llama-3.2-1b", str(llama), pretrained=False),
    ]
    study = {
        "model": args.study_model or str(gpt2),
        "data": "embedded",
        "train_split": "train[:8]",
        "eval_split": "train[100:104]",
        "epochs": 1,
        "sets": ["device=cpu", "max_length=64", "loss_on=all"],  # a character a token
    }
    notes = ["dry run: tiny random models on the CPU; these numbers say nothing about speed"]
    return Plan("cpu", models, 2, 32, 1, 3, study, ("full",), args.budget_s, notes)


# --- the command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/gpubench.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/bench-gpu", help="results folder (runs/bench-gpu)")
    p.add_argument("--dry-run", action="store_true", help="tiny random models on the CPU")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shared", help="folder with data/ and models/ (default ../shared)")
    p.add_argument("--work", help="folder for the study's runs (default: a temporary one)")
    p.add_argument("--study-model", help="model of the study, part (a) (default: embedded)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="another config folder for a throughput model, e.g. llama-3.2-1b=DIR")  # fmt: skip
    p.add_argument("--parts", default="throughput,study", help="throughput,study (both)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no measurement after this many seconds (240; 0: no limit)")  # fmt: skip
    return p.parse_args(argv)


def adjust(plan: Plan, args) -> Plan:
    """Apply --model NAME=DIR and --parts to a plan."""
    given = dict(item.partition("=")[::2] for item in args.model)
    unknown = set(given) - {m.name for m in plan.models}
    if unknown:
        raise SystemExit(f"--model: no throughput model named {', '.join(sorted(unknown))}")
    models = [replace(m, source=given.get(m.name, m.source)) for m in plan.models]
    parts = set(args.parts.split(","))
    return replace(
        plan,
        models=models if "throughput" in parts else [],
        study=plan.study if "study" in parts else None,
        budget_s=args.budget_s or None,
    )


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local: never wait on a hub
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run and args.device == "auto":
        print("gpubench: no CUDA device here; use --dry-run (or --device cpu)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.log").unlink(missing_ok=True)
    rec = Recorder(out)
    with tempfile.TemporaryDirectory(prefix="gpubench-") as tmp:
        plan = dry_plan(args, Path(tmp)) if args.dry_run else gpu_plan(args, device)
        plan = adjust(plan, args)
        run_parts(plan, rec, Path(args.work) if args.work else Path(tmp) / "work")
    failed = [r for r in rec.records if r.get("status") == "failed"]
    print(f"gpubench: {len(rec.records) - 1} measurements, {len(failed)} failed: {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
