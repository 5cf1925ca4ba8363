"""`loraplace advise`: where the adapters should go, predicted from a few batches, in minutes.

    loraplace advise --model embedded --data ../shared/data/alpaca_head200.json \\
        --train-split 'train[:100]' --budget 921600
    loraplace advise ... --json

The scores of `scores.py` are summed up per candidate placement (single roles, role groups,
layer thirds), each candidate at the same trainable budget with per-role ranks from the
equal-budget solver, and the best candidate by the chosen score is printed as a strategy
string `study` and `plan` accept as is. `parameter count` (how many base weights a candidate
adapts) is the baseline every score must beat; `advise --validate` measures whether one does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loraplace.advise.scores import ModuleScore
from loraplace.plan.budget import solve_ranks
from loraplace.plan.placement import Placement, place
from loraplace.plan.roles import ATTN_ROLES, MLP_ROLES, LinearModule, num_layers
from loraplace.plan.strategies import Strategy, format_strategy, parse_strategy

SCORES = ("grad", "lora_b", "plop", "params")
SCORE_TEXT = {
    "grad": "dL/dW projected to each module's rank (sum of squared top singular values)",
    "lora_b": "LoRA B gradient at init, squared norm, PEFT scaling alpha/r",
    "plop": "PLoP normalized feature norm, mean over modules, lower adapts first",
    "params": "base weights the placement adapts (the baseline)",
}
BANDS = ("bottom", "middle", "top")


@dataclass(frozen=True)
class Candidate:
    """A candidate placement at the budget, with what each score predicts for it."""

    strategy: Strategy
    placement: Placement
    predicted: dict[str, float]  # score name -> value; higher means adapt this

    @property
    def text(self) -> str:
        return format_strategy(self.strategy)


def candidate_strategies(modules: list[LinearModule]) -> list[Strategy]:
    """Single roles, role groups and thirds of depth that exist on this model."""
    present = [r for r in ATTN_ROLES + MLP_ROLES if any(m.role == r for m in modules)]
    texts = [f"{r.replace('attn.', '').replace('mlp.', 'mlp-')}={r}" for r in present]
    texts += ["attention=attn", "ffn=mlp", "full=full"]
    if num_layers(modules) >= 3:
        texts += [f"full-{band}=full@block:{i}/3" for i, band in enumerate(BANDS)]
    return [parse_strategy(t) for t in texts]


def at_budget(modules: list[LinearModule], strategy: Strategy, budget: int) -> Strategy:
    """The strategy with per-role ranks solved to `budget`, naming only roles this model has."""
    ranks = solve_ranks(modules, strategy, budget)
    return replace(
        strategy, roles=tuple(r for r in strategy.roles if r in ranks), rank_by_role=ranks
    )


def predict(placement: Placement, scores: dict[str, ModuleScore], alpha: float) -> dict[str, float]:
    """What each score says about a placement; higher means more worth adapting."""
    chosen = [(scores[m.path], placement.ranks[m.path]) for m in placement.modules]
    return {
        "grad": sum(s.at_rank(s.grad_energy, r) for s, r in chosen),
        "lora_b": sum((alpha / r) ** 2 * s.at_rank(s.lora_b, r) for s, r in chosen),
        "plop": -sum(s.nfn for s, _ in chosen) / len(chosen),
        "params": float(sum(s.module.in_features * s.module.out_features for s, _ in chosen)),
    }


def candidates(
    modules: list[LinearModule],
    scores: dict[str, ModuleScore],
    budget: int,
    alpha: float,
    bias: str = "none",
) -> list[Candidate]:
    """Every candidate strategy with ranks solved to `budget` and its predicted values."""
    out = []
    for s in candidate_strategies(modules):
        s = at_budget(modules, s, budget)
        p = place(modules, s, 1, bias)
        out.append(Candidate(s, p, predict(p, scores, alpha)))
    return out


def recommend(cands: list[Candidate], score: str, inverted: bool = False) -> Candidate:
    """The candidate the score ranks first (last with `inverted`)."""
    sign = -1 if inverted else 1
    return max(cands, key=lambda c: sign * c.predicted[score])


def band_of(layer: int, n_layers: int) -> str:
    return BANDS[min(2, layer * 3 // n_layers)]


def summary(scores: dict[str, ModuleScore], rank: int, alpha: float) -> dict[str, dict]:
    """Scores per role and per layer band at a uniform `rank` (module scores summed; PLoP
    averaged)."""
    n_layers = 1 + max(s.module.layer for s in scores.values())
    groups: dict[str, dict[str, list[ModuleScore]]] = {"role": {}, "band": {}}
    for s in scores.values():
        groups["role"].setdefault(s.module.role, []).append(s)
        groups["band"].setdefault(band_of(s.module.layer, n_layers), []).append(s)
    table = {}
    for kind, members in groups.items():
        table[kind] = {}
        for key, group in members.items():
            table[kind][key] = {
                "modules": len(group),
                "lora_params": sum(
                    rank * (s.module.in_features + s.module.out_features) for s in group
                ),
                "grad": sum(s.at_rank(s.grad_energy, rank) for s in group),
                "lora_b": sum((alpha / rank) ** 2 * s.at_rank(s.lora_b, rank) for s in group),
                "plop": sum(s.nfn for s in group) / len(group),
                "params": sum(s.module.in_features * s.module.out_features for s in group),
            }
    table["band"] = {b: table["band"][b] for b in BANDS if b in table["band"]}
    return table


def _has_weights(path: str) -> bool:
    from pathlib import Path

    return any(any(Path(path).glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pt", "*.pth"))


def run_advise(
    model_spec: str,
    data: str,
    train_split: str,
    budget: int | None = None,
    rank: int = 16,
    alpha: float = 32.0,
    bias: str = "none",
    examples: int = 16,
    max_length: int = 256,
    loss_on: str = "all",
    score: str = "lora_b",
    seed: int = 0,
    trust_remote_code: bool = False,
    data_format: str = "auto",
    chat_template: str = "auto",
) -> dict:
    """Score the model on the first `examples` training rows and recommend a placement.

    Returns the report as plain data (what `--json` prints); `budget` None means the size of
    `attention` at `rank`.
    """
    import time

    import torch

    from loraplace.advise.scores import score_modules
    from loraplace.data.chat import use_chat_template
    from loraplace.data.rows import load_rows, tokenize
    from loraplace.plan.roles import classify
    from loraplace.train.load import load_model

    start = time.perf_counter()
    source = _checked_source(model_spec, score, trust_remote_code)
    rows = load_rows(data, train_split, data_format)[:examples]
    torch.manual_seed(seed)
    model, tokenizer = load_model(source)
    loaded = time.perf_counter()
    use_chat_template(tokenizer, chat_template)
    modules = classify(model)
    budget = _checked_budget(modules, budget, rank, bias)
    batch = tokenize(rows, tokenizer, max_length, loss_on)
    max_rank = _max_rank(modules, budget, rank)
    scores = score_modules(
        model, batch, modules, tokenizer.pad_token_id, seed=seed, max_rank=max_rank
    )
    scored = time.perf_counter()
    cands, too_big = _fitting_candidates(modules, scores, budget, alpha, bias)
    return {
        "model": source.name,
        "data": data,
        "train_split": train_split,
        "data_format": rows.format,
        "examples": len(batch),
        "tokens": sum(len(e.input_ids) for e in batch),
        "max_length": max_length,
        "budget": budget,
        "rank": rank,
        "alpha": alpha,
        "score": score,
        **_recommendation(cands, too_big, scores, score, rank, alpha),
        "cost": _cost(start, loaded, scored),
    }


def _checked_source(model_spec: str, score: str, trust_remote_code: bool):
    """The model to score, refused where `score` is unknown or the model has no weights."""
    from loraplace.core.errors import UserError
    from loraplace.plan.models import resolve_model

    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")
    source = resolve_model(model_spec, trust_remote_code)
    if source.kind == "dir" and not _has_weights(source.path):
        raise UserError(
            f"advise scores a model's weights on your data, and {model_spec!r} has a config.json "
            "but no weight files (*.safetensors, *.bin), so there is nothing to score; "
            "`loraplace plan` works from the config alone"
        )
    return source


def _checked_budget(modules: list[LinearModule], budget: int | None, rank: int, bias: str) -> int:
    """The budget asked for, or (None) the size of `attention` at `rank`; at least 1."""
    from loraplace.core.errors import UserError

    if budget is None:
        budget = place(modules, parse_strategy("attention=attn"), rank, bias).trainable_params
    if budget < 1:
        raise UserError(f"the budget must be a positive number of parameters, got {budget}")
    return budget


def _max_rank(modules: list[LinearModule], budget: int, rank: int) -> int:
    """The highest rank any candidate reaches at the budget (or `rank`): what to score up to."""
    solved = [at_budget(modules, s, budget) for s in candidate_strategies(modules)]
    return max([rank] + [r for s in solved for r in s.rank_by_role.values()])


def _fitting_candidates(
    modules: list[LinearModule],
    scores: dict[str, ModuleScore],
    budget: int,
    alpha: float,
    bias: str,
) -> tuple[list[Candidate], list[str]]:
    """(candidates whose rank 1 fits the budget, names of those left out); refused if none fits."""
    from loraplace.core.errors import UserError

    minimal = {
        s.name: place(modules, s, 1, bias).trainable_params for s in candidate_strategies(modules)
    }
    too_big = [name for name, n in minimal.items() if n > budget]
    cands = [
        c
        for c in candidates(modules, scores, budget, alpha, bias)
        if c.strategy.name not in too_big
    ]
    if not cands:
        raise UserError(
            f"a budget of {budget:,} parameters is below rank 1 of every candidate placement "
            f"(the smallest needs {min(minimal.values()):,})"
        )
    return cands, too_big


def _recommendation(
    cands: list[Candidate],
    too_big: list[str],
    scores: dict[str, ModuleScore],
    score: str,
    rank: int,
    alpha: float,
) -> dict:
    """The report's scores, candidates (with each score's order) and recommended placement."""
    best = {s: recommend(cands, s).strategy.name for s in SCORES}
    order = {
        s: [c.strategy.name for c in sorted(cands, key=lambda c: -c.predicted[s])] for s in SCORES
    }
    chosen = recommend(cands, score)
    table = summary(scores, rank, alpha)
    return {
        "scores": {s: SCORE_TEXT[s] for s in SCORES},
        "by_role": table["role"],
        "by_band": table["band"],
        "candidates": [
            {
                "name": c.strategy.name,
                "strategy": c.text,
                "trainable_params": c.placement.trainable_params,
                "ranks": dict(c.strategy.rank_by_role),
                "predicted": c.predicted,
                "order": {s: order[s].index(c.strategy.name) + 1 for s in SCORES},
            }
            for c in cands
        ],
        "left_out": too_big,
        "best_by_score": best,
        "recommended": chosen.text,
        "recommended_params": chosen.placement.trainable_params,
    }


def _cost(start: float, loaded: float, scored: float) -> dict:
    """Seconds taken (all, loading, scoring), CPU seconds and peak memory of this process."""
    import resource
    import time

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": time.perf_counter() - start,
        "load_s": loaded - start,
        "score_s": scored - loaded,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the machine may be shared
        "peak_memory_mb": usage.ru_maxrss / 2**10,
    }


def _num(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def render(report: dict) -> str:
    """The report as text: scores per role and band, candidates, and the recommendation."""
    cols = ("grad", "lora_b", "plop", "params")
    lines = [
        f"model: {report['model']}; data: {report['data']} {report['train_split']} "
        f"({report.get('data_format', 'alpaca')}), first "
        f"{report['examples']} examples ({report['tokens']:,} tokens, max_length "
        f"{report['max_length']})",
        f"budget: {report['budget']:,} trainable parameters; scores at uniform r={report['rank']}"
        f" per role and band:",
        "",
        f"{'':<12}{'modules':>8}" + "".join(f"{c:>14}" for c in cols),
    ]
    for kind in ("by_role", "by_band"):
        for key, row in report[kind].items():
            lines.append(
                f"{key:<12}{row['modules']:>8}" + "".join(f"{_num(row[c]):>14}" for c in cols)
            )
        lines.append("")
    lines.append("candidates at the budget (rank by each score, 1 = adapt this first):")
    lines.append(
        f"{'candidate':<14}{'trainable':>11}  " + "".join(f"{c:>8}" for c in cols) + "  strategy"
    )
    for c in report["candidates"]:
        lines.append(
            f"{c['name']:<14}{c['trainable_params']:>11,}  "
            + "".join(f"{c['order'][s]:>8}" for s in cols)
            + f"  {c['strategy']}"
        )
    if report["left_out"]:
        lines.append(f"left out (rank 1 exceeds the budget): {', '.join(report['left_out'])}")
    lines += ["", "scores:"] + [f"  {k}: {v}" for k, v in report["scores"].items()]
    cost = report["cost"]
    lines += [
        "",
        f"recommended by {report['score']} ({report['recommended_params']:,} parameters):",
        f"  --strategy '{report['recommended']}'",
        f"cost: {cost['wall_s']:.1f} s ({cost['score_s']:.1f} s scoring, {cost['cpu_s']:.0f} CPU s), "
        "peak memory "
        f"{cost['peak_memory_mb']:,.0f} MB",
    ]
    return "\n".join(lines)
