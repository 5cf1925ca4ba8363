"""One typed study config: built-in defaults < YAML file < command line.

    cfg = load_config("configs/offline.yaml", overrides={"epochs": 1}, sets=["lr=1e-4"])
    cfg.to_dict()   # saved with every result

Every key is declared once, in its group (data, lora, training, fast paths, execution,
report), with its type (a `Literal` where it takes choices), its default, one line of docs and
its check; the choices, the checks, the keys that do not change a run's result, the fast-path
table and the reference table in docs/reference.md all come from those declarations. YAML and
`--set` stay flat (`rank: 16`). Unknown keys are an error with a "did you mean".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from loraplace.core.errors import UserError, did_you_mean
from loraplace.plan.strategies import SEED_COMPARISON

GROUPS = ("data", "lora", "training", "fast paths", "execution", "report")


@dataclass(frozen=True)
class FastPath:
    """One speed switch: the plain pipeline's value, what the switch does, and what it changes
    in the numbers beyond float32 summation order ("" for nothing)."""

    plain: object
    does: str
    changes: str = ""
    needs: tuple[str, ...] = ()  # switches that must be on (not plain) for this one to act
    per_study: bool = False  # how a study runs its runs; a run's result does not depend on it
    key: str = ""  # filled from the field's name


def setting(
    default=dataclasses.MISSING, group: str = "", doc: str = "", *, check: str = "",
    run: bool = True, fast: FastPath | None = None, factory=None,
):  # fmt: skip
    """A config key: its default, its group, one line of docs, its check (`CHECKS`), whether
    it changes what a run computes (`run`), and its fast-path entry if it is one."""
    assert group in GROUPS, group
    meta = {"group": group, "doc": doc, "check": check, "run": run and not (fast and fast.per_study),
            "fast": fast}  # fmt: skip
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StudyConfig:
    """Everything a study needs. Defaults are the seed document's setup."""

    # --- data ---
    model: str = setting(
        "microsoft/DialoGPT-medium",
        "data",
        "hub id, a folder with config.json, a .gguf file, or embedded",
    )
    data: str = setting(
        "tatsu-lab/alpaca", "data", "embedded, a JSON/JSONL file, or a Hugging Face datasets id"
    )
    train_split: str = setting("train[:100]", "data", "training rows, e.g. train[:100]")
    eval_split: str = setting("train[100:120]", "data", "evaluation rows")
    max_length: int = setting(256, "data", "tokens per example", check="positive")
    data_format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = setting(
        "auto", "data", "the records' format; auto: detected from their fields (data/formats.py)"
    )
    chat_template: str = setting(
        "auto", "data", "conversations' template: auto, the model's own, or a Jinja file"
    )
    loss_on: Literal["all", "response"] = setting(
        "response",
        "data",
        "the loss over the response (assistant turns, completion) only, "
        "or over every token after the first as the seed's (reported beside it either way)",
    )
    trust_remote_code: bool = setting(False, "data", "let a hub model run its own code")
    # --- lora ---
    strategies: list[str] = setting(
        group="lora",
        doc="placements: built-in names or NAME=ROLE[,ROLE...][@LAYERS]",
        factory=lambda: list(SEED_COMPARISON),
        run=False,
    )
    layer_study: str | None = setting(
        None, "lora", "roles for a depth sweep, e.g. attn,mlp", run=False
    )
    rank: int = setting(16, "lora", "LoRA rank", check="positive")
    alpha: float = setting(32.0, "lora", "LoRA alpha")
    dropout: float = setting(0.1, "lora", "LoRA dropout", check="fraction")
    bias: Literal["none", "lora_only"] = setting("none", "lora", "LoRA bias")
    alpha_scaling: Literal["rank", "constant", "rslora"] = setting(
        "rank",
        "lora",
        "where ranks differ: alpha grows with rank (alpha/r as at `rank`), the "
        "same alpha, or alpha/sqrt(r) (rsLoRA)",
    )
    equal_budget: str | None = setting(
        None, "lora", "solve the other strategies' ranks to this one's size", run=False
    )
    # --- training ---
    seeds: list[int] = setting(
        group="training", doc="every strategy runs with every seed", factory=lambda: [42], run=False
    )
    epochs: float = setting(3.0, "training", "epochs", check="positive")
    batch_size: int = setting(1, "training", "examples per micro-batch", check="positive")
    grad_accum: int = setting(4, "training", "micro-batches per optimizer step", check="positive")
    lr: float = setting(2e-4, "training", "learning rate", check="positive")
    lr_sweep: list[float] = setting(
        group="training",
        doc="rates to pick each strategy's from on dev_split, e.g. [1e-4, "
        "5e-4]; the study then runs at the shared lr and at each one's pick (study/sweep.py)",
        factory=list,
        check="positive_each",
        run=False,
    )
    dev_split: str | None = setting(
        None,
        "training",
        "rows the lr sweep picks on; unset: the last fifth of the training "
        "rows, which the sweep's runs then leave out",
        run=False,
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = setting(
        "cosine", "training", "learning-rate schedule"
    )
    warmup_ratio: float = setting(
        0.1, "training", "warmup, as a share of all steps", check="fraction"
    )
    weight_decay: float = setting(0.01, "training", "AdamW's weight decay")
    optimizer: str = setting("adamw_torch", "training", "the Trainer's optimizer")
    eval_batch_size: int = setting(4, "training", "examples per evaluation batch", check="positive")
    eval_every_epoch: bool = setting(
        True, "training", "evaluate at every epoch end (the curve); off: the final one only"
    )
    # mid-run checkpoints: every N optimizer steps and/or every M minutes of training,
    # whichever comes first; a checkpoint of the embedded model's `full` adapter takes well
    # under a second (docs/faults.md)
    checkpoint_every: int | None = setting(
        None, "training", "checkpoint every N steps", check="positive_or_none", run=False
    )
    checkpoint_minutes: float | None = setting(
        5.0,
        "training",
        "checkpoint every M minutes of training",
        check="positive_or_none",
        run=False,
    )
    keep_checkpoints: bool = setting(
        False, "training", "keep the last checkpoint after the run", run=False
    )
    # --- fast paths (each described by its FastPath) ---
    pad_to: Literal["longest", "max_length"] = setting(
        "longest",
        "fast paths",
        fast=FastPath("max_length", "pad each batch to its longest example, not max_length"),
    )
    fuse_accumulation: bool = setting(
        True, "fast paths", fast=FastPath(False, "the grad_accum micro-batches as one batch")
    )
    packing: bool = setting(
        True,
        "fast paths",
        fast=FastPath(
            False,
            "that batch as packed rows without padding (checked exact first)",
            needs=("pad_to", "fuse_accumulation"),
        ),
    )
    pack_tokens: int | None = setting(
        None,
        "fast paths",
        "tokens a packed chunk; unset: 1.5 x max_length on a CPU, the whole step on a GPU",
        check="positive_or_none",
    )
    segment_attention: bool = setting(
        True,
        "fast paths",
        fast=FastPath(
            False, "attention per example in a packed row, not T x T masked", needs=("packing",)
        ),
    )
    fused_lora: bool = setting(
        True,
        "fast paths",
        fast=FastPath(
            False,
            "one autograd function per adapted layer (fast/kernels.py)",
            changes="dropout masks drawn by its own generator, p rounded to 1/65536",
        ),
    )
    fused_head_loss: bool = setting(
        True,
        "fast paths",
        fast=FastPath(False, "output head and cross-entropy in token blocks", needs=("packing",)),
    )
    fused_mlp: bool = setting(
        True,
        "fast paths",
        fast=FastPath(False, "SwiGLU's silu(gate) * up as one function, less kept"),
    )
    release_memory: bool = setting(
        True, "fast paths", fast=FastPath(False, "freed buffers of 1 MB or more go back to the OS")
    )
    onednn: bool | None = setting(
        None,
        "fast paths",
        check="auto_or_bool",
        fast=FastPath(False, "frozen float32 products via oneDNN where measured faster"),
    )
    onednn_head: bool | None = setting(
        None,
        "fast paths",
        check="auto_or_bool",
        fast=FastPath(False, "the output head's products likewise"),
    )
    product_dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto",
        "fast paths",
        fast=FastPath(
            "float32",
            "frozen training products in bfloat16 where the CPU has it",
            changes="rounding of training's frozen products (bfloat16, float32 accumulation)",
            needs=("onednn",),
        ),
    )
    precision: Literal["auto", "float32", "bf16", "fp16"] = setting(
        "auto",
        "fast paths",
        fast=FastPath(
            "float32",
            "the base in bf16 (fp16 where a GPU lacks it) on a GPU",
            changes="rounding: products in bf16 or fp16 (auto: on GPUs only)",
        ),
    )
    runs_per_device: str | None = setting(
        None,
        "fast paths",
        check="runs_per_device",
        fast=FastPath("1", "several runs at once on one device", per_study=True),
    )
    reuse_base_eval: bool = setting(
        True,
        "fast paths",
        fast=FastPath(False, "the untrained model evaluated once per study", per_study=True),
    )
    reuse_process: bool = setting(
        True,
        "fast paths",
        fast=FastPath(
            False, "runs forked from one server that imported the stack once", per_study=True
        ),
    )
    pack_eval: bool = setting(
        True, "fast paths", "evaluate packed rows, no padding (checked exact; both bench paths)"
    )
    # --- execution ---
    device: Literal["auto", "cpu", "cuda", "mps"] = setting("auto", "execution", "where runs train")
    quantize: Literal["none", "4bit", "8bit"] = setting(
        "none", "execution", "a bitsandbytes base: NF4 with double quantization, or LLM.int8"
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = setting(
        "auto",
        "execution",
        "attention kernel; auto: FlashAttention-2 on CUDA in 16 bits where it imports, else SDPA",
    )
    liger_kernel: bool = setting(False, "execution", "CUDA: Liger Kernel's fused functions")
    threads: int | None = setting(
        None, "execution", "torch threads a run; unset: the study's", check="positive_or_none"
    )
    executor: Literal["local", "ray"] = setting(
        "local", "execution", "runs here, or on Ray", run=False
    )
    ray_address: str | None = setting(
        None, "execution", "unset: $RAY_ADDRESS, else a local Ray", run=False
    )
    gpus_per_run: float | None = setting(
        None,
        "execution",
        "Ray: a GPU a run where the cluster has GPUs; 0.25: four a GPU",
        check="gpus",
        run=False,
    )
    cpus_per_run: float = setting(
        1.0, "execution", "Ray's CPUs a run (its threads unless set)", check="positive", run=False
    )
    max_retries: int = setting(
        2,
        "execution",
        "Ray: tries again for a run whose process died",
        check="non_negative",
        run=False,
    )
    # --- report ---
    reference: str = setting("full", "report", "the strategy others are compared with", run=False)
    compare: Literal["all", "reference"] = setting(
        "all", "report", "all pairs, or each against the reference", run=False
    )
    generations: int = setting(3, "report", "evaluation prompts the report shows generated")
    max_new_tokens: int = setting(
        48, "report", "tokens a generation (the task metric's cap too)", check="positive"
    )
    task_metrics: list[Literal["rouge_l", "exact_match"]] = setting(
        group="report",
        doc="greedy answers to every evaluation row scored against its "
        "reference, per example (train/task.py); [] for none",
        factory=lambda: ["rouge_l", "exact_match"],
    )
    # 20 prompts as one batch took 10.4-10.9 s against 15.7-15.9 s in batches of 8 (embedded
    # model, one thread, 48 new tokens): the decoding steps' fixed costs are per batch
    task_batch_size: int = setting(32, "report", "prompts generated together", check="positive")
    report_to: list[Literal["wandb", "tensorboard"]] = setting(
        group="report", doc="loggers: wandb, tensorboard", factory=list, run=False
    )
    wandb_project: str = setting("loraplace", "report", "W&B project", run=False)
    smallest_effect: float = setting(
        0.01,
        "report",
        "the power plan's smallest difference of interest (0.01: 1 %)",
        check="effect",
        run=False,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_paths(self, machine=None):
        """The paths this config takes on `machine` (this one by default), `auto` resolved;
        UserError for a setting it cannot run (`fast.hardware.resolve_paths`)."""
        from loraplace.fast.hardware import Machine, resolve_paths

        return resolve_paths(
            self.device, self.onednn, self.onednn_head, self.product_dtype,
            machine or Machine.here(), self.precision, self.quantize, self.attention,
            self.liger_kernel,
        )  # fmt: skip

    def plain(self) -> StudyConfig:
        """This study the plain way: every fast path off (Trainer + PEFT, padded batches)."""
        return dataclasses.replace(self, **{p.key: p.plain for p in FAST_PATHS})


FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}
HINTS = typing.get_type_hints(StudyConfig, include_extras=True)
# The one list of fast paths, in declaration order: the benchmark's plain pipeline, run reuse,
# the report and the README's table read it (tests/test_config.py checks the README).
FAST_PATHS = tuple(
    dataclasses.replace(f.metadata["fast"], key=f.name)
    for f in FIELDS.values()
    if f.metadata.get("fast")
)
FAST = {p.key: p for p in FAST_PATHS}
# Keys that do not change what a run computes: which runs a study has, where they execute,
# how the report compares them, when a run may stop and resume.
NOT_RUN_KEYS = tuple(name for name, f in FIELDS.items() if not f.metadata["run"])


def _literal(hint) -> tuple | None:
    """The choices of a Literal hint (inside an Optional or a list too), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


CHOICES = {name: c for name, hint in HINTS.items() if (c := _literal(hint))}


def idle_fast_paths(cfg: StudyConfig) -> list[str]:
    """Fast paths left on that cannot act, because a switch they need is off: one line each."""
    lines = []
    for path in FAST_PATHS:
        if getattr(cfg, path.key) == path.plain:
            continue
        off = [k for k in path.needs if getattr(cfg, k) == FAST[k].plain]
        if off:
            lines.append(f"{path.key} does nothing in this study: it needs {' and '.join(off)}")
    return lines


# Keys whose absence from an older result means it ran as this value did, not today's default
BEFORE = {"alpha_scaling": "constant"}


def run_settings(config: dict) -> dict:
    """What changes a run's result; keys an older result lacks take today's defaults, or what
    they were before the key existed (`BEFORE`)."""
    full = {**StudyConfig().to_dict(), **BEFORE, **config}
    return {k: v for k, v in full.items() if k not in NOT_RUN_KEYS}


def reference_table() -> str:
    """The keys by group, as docs/reference.md shows them (a test keeps the two equal)."""
    lines = ["| group | key | default | choices | what it is |", "|---|---|---|---|---|"]
    for group in GROUPS:
        for name, f in FIELDS.items():
            if f.metadata["group"] != group:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            fast = f.metadata["fast"]
            doc = f.metadata["doc"] or (fast.does if fast else "")
            choices = ", ".join(CHOICES[name]) if name in CHOICES else ""
            shown = "auto" if f.metadata["check"] == "auto_or_bool" and default is None else default
            lines.append(f"| {group} | `{name}` | `{shown}` | {choices} | {doc} |")
    return "\n".join(lines)


# --- reading and checking values -----------------------------------------------------------


def _coerce(key: str, value):
    """Check `value` against the field's type; YAML already parsed numbers and lists."""
    hint = HINTS[key]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    auto = FIELDS[key].metadata["check"] == "auto_or_bool"
    if value is None and optional or (auto and value == "auto"):
        return None
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is list:
        items = value if isinstance(value, list) else [value]
        (item_type,) = typing.get_args(base)
        return [_scalar(key, v, item_type) for v in items]
    return _scalar(key, value, base)


def _scalar(key: str, value, kind):
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value in choices:
            return value
        raise UserError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"config key {key!r} must be {kind.__name__}, got {value!r}")


