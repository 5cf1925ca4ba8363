"""Figures built only from result files (matplotlib, headless).

curves(results, "OUT/curves.png"); tradeoff(agg, "OUT/tradeoff.png")
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loraplace.core.results import write_bytes_atomic  # noqa: E402
from loraplace.plan.roles import ATTN_ROLES, MLP_ROLES  # noqa: E402


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def curves(results: list[dict], path: Path) -> None:
    """Train loss per optimizer step (thin) and eval loss at epoch ends (markers), every run."""
    ok = [r for r in results if r.get("status") == "ok"]
    colors = _colors(list(dict.fromkeys(r["strategy"] for r in ok)))
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for r in ok:
        label = (
            r["strategy"]
            if r["seed"] == min(x["seed"] for x in ok if x["strategy"] == r["strategy"])
            else None
        )
        train = r["curves"]["train"]
        ax_train.plot(
            [p["step"] for p in train],
            [p["loss"] for p in train],
            color=colors[r["strategy"]],
            lw=0.8,
            alpha=0.7,
            label=label,
        )
        ev = [{"epoch": 0, "loss": r["metrics"]["base_eval_loss"]}] + r["curves"]["eval"]
        ax_eval.plot(
            [p["epoch"] for p in ev],
            [p["loss"] for p in ev],
            "o-",
            color=colors[r["strategy"]],
            alpha=0.8,
            label=label,
        )
    ax_train.set(title="train loss", xlabel="optimizer step", ylabel="loss")
    ax_eval.set(title="eval loss (token-weighted)", xlabel="epoch", ylabel="loss")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of points no other point beats on both x and y (lower is better), by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    front, best = [], np.inf
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return front


def tradeoff(
    agg, path: Path, x: str = "trainable_params", panels: tuple[str, ...] = ("trainable_params",)
) -> None:
    """Mean eval loss (95% interval over seeds) against cost, with the Pareto frontier."""
    agg = agg[agg["n_seeds"] > 0]
    labels = {
        "trainable_params": "trainable parameters",
        "train_time_s": "training time (s)",
        "peak_memory_mb": "peak memory (MB)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, col in zip(axes[0], panels, strict=True):
        xs = list(agg[f"{col}_mean"] if f"{col}_mean" in agg else agg[col])
        ys = list(agg["eval_loss_mean"])
        err_lo = np.nan_to_num(np.array(ys) - agg["eval_loss_ci_low"].to_numpy())
        err_hi = np.nan_to_num(agg["eval_loss_ci_high"].to_numpy() - np.array(ys))
        ax.errorbar(xs, ys, yerr=[err_lo, err_hi], fmt="o", capsize=3)
        for xv, yv, name in zip(xs, ys, agg["strategy"], strict=True):
            ax.annotate(name, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(xs, ys)
        ax.plot(
            [xs[i] for i in front],
            [ys[i] for i in front],
            "--",
            color="grey",
            lw=1,
            label="Pareto frontier",
        )
        ax.set(xlabel=labels.get(col, col), ylabel="eval loss (mean, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def placement_map(results: list[dict], path: Path) -> None:
    """Where the adapters sit: layers (rows) by roles (columns), LoRA rank in each cell, per strategy."""
    first = {}
    for r in results:
        if "placement" in r:
            first.setdefault(r["strategy"], r)
    if not first:
        return
    roles = [
        ro
        for ro in ATTN_ROLES + MLP_ROLES
        if any(ro in r["placement"]["trainable_by_role"] for r in first.values())
    ]
    n_layers = 1 + max(int(k) for r in first.values() for k in r["placement"]["trainable_by_layer"])
    fig, axes = plt.subplots(
        1,
        len(first),
        figsize=(1.1 + 0.45 * len(roles) * len(first), 0.5 + 0.16 * n_layers),
        squeeze=False,
        sharey=True,
    )
    for ax, (name, r) in zip(axes[0], first.items(), strict=True):
        grid = np.zeros((n_layers, len(roles)))
        for _, layer, role, rank in r["placement"].get("map", []):
            if role in roles:
                grid[layer, roles.index(role)] = rank
        ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, origin="lower")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(roles)), roles, rotation=90, fontsize=7)
        ax.set_ylabel("layer")
    _save(fig, path)


def lr_sweep(sweep: dict, path: Path) -> None:
    """Development loss against learning rate (log scale), a line per strategy, its pick ringed."""
    names = list(sweep["strategies"])
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        entry = sweep["strategies"][name]
        points = sorted((float(lr), loss) for lr, loss in entry["curve"].items())
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colors[name],
                label=name)  # fmt: skip
        best = dict(points)[entry["lr"]]
        ax.plot([entry["lr"]], [best], "o", ms=12, mfc="none", color=colors[name])
    ax.set_xscale("log")
    ax.set(title="learning-rate sweep", xlabel="learning rate",
           ylabel="development eval loss")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
