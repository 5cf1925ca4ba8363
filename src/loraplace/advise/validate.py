"""`loraplace advise --validate`: train the candidates at one budget and check the scores.

    loraplace advise --validate --data ../shared/data/alpaca_head200.json \\
        --train-split 'train[:32]' --eval-split 'train[100:132]' --epochs 1 \\
        --seed 1 --seed 2 --seed 3 --set max_length=128 --out runs/advise

Every candidate `advise` ranks is trained at the same trainable budget with every seed through
`study.runner.run_study` (finished runs are kept). The measured gain of a run is the untrained
model's eval loss minus the run's. For each score: Spearman and Kendall correlation between
its prediction and the mean gain over seeds, with a percentile bootstrap interval that
resamples the candidates (which placements were tried is the main source of chance with a
dozen of them) and, with at least MIN_SEEDS_TO_RESAMPLE seeds, each candidate's seeds too.
Each score is compared with parameter count by a test for two dependent correlations that
share the gains (Meng, Rosenthal and Rubin 1992, on Spearman's rho), Holm-corrected across the
scores, beside the bootstrap interval of the difference. Every rule's regret is the best mean
gain minus the gain of the candidate it recommends, with its standard error across training
seeds and evaluation examples (analysis/levels.py); "best" is picked from the same runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

from loraplace.advise.recommend import SCORES, run_advise
from loraplace.analysis import levels
from loraplace.analysis.metrics import METRICS, PerExample, per_example
from loraplace.analysis.stats import holm
from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import write_json, write_text

N_BOOT = 2000
MIN_SEEDS_TO_RESAMPLE = 5  # 3 seeds have 10 distinct resamples: too few to say anything


def _gains(results: list[dict], names: list[str]) -> tuple[dict, PerExample, list[int]]:
    """Gain per (candidate, seed), each candidate's per-example losses, the seeds every
    candidate finished."""
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
    losses = per_example([ok[(n, s)] for n in names for s in seeds], METRICS[0])
    if losses is None:
        raise UserError("the validation's runs have no per-example losses; run them again")
    return gain, losses, seeds


def regret(losses: PerExample, best: str, chosen: dict[str, float]) -> tuple[float, float]:
    """The eval loss of a choice (`chosen`: candidate -> probability) minus `best`'s, seeds
    averaged and token-weighted, and its standard error across training seeds and evaluation
    examples (NaN where a candidate ran one seed)."""
    names = list(losses.values)
    coefs = [chosen.get(n, 0.0) - (n == best) for n in names]
    if not any(coefs):
        return 0.0, 0.0
    est = levels.contrast([losses.values[n] for n in names], coefs, losses.weights)
    return float(est.estimate), float(np.sqrt(est.var))


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho (ties get mean ranks) along the last axis of x and y, broadcast (a
    score (n,) against gains (..., n), or row by row); nan where either side is constant."""
    rx, ry = sps.rankdata(x, axis=-1), sps.rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(axis=-1, keepdims=True), ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=-1) * (ry**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=-1) / den


def _kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b along the last axis of x and y, broadcast; nan where either is
    constant."""
    i, j = np.triu_indices(np.shape(x)[-1], k=1)
    sx, sy = np.sign(x[..., i] - x[..., j]), np.sign(y[..., i] - y[..., j])
    den = np.sqrt((sx != 0).sum(axis=-1) * (sy != 0).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sx * sy).sum(axis=-1) / den


def resample(gain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws of the candidates (with replacement) and, with at least
    MIN_SEEDS_TO_RESAMPLE seeds, of each drawn candidate's seeds.

    Args:
        gain: (candidates, seeds).

    Returns:
        (candidate indices (N_BOOT, candidates), their mean gains (N_BOOT, candidates)).
    """
    n, k = gain.shape
    idx = rng.integers(0, n, size=(N_BOOT, n))
    if k < MIN_SEEDS_TO_RESAMPLE:
        return idx, gain.mean(axis=1)[idx]
    seeds = rng.integers(0, k, size=(N_BOOT, n, k))
    return idx, np.take_along_axis(gain[idx], seeds, axis=2).mean(axis=2)