def _runs_per_device(value) -> bool:
    return value in (None, "auto") or (str(value).isdigit() and int(value) >= 1)


def _gpus(value) -> bool:
    return value is None or (value >= 0 and (value <= 1 or value == int(value)))


# A check's name -> (whether a value passes, what the sentence says it must be)
CHECKS = {
    "positive": (lambda v: v > 0, "positive"),
    "positive_or_none": (lambda v: v is None or v > 0, "positive or null"),
    "positive_each": (lambda v: all(x > 0 for x in v), "a list of positive numbers"),
    "non_negative": (lambda v: v >= 0, "0 or more"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "effect": (lambda v: 0 < v <= 1, "a fraction above 0 and at most 1 (0.01 is a 1 % difference)"),
    "auto_or_bool": (lambda v: True, "auto, true or false"),
    "runs_per_device": (_runs_per_device, "a positive whole number or auto"),
    "gpus": (_gpus, "a fraction of one GPU or a whole number"),
}


def _check_key(key: str) -> None:
    if key not in FIELDS:
        raise UserError(f"unknown config key {key!r}{did_you_mean(key, FIELDS)}")


def _validate(cfg: StudyConfig) -> None:
    for key, f in FIELDS.items():
        check = f.metadata["check"]
        if check and not CHECKS[check][0](getattr(cfg, key)):
            raise UserError(
                f"config key {key!r} must be {CHECKS[check][1]}, got {getattr(cfg, key)!r}"
            )
    if not cfg.seeds:
        raise UserError("at least one seed is needed")
    if not cfg.strategies and not cfg.layer_study:
        raise UserError("at least one strategy is needed")


def parse_set(item: str) -> tuple[str, object]:
    """'lr=1e-4' -> ('lr', 0.0001); values are read as YAML ('[1, 2]' is a list)."""
    key, sep, text = item.partition("=")
    if not sep:
        raise UserError(f"--set takes KEY=VALUE, got {item!r}")
    key = key.strip().replace("-", "_")
    _check_key(key)
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        return key, text


def load_config(
    path: str | None = None, overrides: dict | None = None, sets: list[str] = ()
) -> StudyConfig:
    """Defaults < YAML file < flags (`overrides`, None values ignored) < `--set` items."""
    values: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file {path!r} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(
                f"config file {path!r} is not valid YAML ({str(err).splitlines()[0]})"
            ) from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path!r} must hold a mapping of keys to values")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.update(dict(parse_set(s) for s in sets))
    for key in values:
        _check_key(key)
    cfg = StudyConfig(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(cfg)
    return cfg
