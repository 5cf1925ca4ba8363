"""A study checked and planned before anything is written: config -> plan -> run specs.

    prepared = prepare(cfg)                     # one sentence (UserError) for anything wrong
    specs = run_specs(cfg, prepared, out)       # a RunSpec per (strategy, seed)
    spec = spec_for(cfg, "full", 42, run_dir)   # one run's spec, prepared here (tests, a node)

Everything a user can get wrong (strategies, model, data, splits, settings this machine cannot
run) is found here from the model's config alone, on the meta device: each strategy is placed
once, `auto` settings are resolved on this machine, the product libraries measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import run_dir
from loraplace.fast.hardware import Machine, Paths
from loraplace.plan.placement import AdapterPlan
from loraplace.plan.strategies import Strategy, resolve_strategies
from loraplace.study.spec import RunSpec


@dataclass
class Prepared:
    """A checked study: its strategies and their plans, and the paths and product libraries
    of its runs on this machine."""

    strategies: list[Strategy]
    paths: Paths | None  # None: resolved by each cluster node (executor ray)
    products: dict
    plans: dict[str, AdapterPlan]  # strategy name -> what its runs attach
    shapes: tuple = ((), None)  # (decoder product shapes, head shape): for `measure_products`
    base_mb: float = 0.0  # the base's float32 weights
    gpu_run: object = None  # plan.memory.RunMemory: a GPU run's estimated memory

    @property
    def device(self) -> str:
        return self.paths.device if self.paths else "cpu"


def prepare(cfg: StudyConfig, products: bool = True) -> Prepared:
    """Check hardware, model, strategies and data without loading weights (one sentence for
    anything wrong); resolve what `auto` takes on this machine. `products`: also measure the
    product libraries with the config's threads (a study measures them once it knows its
    runs' threads)."""
    from loraplace.plan.budget import equalize
    from loraplace.plan.memory import shape_of
    from loraplace.plan.models import meta_model, resolve_model
    from loraplace.plan.placement import place
    from loraplace.plan.roles import classify

    try:
        paths = cfg.resolve_paths()
    except UserError:
        if cfg.executor != "ray":
            raise
        paths = None  # settings for the cluster's nodes, not this driver: each node resolves
    strategies = resolve_strategies(cfg.strategies, cfg.layer_study)
    meta = meta_model(resolve_model(cfg.model, cfg.trust_remote_code))
    modules = classify(meta)
    if cfg.equal_budget:
        if cfg.equal_budget not in [s.name for s in strategies]:
            raise UserError(
                f"equal_budget names {cfg.equal_budget!r}, which is not among the strategies"
            )
        strategies = equalize(modules, strategies, cfg.equal_budget, cfg.rank)
    plans = {s.name: place(modules, s, cfg.rank, cfg.bias).plan() for s in strategies}
    gpu_run = gpu_run_memory(cfg, paths, shape_of(meta, modules), plans)
    check_data(cfg)
    shapes = _shapes(modules, meta)
    base_mb = sum(p.numel() for p in meta.parameters()) * 4 / 2**20
    found = measure_products(cfg, paths, shapes, cfg.threads) if products and paths else {}
    return Prepared(strategies, paths, found, plans, shapes, base_mb, gpu_run)


def check_data(cfg: StudyConfig) -> None:
    """Load and tokenize every record the runs train on and evaluate, as they will: a bad one
    ends the study here, in one sentence naming it, before anything is written."""
    from loraplace.data.chat import use_chat_template
    from loraplace.data.rows import load_rows, tokenize
    from loraplace.plan.models import load_tokenizer, resolve_model

    rows = [load_rows(cfg.data, s, cfg.data_format) for s in (cfg.train_split, cfg.eval_split)]
    tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.trust_remote_code))
    use_chat_template(tokenizer, cfg.chat_template)
    for part in rows:
        tokenize(part, tokenizer, cfg.max_length, cfg.loss_on)


def run_specs(
    cfg: StudyConfig, prepared: Prepared, out: Path, threads: int | None = None
) -> list[RunSpec]:
    """A spec for every (strategy, seed) of the study, seeds outermost."""
    return [
        RunSpec(
            config=cfg,
            strategy=s,
            seed=seed,
            plan=prepared.plans[s.name],
            paths=prepared.paths,
            run_dir=str(run_dir(out, s.name, seed)),
            products=prepared.products,
            base_eval=str(Path(out) / "base_eval.json"),
            threads=threads,
        )
        for seed in cfg.seeds
        for s in prepared.strategies
    ]