def correlations(predicted: np.ndarray, gain: np.ndarray, draws) -> dict:
    """Spearman and Kendall between a score and the mean gain, with bootstrap samples.

    gain: (candidates, seeds); draws: `resample`'s. A draw where the score or the gains are
    constant has no correlation and is left out of the intervals.
    """
    idx, boot_gain = draws
    return {
        "spearman": float(_spearman(predicted, gain.mean(axis=1))),
        "kendall": float(_kendall(predicted, gain.mean(axis=1))),
        "boot": {
            "spearman": _spearman(predicted[idx], boot_gain),
            "kendall": _kendall(predicted[idx], boot_gain),
        },
    }


def dependent_correlations(r1: float, r2: float, r12: float, n: int) -> tuple[float, float]:
    """Whether two Spearman correlations with one shared variable differ (Meng, Rosenthal and
    Rubin 1992, Fisher's z with Spearman's variance 1.06 / (n - 3)).

    Args:
        r1, r2: Each score's correlation with the gains.
        r12: The two scores' correlation with each other.
        n: Candidates.

    Returns:
        (z, two-sided p); z > 0 where r1 is the larger.
    """
    if n < 4 or not all(math.isfinite(r) for r in (r1, r2, r12)):
        return math.nan, math.nan
    clip = lambda r: min(max(r, -0.999999), 0.999999)  # noqa: E731
    r1, r2, r12 = clip(r1), clip(r2), clip(r12)
    mean_sq = (r1**2 + r2**2) / 2
    f = min(1.0, (1 - r12) / (2 * (1 - mean_sq)))
    h = (1 - f * mean_sq) / (1 - mean_sq)
    z = (math.atanh(r1) - math.atanh(r2)) * math.sqrt((n - 3) / 1.06 / (2 * (1 - r12) * h))
    return z, float(2 * sps.norm.sf(abs(z)))


def analyze(advice: dict, results: list[dict], names: list[str]) -> dict:
    """The validation table from an advise report and the study's results."""
    gain, losses, seeds = _gains(results, names)
    cands = {c["name"]: c for c in advice["candidates"] if c["name"] in names}
    matrix = np.stack([gain[n] for n in names])  # (candidates, seeds)
    mean_gain = dict(zip(names, matrix.mean(axis=1).tolist(), strict=True))
    best = max(names, key=mean_gain.get)
    draws = resample(matrix, np.random.default_rng(0))
    rows, boots = _score_rules(cands, names, matrix, losses, best, draws)
    rows += _baseline_rules(losses, best, names)
    against = _against_params(cands, names, matrix, boots)
    enough = len(seeds) >= MIN_SEEDS_TO_RESAMPLE
    return {
        "seeds": seeds,
        "budget": advice["budget"],
        "resampled": "candidates and seeds" if enough else "candidates",
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
        "against_params": against,
        "verdicts": {t["score"]: t["verdict"] for t in against},
    }


def _interval(samples: np.ndarray) -> list[float]:
    """The 95 % percentile interval of the bootstrap samples that have a value."""
    kept = samples[np.isfinite(samples)]
    return np.percentile(kept, [2.5, 97.5]).tolist() if kept.size else [math.nan, math.nan]


def _score_rules(
    cands: dict, names: list[str], matrix: np.ndarray, losses: PerExample, best: str, draws
) -> tuple[list[dict], dict]:
    """A rule per score and per inverted score: its correlations with the gains and the regret
    of what it recommends; and each rule's bootstrap Spearman samples."""
    rows, boots = [], {}
    for score in SCORES:
        for inverted in (False, True):
            sign = -1 if inverted else 1
            predicted = np.array([sign * cands[n]["predicted"][score] for n in names])
            corr = correlations(predicted, matrix, draws)
            label = f"inverted {score}" if inverted else score
            boots[label] = corr["boot"]["spearman"]
            chosen = names[int(np.argmax(predicted))]
            loss, se = regret(losses, best, {chosen: 1.0})
            rows.append(
                {
                    "rule": label,
                    "recommends": chosen,
                    "spearman": corr["spearman"],
                    "spearman_ci": _interval(corr["boot"]["spearman"]),
                    "kendall": corr["kendall"],
                    "kendall_ci": _interval(corr["boot"]["kendall"]),
                    "regret": loss,
                    "regret_se": se,
                }
            )
    return rows, boots


