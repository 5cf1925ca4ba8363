"""Placement strategies: which roles, in which layers, get adapters.

    from loraplace.plan.strategies import parse_strategy
    parse_strategy("top6=attn,mlp.down@top:6")
    # Strategy(name='top6', roles=('attn.qkv', ..., 'mlp.down'), layers='top:6', ...)

Built-ins are by role (`full`, `attention`, `ffn`) or the seed's literal PEFT lists
(`seed-full`, `seed-attention`, `seed-ffn`). A custom strategy is `NAME=ROLE[,ROLE...][@LAYERS]`
where LAYERS is `a:b` (python slice), `top:k`, `bottom:k`, `every:k` or `block:i/n` (the i-th
of n equal blocks of depth, counted from 0 at the bottom). A role may carry its own rank,
`ROLE:RANK` (`adv=mlp.up:12,mlp.down:10@block:1/3`), which is how `advise` writes the
per-role ranks of an equal-budget placement; roles without one take `--rank`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraplace.core.errors import UserError, one_of
from loraplace.plan.roles import ATTN_ROLES, MLP_ROLES

ROLE_GROUPS = {"attn": ATTN_ROLES, "mlp": MLP_ROLES, "attn.*": ATTN_ROLES, "mlp.*": MLP_ROLES}


@dataclass(frozen=True)
class Strategy:
    """A placement: roles to adapt, an optional layer selection, and optional per-role ranks.

    `seed_targets` is the seed document's literal PEFT `target_modules` list: where the model
    has modules of those names, they are matched by suffix exactly as PEFT would.
    """

    name: str
    roles: tuple[str, ...]
    layers: str | None = None
    seed_targets: tuple[str, ...] | None = None
    rank_by_role: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    description: str = ""


BUILTINS = {
    s.name: s
    for s in (
        Strategy("full", ATTN_ROLES + MLP_ROLES, description="every attention and MLP projection"),
        Strategy("attention", ATTN_ROLES, description="attention projections only"),
        Strategy("ffn", MLP_ROLES, description="MLP (feed-forward) projections only"),
        Strategy(
            "seed-full",
            ATTN_ROLES + MLP_ROLES,
            seed_targets=("c_attn", "c_proj", "c_fc"),
            description="the seed's list ['c_attn','c_proj','c_fc']",
        ),
        Strategy(
            "seed-attention",
            ATTN_ROLES + ("mlp.down",),
            seed_targets=("c_attn", "c_proj"),
            description="the seed's list ['c_attn','c_proj']: also adapts mlp.c_proj (mlp.down)",
        ),
        Strategy(
            "seed-ffn",
            ("mlp.up",),
            seed_targets=("c_fc",),
            description="the seed's list ['c_fc']: the first MLP projection only",
        ),
    )
}
SEED_COMPARISON = ("full", "attention", "ffn", "seed-attention", "seed-ffn")


def parse_roles(text: str) -> tuple[str, ...]:
    """'attn,mlp.down' -> ('attn.qkv', ..., 'attn.out', 'mlp.down'), in canonical order."""
    chosen: set[str] = set()
    valid = list(ROLE_GROUPS) + list(ATTN_ROLES + MLP_ROLES)
    for word in (w.strip() for w in text.split(",")):
        if word in ROLE_GROUPS:
            chosen.update(ROLE_GROUPS[word])
        elif word in ATTN_ROLES + MLP_ROLES:
            chosen.add(word)
        else:
            raise UserError(f"unknown role {word!r}{one_of(word, valid)}")
    return tuple(r for r in ATTN_ROLES + MLP_ROLES if r in chosen)


def _split_ranks(text: str) -> tuple[str, dict[str, int]]:
    """'mlp.up:12,attn' -> ('mlp.up,attn', {'mlp.up': 12}); a group's rank goes to its roles."""
    words, ranks = [], {}
    for word in (w.strip() for w in text.split(",")):
        role, sep, rank = word.partition(":")
        words.append(role.strip())
        if sep:
            if not rank.strip().isdigit() or int(rank) < 1:
                raise UserError(f"the rank in {word!r} must be a positive whole number")
            base = BUILTINS.get(role.strip())
            for r in base.roles if base else parse_roles(role):
                ranks[r] = int(rank)
    return ",".join(words), ranks


def format_strategy(strategy: Strategy) -> str:
    """The NAME=ROLE[:RANK][,...][@LAYERS] text `parse_strategy` reads back to this strategy."""
    roles = ",".join(
        f"{r}:{strategy.rank_by_role[r]}" if r in strategy.rank_by_role else r
        for r in strategy.roles
    )
    return f"{strategy.name}={roles}" + (f"@{strategy.layers}" if strategy.layers else "")