def spec_for(
    cfg: StudyConfig, strategy: str, seed: int, folder: Path, base_eval: Path | None = None
) -> RunSpec:
    """One run's spec, prepared on this machine, for a run outside a study: `strategy` is the
    name of one of the config's strategies (its layer study and equal budget included)."""
    cfg = replace(cfg, seeds=[seed])
    specs = run_specs(cfg, prepare(cfg), Path(folder))
    (spec,) = [s for s in specs if s.name == strategy]
    return spec.with_(run_dir=str(folder), base_eval=str(base_eval) if base_eval else None)


def product_shapes(cfg: StudyConfig) -> tuple:
    """(decoder product shapes, head shape) of the config's model, from its config alone."""
    from loraplace.plan.models import meta_model, resolve_model
    from loraplace.plan.roles import classify

    meta = meta_model(resolve_model(cfg.model, cfg.trust_remote_code))
    return _shapes(classify(meta), meta)


def _shapes(modules, meta) -> tuple:
    """(the decoder's product shapes, the head's or None): what `measure_products` times."""
    from torch import nn

    head = meta.get_output_embeddings()
    head_shape = tuple(head.weight.shape) if isinstance(head, nn.Linear) else None
    return [(m.out_features, m.in_features) for m in modules if m.layer is not None], head_shape


def measure_products(cfg: StudyConfig, paths: Paths, shapes: tuple, threads: int | None) -> dict:
    """Measure (or read from the cache) which library runs each product shape faster here,
    with `threads` (None: all of torch's)."""
    from loraplace.fast.hardware import products_for
    from loraplace.fast.headloss import ROWS
    from loraplace.train.fastpaths import pack_rows

    return products_for(paths, *shapes, pack_rows(cfg, paths.device), ROWS, threads)


def gpu_run_memory(cfg: StudyConfig, paths: Paths | None, shape, plans: dict):
    """What a GPU run of the study's largest placement holds (`plan.memory`), in the
    precision it resolved on a GPU here (bf16 for a cluster's GPUs); a base whose weights and
    CUDA context alone exceed this machine's smallest GPU is refused in one sentence."""
    from loraplace.plan.memory import run_memory
    from loraplace.train.fastpaths import pack_rows

    on_gpu = paths is not None and paths.device == "cuda"
    precision = paths.precision if on_gpu else "bf16"
    largest = max((p.trainable_params for p in plans.values()), default=0)
    need = run_memory(shape, largest, pack_rows(cfg, "cuda"), precision, cfg.quantize)
    cards = Machine.here().gpus if on_gpu else ()
    if cards:
        smallest = min(cards, key=lambda g: g.total_mb)
        if need.weights_mb + need.context_mb > smallest.total_mb:
            raise UserError(
                f"the base's weights need {need.weights_mb:,.0f} MB in {precision} (and "
                f"{need.context_mb:,.0f} MB of CUDA context) and the GPU {smallest.name} has "
                f"{smallest.total_mb:,.0f} MB; use quantize 4bit or 8bit, or a larger GPU"
            )
    return need


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".loraplace-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to output directory {str(out)!r} ({err.strerror or err})"
        ) from None


def describe_paths(paths: Paths, products: dict) -> str:
    """One line: the paths `auto` resolved to here, and why."""
    machine = Machine.here()
    if paths.device != "cpu":
        why = f" ({paths.attention_why})" if paths.attention_why not in ("", "as set") else ""
        quantized = f", base in {paths.quantize}" if paths.quantize != "none" else ""
        return (
            f"paths on {machine.describe()}: device {paths.device}, precision "
            f"{paths.precision}{quantized}, attention {paths.attention}{why}"
        )
    why = (
        "this CPU multiplies bfloat16 natively"
        if paths.product_dtype == "bfloat16"
        else "no native bfloat16 here"
        if not (machine.native_bf16 and machine.bf16_products)
        else "as set"
    )
    table = products.get("decoder")
    if not paths.onednn:
        library = "the default BLAS"
    elif table is None:
        library = "oneDNN"
    else:
        n = sum(sum(pair) for pair in table.values())
        library = f"oneDNN for {n} of {2 * len(table)} (shape, direction) pairs, measured faster"
    return (
        f"paths on {machine.describe()}: frozen training products {paths.product_dtype} "
        f"({why}); float32 products through {library}"
    )