def _baseline_rules(losses: PerExample, best: str, names: list[str]) -> list[dict]:
    """The regret of always choosing full, ffn or attention (those trained), and of a random
    choice (every candidate equally likely: its expected regret and that estimate's standard
    error)."""
    rows = []
    for fixed in ("full", "ffn", "attention"):
        if fixed in names:
            loss, se = regret(losses, best, {fixed: 1.0})
            rows.append(
                {"rule": f"always {fixed}", "recommends": fixed, "regret": loss, "regret_se": se}
            )
    loss, se = regret(losses, best, {n: 1 / len(names) for n in names})
    rows.append({"rule": "random (expected)", "recommends": "any", "regret": loss, "regret_se": se})
    return rows


def _against_params(cands: dict, names: list[str], matrix: np.ndarray, boots: dict) -> list[dict]:
    """Per score (not the baseline itself): its Spearman minus parameter count's, the
    bootstrap interval of that difference, and the dependent-correlations test, Holm-corrected
    across the scores."""
    mean = matrix.mean(axis=1)
    params = np.array([cands[n]["predicted"]["params"] for n in names])
    tests = []
    for score in SCORES[:-1]:
        predicted = np.array([cands[n]["predicted"][score] for n in names])
        r1, r2 = float(_spearman(predicted, mean)), float(_spearman(params, mean))
        z, p = dependent_correlations(r1, r2, float(_spearman(predicted, params)), len(names))
        diff = boots[score] - boots["params"]
        tests.append(
            {"score": score, "difference": r1 - r2, "ci": _interval(diff), "z": z, "p_value": p}
        )
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests]), strict=True):
        test["p_adjusted"] = adjusted
        test["verdict"] = _verdict(test)
    return tests


def _verdict(test: dict) -> str:
    """What the test and the interval support, in words."""
    lo, hi = test["ci"]
    numbers = (
        f"Spearman difference {test['difference']:+.2f}, 95 % interval {lo:+.2f} to {hi:+.2f}; "
        f"Holm-corrected p = {test['p_adjusted']:.2g}"
    )
    if test["p_adjusted"] < 0.05 and test["difference"] > 0:
        return f"beat parameter count ({numbers})"
    if test["p_adjusted"] < 0.05 and test["difference"] < 0:
        return f"lost to parameter count ({numbers})"
    return f"not distinguishable from parameter count ({numbers})"


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
    from loraplace.study.runner import run_study

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
    """Markdown tables: candidates with their gains, then each rule's correlations and regret,
    then each score against parameter count."""
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
        f"Intervals: 95 % percentile bootstrap over {report['resampled']} ({N_BOOT:,} draws). "
        "Regret: the best mean gain minus the recommended candidate's, with its standard error "
        "across training seeds and evaluation examples.",
        "",
        "| rule | recommends | Spearman | 95 % interval | Kendall | 95 % interval | regret (loss) | regret SE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rules"]:
        ci = r.get("spearman_ci") or [None, None]
        kci = r.get("kendall_ci") or [None, None]
        lines.append(
            f"| {r['rule']} | {r['recommends']} | {_f(r.get('spearman'), 2)} | "
            f"{_f(ci[0], 2)} to {_f(ci[1], 2)} | {_f(r.get('kendall'), 2)} | "
            f"{_f(kci[0], 2)} to {_f(kci[1], 2)} | {_f(r['regret'], 4)} | {_f(r['regret_se'], 4)} |"
        )
    lines += [""] + [f"- {score}: {text}" for score, text in report["verdicts"].items()]
    return "\n".join(lines)
