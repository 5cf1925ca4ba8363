"""One typed study config: built-in defaults < YAML file < command line.

    cfg = load_config("configs/offline.yaml", overrides={"epochs": 1}, sets=["lr=1e-4"])
    cfg.to_dict()   # saved with every result

Unknown keys are an error with a "did you mean"; values are checked against the field types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loraplace.core.errors import UserError, did_you_mean
from loraplace.plan.strategies import SEED_COMPARISON


@dataclass
class StudyConfig:
    """Everything a study needs. Defaults are the seed document's setup."""

    model: str = "microsoft/DialoGPT-medium"
    data: str = "tatsu-lab/alpaca"
    train_split: str = "train[:100]"
    eval_split: str = "train[100:120]"
    strategies: list[str] = field(default_factory=lambda: list(SEED_COMPARISON))
    layer_study: str | None = None  # roles for depth strategies, e.g. "attn,mlp"
    seeds: list[int] = field(default_factory=lambda: [42])
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    bias: str = "none"
    equal_budget: str | None = None  # reference strategy: solve the others' ranks to its size
    # training
    epochs: float = 3.0
    batch_size: int = 1
    grad_accum: int = 4
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    optimizer: str = "adamw_torch"
    max_length: int = 256
    loss_on: str = "all"  # all | response
    # auto (read from the records' fields) | alpaca | messages | prompt_completion | text
    data_format: str = "auto"
    chat_template: str = "auto"  # auto (the model's own) | a Jinja file that replaces it
    # how it runs: the fast paths, each described in FAST_PATHS below
    pad_to: str = "longest"  # longest | max_length (the seed's fixed padding)
    fuse_accumulation: bool = True
    packing: bool = True
    pack_tokens: int | None = None  # tokens per packed forward; None: 1.5 x max_length
    segment_attention: bool = True
    fused_lora: bool = True
    fused_head_loss: bool = True
    fused_mlp: bool = True
    release_memory: bool = True
    onednn: bool | None = None  # None: auto
    onednn_head: bool | None = None  # None: auto, following `onednn`
    reuse_base_eval: bool = True
    reuse_process: bool = True
    product_dtype: str = "auto"  # auto | float32 | bfloat16
    # mid-run checkpoints (checkpoints.py): every N optimizer steps and/or every M minutes of
    # training, whichever comes first; None turns that form off. The default, 5 minutes, writes
    # none in runs shorter than that (nothing to lose worth the write) and bounds what a kill
    # costs a longer run; a checkpoint of the embedded model's `full` adapter takes well under a
    # second (docs/faults.md)
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 5.0
    keep_checkpoints: bool = False  # keep the last one after the run finishes
    device: str = "auto"  # auto | cpu | cuda | mps
    # numbers on the device: auto = bf16 on a GPU that has it (fp16 with loss scaling where it
    # does not), float32 on CPU; the base in that dtype, adapters and optimizer in float32
    precision: str = "auto"  # auto | float32 | bf16 | fp16
    quantize: str = "none"  # none | 4bit (NF4, double quantization, as QLoRA) | 8bit: bitsandbytes
    attention: str = "auto"  # auto (flash_attention_2 on CUDA where installed, else sdpa) | sdpa | eager | flash_attention_2
    liger_kernel: bool = False  # CUDA: Liger Kernel's fused functions through the Trainer
    # runs at once on the device, each its own process. None: on a CPU, two with half the cores
    # each (a 3-run study on two cores: all three, sharing them) where that ends the study
    # sooner (runner.cpu_runs_at_once), else one; auto: that on a CPU, and on a GPU as many as
    # fit beside the first run's peak memory
    runs_per_device: str | None = None
    threads: int | None = None
    eval_batch_size: int = 4
    pack_eval: bool = True  # evaluate packed rows, no padding (checked exact; both bench paths)
    # where runs execute (cluster.py): none of these change what a run computes
    executor: str = "local"  # local: one after another here | ray: a Ray cluster's nodes
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray for this study
    gpus_per_run: float | None = None  # None: 1 where the cluster has GPUs, else 0; 0.25: 4 a GPU
    cpus_per_run: float = 1.0  # Ray's CPUs for a run; also its threads unless `threads` is set
    max_retries: int = 2  # a run whose process or node died is tried again this many times
    # reporting
    reference: str = "full"
    compare: str = "all"  # all pairs, or "reference"
    generations: int = 3
    # the evaluation curve's points at every epoch end (the seed's curves); off: the final
    # evaluation only, which saves a run (epochs - 1) evaluations
    eval_every_epoch: bool = True
    max_new_tokens: int = 48
    report_to: list[str] = field(default_factory=list)  # wandb, tensorboard
    wandb_project: str = "loraplace"
    trust_remote_code: bool = False

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


@dataclass(frozen=True)
class FastPath:
    """One speed switch: the plain pipeline's value, what the switch does, and what it changes
    in the numbers beyond float32 summation order ("" for nothing)."""

    key: str
    plain: object
    does: str
    changes: str = ""
    needs: tuple[str, ...] = ()  # switches that must be on (not plain) for this one to act
    per_study: bool = False  # how a study runs its runs; a run's result does not depend on it


