"""`loraplace advise --validate`: train the candidates at one budget and check the scores.

    loraplace advise --validate --data ../shared/data/alpaca_head200.json \\
        --train-split 'train[:32]' --eval-split 'train[100:132]' --epochs 1 \\
        --seed 1 --seed 2 --seed 3 --set max_length=128 --out runs/advise

Every candidate `advise` ranks is trained at the same trainable budget with every seed through
`runner.run_study` (finished runs are kept). The measured gain of a run is the untrained
model's eval loss minus the run's. For each score: Spearman and Kendall correlation between
its prediction and the mean gain over seeds, with a percentile bootstrap interval over seeds,
and the regret of the candidate it recommends (best mean gain minus its mean gain, also in
units of the paired standard error over evaluation examples). Baselines get the same regret.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

from loraplace.advise.recommend import SCORES, run_advise
from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import write_json, write_text

N_BOOT = 2000


def _gains(results: list[dict], names: list[str]) -> tuple[dict, dict, list[int]]:
    """Gain per (candidate, seed), per-example (loss_sum, tokens) per candidate, the seeds
    every candidate finished."""
    ok = {(r["strategy"], r["seed"]): r for r in results if r.get("status") == "ok"}
    seeds = sorted({s for _, s in ok})
    seeds = [s for s in seeds if all((n, s) in ok for n in names)]
    if len(seeds) < 2:
        raise UserError("the validation needs at least two seeds that finished for every candidate")
    gain = {
        n: np.array(
            [
                ok[(n, s)]["metrics"]["base_eval_loss"] - ok[(n, s)]["metrics"]["eval_loss"]
                for s in seeds
            ]
        )
        for n in names
    }
    examples = {
        n: (
            np.mean([ok[(n, s)]["per_example"]["loss_sum"] for s in seeds], axis=0),
            np.array(ok[(n, seeds[0])]["per_example"]["tokens"], dtype=float),
        )
        for n in names
    }
    return gain, examples, seeds


def regret(examples: dict, best: str, chosen: str) -> tuple[float, float]:
    """Token-weighted eval loss of `chosen` minus `best`, seeds averaged, and that difference
    over its paired standard error across evaluation examples (a ratio estimator's)."""
    if chosen == best:
        return 0.0, 0.0
    (a, tokens), (b, _) = examples[chosen], examples[best]
    x = a - b  # per-example loss-sum differences
    mean = x.sum() / tokens.sum()
    n = len(x)
    se = math.sqrt(n / (n - 1) * ((x - mean * tokens) ** 2).sum()) / tokens.sum()
    return float(mean), float(mean / se) if se > 0 else math.inf


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho (ties get mean ranks) between x (n,) and each row of y (..., n);
    nan where either side is constant."""
    rx, ry = sps.rankdata(x), sps.rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(), ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx**2).sum() * (ry**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ry @ rx) / den


def _kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between x (n,) and each row of y (..., n); nan where either is constant."""
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[..., i] - y[..., j])
    den = np.sqrt((sx != 0).sum() * (sy != 0).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sy @ sx) / den


def correlations(predicted: np.ndarray, gain: np.ndarray, rng: np.random.Generator) -> dict:
    """Spearman and Kendall between a score and the mean gain, with seed-bootstrap samples.

    gain: (candidates, seeds). Resamples the seeds with replacement N_BOOT times; a resample
    where the score or the gains are constant counts as 0 correlation.
    """
    mean = gain.mean(axis=1)
    draws = rng.integers(0, gain.shape[1], size=(N_BOOT, gain.shape[1]))
    boot_means = gain[:, draws].mean(axis=2).T  # (N_BOOT, candidates)
    return {
        "spearman": float(_spearman(predicted, mean)),
        "kendall": float(_kendall(predicted, mean)),
        "boot": {
            "spearman": np.nan_to_num(_spearman(predicted, boot_means)),
            "kendall": np.nan_to_num(_kendall(predicted, boot_means)),
        },
    }


def analyze(advice: dict, results: list[dict], names: list[str]) -> dict:
    """The validation table from an advise report and the study's results."""
    gain, examples, seeds = _gains(results, names)
    cands = {c["name"]: c for c in advice["candidates"] if c["name"] in names}
    matrix = np.stack([gain[n] for n in names])  # (candidates, seeds)
    mean_gain = dict(zip(names, matrix.mean(axis=1).tolist(), strict=True))
    best = max(names, key=mean_gain.get)
    rows, boots = _score_rules(cands, names, matrix, examples, best)
    rows += _baseline_rules(examples, best, names)
    return {
        "seeds": seeds,
        "budget": advice["budget"],
        "candidates": [
            {
                "name": n,
                "strategy": cands[n]["strategy"],
                "trainable_params": cands[n]["trainable_params"],
                "gain_mean": mean_gain[n],
                "gain_by_seed": gain[n].tolist(),
                "predicted": cands[n]["predicted"],
            }
            for n in names
        ],
        "best": best,
        "rules": rows,
        "verdicts": _verdicts(boots),
    }


def _score_rules(
    cands: dict, names: list[str], matrix: np.ndarray, examples: dict, best: str
) -> tuple[list[dict], dict]:
    """A rule per score and per inverted score: its correlations with the gains and the regret
    of what it recommends; and each rule's bootstrap Spearman samples."""
    rows, boots = [], {}
    for score in SCORES:
        for inverted in (False, True):
            sign = -1 if inverted else 1
            predicted = np.array([sign * cands[n]["predicted"][score] for n in names])
            corr = correlations(predicted, matrix, np.random.default_rng(0))
            label = f"inverted {score}" if inverted else score
            boots[label] = corr["boot"]["spearman"]
            chosen = names[int(np.argmax(predicted))]
            loss, in_se = regret(examples, best, chosen)
            rows.append(
                {
                    "rule": label,
                    "recommends": chosen,
                    "spearman": corr["spearman"],
                    "spearman_ci": np.percentile(corr["boot"]["spearman"], [2.5, 97.5]).tolist(),
                    "kendall": corr["kendall"],
                    "kendall_ci": np.percentile(corr["boot"]["kendall"], [2.5, 97.5]).tolist(),
                    "regret": loss,
                    "regret_se": in_se,
                }
            )
    return rows, boots