def parse_strategy(text: str) -> Strategy:
    """A built-in name, or NAME=ROLE[:RANK][,ROLE[:RANK]...][@LAYERS]."""
    text = text.strip()
    if "=" not in text:
        if text not in BUILTINS:
            raise UserError(
                f"unknown strategy {text!r}{one_of(text, BUILTINS)}, or NAME=ROLE[,ROLE...][@LAYERS]"
            )
        return BUILTINS[text]
    name, _, spec = text.partition("=")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise UserError(f"strategy name {name!r} may use only letters, digits and _ . + -")
    roles_text, _, layers = spec.partition("@")
    roles_text, ranks = _split_ranks(roles_text)
    base = BUILTINS.get(roles_text.strip())  # e.g. top6=full@top:6
    roles = base.roles if base else parse_roles(roles_text)
    layers = layers.strip() or None
    if layers is not None:
        select_layers(layers, 1_000_000)  # syntax check now; bounds are checked per model
    return Strategy(name, roles, layers, rank_by_role=ranks, description=spec.strip())


def resolve_strategies(names: list[str], layer_study_roles: str | None = None) -> list[Strategy]:
    """Parse strategy names, add the depth sweep for `layer_study_roles`; names must be unique."""
    strategies = [parse_strategy(s) for s in names]
    if layer_study_roles:
        strategies += layer_study(layer_study_roles)
    seen = [s.name for s in strategies]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise UserError(f"strategy names must be unique; repeated: {', '.join(dupes)}")
    return strategies


def select_layers(spec: str | None, n_layers: int) -> list[int]:
    """The layer indices a selection names on a model with `n_layers` decoder blocks."""
    if spec is None:
        return list(range(n_layers))
    kind, _, arg = spec.partition(":")

    def count(word: str) -> int:
        if not word.isdigit() or int(word) < 1:
            raise UserError(f"layer selection {spec!r} needs a positive whole number")
        if int(word) > n_layers:
            raise UserError(
                f"layer selection {spec!r} asks for {word} layers; the model has {n_layers}"
            )
        return int(word)

    if kind == "top":
        return list(range(n_layers - count(arg), n_layers))
    if kind == "bottom":
        return list(range(count(arg)))
    if kind == "every":
        return list(range(0, n_layers, count(arg)))
    if kind == "block":
        m = re.fullmatch(r"(\d+)/(\d+)", arg)
        if not m or not int(m[1]) < int(m[2]) or int(m[2]) > n_layers:
            raise UserError(
                f"layer selection {spec!r} must be block:i/n with 0 <= i < n <= {n_layers}"
            )
        i, n = int(m[1]), int(m[2])
        return list(range(i * n_layers // n, (i + 1) * n_layers // n))
    m = re.fullmatch(r"(-?\d*):(-?\d*)", spec)
    if not m:
        raise UserError(
            f"layer selection {spec!r} is not one of a:b, top:k, bottom:k, every:k, block:i/n"
        )
    lo, hi = int(m[1] or 0), int(m[2] or n_layers)
    if (
        not (-n_layers <= lo < n_layers and -n_layers < hi <= n_layers)
        or not range(n_layers)[lo:hi]
    ):
        raise UserError(f"layer range {spec!r} is out of bounds for a model with {n_layers} layers")
    return list(range(n_layers))[lo:hi]


def layer_study(
    roles: str = "attn,mlp", blocks: int = 4, top_k: tuple[int, ...] = (2, 4, 8)
) -> list[Strategy]:
    """Strategies for where in depth the adapters go, all with the same roles.

    Thirds (bottom / middle / top), top-k for each k, every other layer, and a sweep over
    `blocks` equal blocks of depth.
    """
    role_set = parse_roles(roles)
    tag = roles.replace(",", "+").replace(".", "").replace("*", "")
    specs = [
        ("bottom-third", "block:0/3"),
        ("middle-third", "block:1/3"),
        ("top-third", "block:2/3"),
    ]
    specs += [(f"top{k}", f"top:{k}") for k in top_k]
    specs += [("every2", "every:2")]
    specs += [(f"block{i}of{blocks}", f"block:{i}/{blocks}") for i in range(blocks)]
    return [
        Strategy(f"{tag}-{name}", role_set, spec, description=f"{roles}@{spec}")
        for name, spec in specs
    ]


def to_dict(strategy: Strategy) -> dict:
    return {
        "name": strategy.name,
        "roles": list(strategy.roles),
        "layers": strategy.layers,
        "seed_targets": list(strategy.seed_targets) if strategy.seed_targets else None,
        "rank_by_role": dict(strategy.rank_by_role),
        "description": strategy.description,
    }


def from_dict(data: dict) -> Strategy:
    targets = data.get("seed_targets")
    return Strategy(
        data["name"],
        tuple(data["roles"]),
        data.get("layers"),
        tuple(targets) if targets else None,
        dict(data.get("rank_by_role") or {}),
        data.get("description", ""),
    )
