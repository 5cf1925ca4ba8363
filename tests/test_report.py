"""The report: built from result files only, statistics on the page, opened in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest

from loraplace.analysis.compare import COMPARISON_COLUMNS
from loraplace.cli import main


def test_study_writes_aggregate_comparisons_and_report(tiny_study):
    agg = pd.read_csv(tiny_study / "aggregate.csv")
    assert list(agg["strategy"]) == ["full", "attention", "ffn"]
    assert (agg["n_seeds"] == 2).all()
    for m in ("eval_loss", "perplexity", "train_time_s", "peak_memory_mb"):
        assert {f"{m}_mean", f"{m}_std", f"{m}_ci_low", f"{m}_ci_high"} <= set(agg.columns)
    assert (agg["eval_loss_ci_low"] <= agg["eval_loss_mean"]).all() and (
        agg["eval_loss_mean"] <= agg["eval_loss_ci_high"]
    ).all()
    found = pd.read_csv(tiny_study / "comparisons.csv")
    assert list(found.columns) == list(COMPARISON_COLUMNS)
    # every metric the runs have, the same three pairs each: loss and the task metrics
    assert found.groupby("metric", sort=False).size().to_dict() == {
        "eval_loss": 3,
        "rouge_l": 3,
        "exact_match": 3,
    }
    comparisons = found[found["metric"] == "eval_loss"]
    assert (comparisons["n_examples"] == 6).all()
    assert (comparisons["seeds_a"] == 2).all() and (comparisons["seeds_b"] == 2).all()
    # the test is on the table's quantity: the difference of the strategies' mean eval loss
    means = agg.set_index("strategy")["eval_loss_mean"]
    for row in comparisons.itertuples():
        assert row.mean_diff == pytest.approx(means[row.strategy_a] - means[row.strategy_b])
    md = (tiny_study / "report.md").read_text()
    for section in (
        "## Answer",
        "Lowest mean eval loss",
        "## Setup",
        "frozen products in training",
        "| threads | ",
        "## Results",
        "## Eval loss across training seeds and evaluation examples",
        "Holm",
        "## Variance components: eval loss",
        "## Power plan: eval loss",
        "## Eval loss for these trained adapters, on new evaluation examples",
        "## Greedy generations",
        "untrained model",
        "Pareto",
        "placement.png",
    ):
        assert section in md, section
    html = (tiny_study / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and 'src="curves.png"' not in html
    # the two-level verdict, its variance components and the power plan are on the page
    answer = html.split("<h2>Answer</h2>")[1].split("<h2>")[0]
    assert "across training seeds and evaluation examples" in answer.lower()
    for text in ("<h2>Variance components: eval loss</h2>", "seed x example", "strategy x example",
                 "<h2>Power plan: eval loss</h2>", "seeds per strategy"):  # fmt: skip
        assert text in html, text


def test_report_rebuilds_from_old_and_failed_results(tiny_study, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for name in ("report.md", "report.html", "summary.csv", "aggregate.csv", "comparisons.csv"):
        (out / name).unlink()
    old = out / "runs/attention/seed-1/result.json"  # an earlier version: no per-example losses
    data = json.loads(old.read_text())
    del data["per_example"], data["checksum"]  # nor a checksum (else it reads as edited)
    old.write_text(json.dumps(data))
    failed = out / "runs/ffn/seed-2/result.json"
    failed.write_text(
        json.dumps(
            {
                "status": "failed",
                "strategy": "ffn",
                "seed": 2,
                "error": "MemoryError: out of memory",
            }
        )
    )
    shutil.rmtree(out / "runs/full/seed-2")  # never ran
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Failed runs" in md and "ffn seed 2: MemoryError: out of memory" in md
    assert "Missing runs (no result file yet): full seed 2" in md
    assert "without per-example losses" in md and "attention seed 1" in md
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 5 and list(summary["status"]).count("failed") == 1
    comparisons = pd.read_csv(out / "comparisons.csv")
    comparisons = comparisons[comparisons["metric"] == "eval_loss"]
    # every run with per-example losses counts: attention has seed 2 alone, ffn and full seed 1
    assert comparisons[["strategy_a", "strategy_b", "seeds_a", "seeds_b"]].values.tolist() == [
        ["full", "attention", 1, 1],
        ["full", "ffn", 1, 1],
        ["attention", "ffn", 1, 1],
    ]
    assert comparisons["p_value"].isna().all()  # one seed each: no two-level verdict
    answer = md.split("## Answer")[1].split("##")[0]
    assert "No difference in eval loss can be tested across training seeds" in answer


def test_report_on_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run results" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2


def _browser() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


@pytest.mark.slow
@pytest.mark.skipif(
    _browser() is None, reason="no chromium: `make test` installs Debian's chromium where it can"
)
def test_report_html_in_headless_chromium(tiny_study, tmp_path):
    """The page opens without errors and shows its tables and every figure, decoded."""
    page = (tiny_study / "report.html").resolve()
    probe = tmp_path / "probe.html"
    probe.write_text(
        "<script>window.onerror=()=>{document.title='ERROR'};</script>"
        + page.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
            "document.title='tables='+document.querySelectorAll('table').length+' images='+imgs.length+"
            "' decoded='+imgs.filter(i=>i.complete&&i.naturalWidth>100).length+"
            "' overflow='+(document.documentElement.scrollWidth>document.documentElement.clientWidth);"
            "});</script></body>",
        )
    )
    cmd = [
        _browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=10000",
        "--window-size=1280,1000",
        "--dump-dom",
        probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    title = proc.stdout.split("<title>")[1].split("</title>")[0]
    n_tables = int(title.split("tables=")[1].split()[0])
    assert n_tables >= 5 and "images=4 decoded=4" in title, title
    assert "overflow=false" in title, title  # wide tables scroll inside themselves
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            _browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_large_counts_are_grouped_and_a_missing_depth_sweep_is_named(tiny_study, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out, ignore=shutil.ignore_patterns("*.safetensors"))
    study = json.loads((out / "study.json").read_text())  # what the study said it would run
    study["runs"].append({"strategy": "attn-bottom-third", "seed": 1, "run_dir": "runs/x"})
    (out / "study.json").write_text(json.dumps(study))
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "attn-bottom-third seed 1" in md.split("Missing runs")[1]  # the sweep never ran
    params = pd.read_csv(out / "summary.csv")["trainable_params"].max()
    assert params >= 10_000 and f"{int(params):,}" in (out / "report.html").read_text()


def test_the_setup_says_how_many_threads_each_run_had_and_when_times_do_not_compare():
    from loraplace.analysis.report import _threads

    def run(strategy, threads, at_once=2):
        return {"strategy": strategy, "seed": 42, "threads": threads, "runs_at_once": at_once}

    assert _threads([run("full", 1), run("ffn", 1)]) == "1 thread a run, 2 runs at once"
    mixed = _threads([run("full", 1), run("ffn", 2, 1)])
    assert mixed == (
        "1 thread a run, 2 runs at once: full seed 42; 2 threads a run, one run at a time: "
        "ffn seed 42 (training times compare only between runs that ran alike)"
    )
    shared = [run("full", 1, 3) | {"machine": {"cpus": 2}}, run("ffn", 1, 3)]  # on two cores
    assert _threads(shared).startswith("1 thread a run, 3 runs at once sharing 2 cores: full")
    # five runs three at a time: the last two went two at once, each with a core of its own
    spans = [(0, 100), (0, 101), (0, 102), (100, 160), (101, 162)]
    five = [run(f"s{i}", 1, 3) | {"timing": {"started": a, "finished": b}, "machine": {"cpus": 2}}
            for i, (a, b) in enumerate(spans)]  # fmt: skip
    assert _threads(five) == (
        "1 thread a run, 3 runs at once sharing 2 cores: s0 seed 42, s1 seed 42, s2 seed 42; "
        "1 thread a run, 2 runs at once: s3 seed 42, s4 seed 42 (training times compare only "
        "between runs that ran alike)"
    )
    assert _threads([{"strategy": "full", "seed": 1}]) == "not recorded"
    assert _threads([run("full", 4, None)]) == "4 threads a run"  # a Ray task's


def _edit_results(out, edit) -> None:
    """Apply `edit(result)` to every result under `out` (without a checksum, as an earlier
    version wrote them, so the edit does not read as damage)."""
    for path in sorted(out.glob("runs/*/seed-*/result.json")):
        data = json.loads(path.read_text())
        data.pop("checksum", None)
        edit(data)
        path.write_text(json.dumps(data))


def test_a_task_metric_gets_the_same_two_level_comparison(tiny_study, tmp_path):
    """Runs that store per-example ROUGE-L and exact match (`task` in result.json) get the
    same comparisons, variance components and power plan as eval loss."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out, ignore=shutil.ignore_patterns("*.safetensors"))
    better = {"full": 0.3, "attention": 0.0, "ffn": 0.0}

    def add_task(r):
        n = len(r["per_example"]["loss"])
        rouge = [0.2 + better[r["strategy"]] + 0.01 * ((i * 7 + r["seed"]) % 5) for i in range(n)]
        r["task"] = {"rouge_l": rouge, "exact_match": [float(i % 2) for i in range(n)]}

    _edit_results(out, add_task)
    assert main(["report", str(out), "--smallest-effect", "0.05"]) == 0
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert (
        comparisons["metric"].tolist() == ["eval_loss"] * 3 + ["rouge_l"] * 3 + ["exact_match"] * 3
    )
    rouge = comparisons[comparisons["metric"] == "rouge_l"].set_index(["strategy_a", "strategy_b"])
    assert rouge.loc[("full", "attention"), "verdict"].startswith(
        "full has higher ROUGE-L than attention across training seeds and evaluation examples"
    )
    html = (out / "report.html").read_text()
    for text in (
        "ROUGE-L across training seeds and evaluation examples",
        "Variance components: ROUGE-L",
        "Power plan: exact match",
        "a 5 % difference in eval loss",  # the option reached the plan
        "Highest mean ROUGE-L in these runs: full",
    ):
        assert text in html, text


def test_report_options_and_mixed_evaluation_sets_are_one_sentence(tiny_study, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main(["report", str(out), "--smallest-effect", "2"]) == 2
    err = capsys.readouterr().err
    assert "smallest_effect must be a fraction above 0 and at most 1" in err
    assert len(err.strip().splitlines()) == 1

    def shorter(r):
        if r["strategy"] == "ffn" and r["seed"] == 2:
            r["per_example"] = {k: v[:-1] for k, v in r["per_example"].items()}

    _edit_results(out, shorter)
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "were evaluated on different examples" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