def _baseline_rules(examples: dict, best: str, names: list[str]) -> list[dict]:
    """The regret of always choosing full, ffn or attention (those trained), and of a random
    choice (the mean over candidates)."""
    rows = []
    for fixed in ("full", "ffn", "attention"):
        if fixed in names:
            loss, in_se = regret(examples, best, fixed)
            rows.append(
                {"rule": f"always {fixed}", "recommends": fixed, "regret": loss, "regret_se": in_se}
            )
    each = [regret(examples, best, n) for n in names]
    rows.append(
        {
            "rule": "random (expected)",
            "recommends": "any",
            "regret": float(np.mean([e[0] for e in each])),
            "regret_se": float(np.mean([e[1] for e in each])),
        }
    )
    return rows


def _verdicts(boots: dict) -> dict[str, str]:
    """Per score (not the baseline itself): whether the 95 % bootstrap interval of its Spearman
    minus parameter count's lies above 0, below 0, or across it."""
    verdicts = {}
    for score in SCORES[:-1]:
        diff = boots[score] - boots["params"]
        lo, hi = np.percentile(diff, [2.5, 97.5])
        if lo > 0:
            verdicts[score] = f"beat parameter count (Spearman difference {lo:+.2f} to {hi:+.2f})"
        elif hi < 0:
            verdicts[score] = (
                f"lost to parameter count (Spearman difference {lo:+.2f} to {hi:+.2f})"
            )
        else:
            verdicts[score] = (
                f"not resolved against parameter count (Spearman difference {lo:+.2f} to {hi:+.2f})"
            )
    return verdicts


def run_validation(
    cfg: StudyConfig,
    out: str | Path,
    budget: int | None,
    examples: int,
    only: str | None = None,
    log=print,
) -> dict:
    """Advise, train every candidate x seed at the budget, and analyze; writes advise.json,
    validation.json and validation.md under OUT."""
    from loraplace.runner import run_study

    out = Path(out)
    if len(cfg.seeds) < 2:
        raise UserError("--validate needs at least two seeds (--seed 1 --seed 2 --seed 3)")
    advice = run_advise(
        cfg.model, cfg.data, cfg.train_split, budget, cfg.rank, cfg.alpha, cfg.bias, examples,
        cfg.max_length, cfg.loss_on, trust_remote_code=cfg.trust_remote_code,
        data_format=cfg.data_format, chat_template=cfg.chat_template,
    )  # fmt: skip
    write_json(out / "advise.json", advice)
    log(f"advise: {advice['cost']['wall_s']:.1f} s; recommended {advice['recommended']}")
    cands = advice["candidates"]
    if only:
        wanted = [w.strip() for w in only.split(",")]
        unknown = [w for w in wanted if w not in {c["name"] for c in cands}]
        if unknown:
            raise UserError(
                f"unknown candidate {unknown[0]!r}; valid: {', '.join(c['name'] for c in cands)}"
            )
        cands = [c for c in cands if c["name"] in wanted]
    if len(cands) < 3:
        raise UserError("the validation needs at least three candidates to rank")
    cfg.strategies = [c["strategy"] for c in cands]
    cfg.layer_study, cfg.equal_budget = None, None
    results = run_study(cfg, out / "study", log=log)
    report = analyze(advice, results, [c["name"] for c in cands])
    report["config"] = cfg.to_dict()
    report["advise_cost"] = advice["cost"]
    write_json(out / "validation.json", report)
    write_text(out / "validation.md", render_validation(report) + "\n")
    return report


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_validation(report: dict) -> str:
    """Markdown tables: candidates with their gains, then each rule's correlations and regret."""
    lines = [
        f"Budget {report['budget']:,} trainable parameters; seeds {report['seeds']}; "
        f"best measured: {report['best']}.",
        "",
        "| candidate | trainable | gain (mean) | gain per seed | " + " | ".join(SCORES) + " |",
        "|---|---|---|---|" + "---|" * len(SCORES),
    ]
    for c in report["candidates"]:
        lines.append(
            f"| {c['name']} | {c['trainable_params']:,} | {_f(c['gain_mean'], 4)} | "
            + ", ".join(_f(g, 4) for g in c["gain_by_seed"])
            + " | "
            + " | ".join(f"{c['predicted'][s]:.4g}" for s in SCORES)
            + " |"
        )
    lines += [
        "",
        "| rule | recommends | Spearman | 95 % interval | Kendall | 95 % interval | regret (loss) | regret / SE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rules"]:
        ci = r.get("spearman_ci") or [None, None]
        kci = r.get("kendall_ci") or [None, None]
        lines.append(
            f"| {r['rule']} | {r['recommends']} | {_f(r.get('spearman'), 2)} | "
            f"{_f(ci[0], 2)} to {_f(ci[1], 2)} | {_f(r.get('kendall'), 2)} | "
            f"{_f(kci[0], 2)} to {_f(kci[1], 2)} | {_f(r['regret'], 4)} | {_f(r['regret_se'], 1)} |"
        )
    lines += [""] + [f"- {score}: {text}" for score, text in report["verdicts"].items()]
    return "\n".join(lines)