# The one list of fast paths: the benchmark's plain pipeline, run reuse, the report and the
# README's table read it (tests/test_config.py checks the README against it).
FAST_PATHS = (
    FastPath("pad_to", "max_length", "pad each batch to its longest example, not max_length"),
    FastPath("fuse_accumulation", False, "the grad_accum micro-batches as one batch"),
    FastPath(
        "packing", False, "that batch as packed rows without padding (checked exact first)",
        needs=("pad_to", "fuse_accumulation"),
    ),
    FastPath(
        "segment_attention", False, "attention per example in a packed row, not T x T masked",
        needs=("packing",),
    ),
    FastPath(
        "fused_lora", False, "one autograd function per adapted layer (fast/kernels.py)",
        changes="dropout masks drawn by its own generator, p rounded to 1/65536",
    ),
    FastPath(
        "fused_head_loss", False, "output head and cross-entropy in token blocks",
        needs=("packing",),
    ),
    FastPath("fused_mlp", False, "SwiGLU's silu(gate) * up as one function, less kept"),
    FastPath("release_memory", False, "freed buffers of 1 MB or more go back to the OS"),
    FastPath("onednn", False, "frozen float32 products via oneDNN where measured faster"),
    FastPath("onednn_head", False, "the output head's products likewise"),
    FastPath(
        "product_dtype", "float32", "frozen training products in bfloat16 where the CPU has it",
        changes="rounding of training's frozen products (bfloat16, float32 accumulation)",
        needs=("onednn",),
    ),
    FastPath(
        "precision", "float32", "the base in bf16 (fp16 where a GPU lacks it) on a GPU",
        changes="rounding: products in bf16 or fp16 (auto: on GPUs only)",
    ),
    FastPath("runs_per_device", "1", "several runs at once on one device", per_study=True),
    FastPath("reuse_base_eval", False, "the untrained model evaluated once per study", per_study=True),
    FastPath("reuse_process", False, "runs forked from one server that imported the stack once", per_study=True),
)  # fmt: skip
FAST = {p.key: p for p in FAST_PATHS}


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


# Keys that do not change what a run computes: which runs a study has, where they execute,
# how the report compares them, when a run may stop and resume.
NOT_RUN_KEYS = (
    "strategies", "layer_study", "seeds", "reference", "compare", "report_to", "wandb_project",
    "equal_budget", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
    "executor", "ray_address", "gpus_per_run", "cpus_per_run", "max_retries",
    *(p.key for p in FAST_PATHS if p.per_study),
)  # fmt: skip


def run_settings(config: dict) -> dict:
    """What changes a run's result; keys an older result lacks take today's defaults."""
    full = {**StudyConfig().to_dict(), **config}
    return {k: v for k, v in full.items() if k not in NOT_RUN_KEYS}


CHOICES = {
    "bias": ("none", "lora_only"),
    "loss_on": ("all", "response"),
    "data_format": ("auto", "alpaca", "messages", "prompt_completion", "text"),
    "pad_to": ("longest", "max_length"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "product_dtype": ("auto", "float32", "bfloat16"),
    "precision": ("auto", "float32", "bf16", "fp16"),
    "quantize": ("none", "4bit", "8bit"),
    "attention": ("auto", "sdpa", "eager", "flash_attention_2"),
    "compare": ("all", "reference"),
    "executor": ("local", "ray"),
    "scheduler": ("cosine", "linear", "constant", "constant_with_warmup"),
}
POSITIVE = ("rank", "epochs", "batch_size", "grad_accum", "lr", "max_length", "eval_batch_size")
POSITIVE_OR_NONE = ("pack_tokens", "threads", "checkpoint_every")
AUTO_OR_BOOL = ("onednn", "onednn_head")  # "auto" is stored as None
FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}


def _coerce(key: str, value):
    """Check `value` against the field's type; YAML already parsed numbers and lists."""
    hint = typing.get_type_hints(StudyConfig)[key]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None and optional or (key in AUTO_OR_BOOL and value == "auto"):
        return None
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        (item_type,) = typing.get_args(base)
        return [_scalar(key, v, item_type) for v in items]
    return _scalar(key, value, base)


def _scalar(key: str, value, kind: type):
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


def _check_key(key: str) -> None:
    if key not in FIELDS:
        raise UserError(f"unknown config key {key!r}{did_you_mean(key, FIELDS)}")


def _validate(cfg: StudyConfig) -> None:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise UserError(
                f"config key {key!r} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}"
            )
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise UserError(f"config key {key!r} must be positive, got {getattr(cfg, key)!r}")
    for key in POSITIVE_OR_NONE:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(
                f"config key {key!r} must be positive or null, got {getattr(cfg, key)!r}"
            )
    if cfg.checkpoint_minutes is not None and not cfg.checkpoint_minutes > 0:
        raise UserError(
            f"config key 'checkpoint_minutes' must be positive or null, got {cfg.checkpoint_minutes!r}"
        )
    if not cfg.cpus_per_run > 0:
        raise UserError(f"config key 'cpus_per_run' must be positive, got {cfg.cpus_per_run!r}")
    if cfg.max_retries < 0:
        raise UserError(f"config key 'max_retries' must be 0 or more, got {cfg.max_retries!r}")
    gpus = cfg.gpus_per_run
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise UserError(
            f"config key 'gpus_per_run' must be a fraction of one GPU or a whole number, got {gpus!r}"
        )
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.warmup_ratio < 1:
        raise UserError("dropout and warmup_ratio must be in [0, 1)")
    if cfg.runs_per_device not in (None, "auto") and not (
        str(cfg.runs_per_device).isdigit() and int(cfg.runs_per_device) >= 1
    ):
        raise UserError(
            f"config key 'runs_per_device' must be a positive whole number or auto, got {cfg.runs_per_device!r}"
        )
    if not cfg.seeds:
        raise UserError("at least one seed is needed")
    if not cfg.strategies and not cfg.layer_study:
        raise UserError("at least one strategy is needed")
    unknown = set(cfg.report_to) - {"wandb", "tensorboard"}
    if unknown:
        raise UserError(f"report_to takes wandb and tensorboard, not {', '.join(sorted(unknown))}")


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
