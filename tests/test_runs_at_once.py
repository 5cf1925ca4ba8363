"""How many runs a study runs at once on a CPU, and how many threads each run gets."""

from __future__ import annotations

from dataclasses import astuple

import pytest

from loraplace.config import StudyConfig
from loraplace.study import local as runner
from loraplace.study.local import cpu_runs_at_once, local_plan
from loraplace.study.prepare import Prepared

GB = 1024


@pytest.mark.parametrize(
    "runs, at_once",
    [(1, 1), (2, 2), (3, 3), (4, 2), (5, 1), (6, 2), (7, 1), (8, 2), (9, 2), (30, 2)],
)
def test_runs_go_at_once_only_where_the_study_ends_sooner(runs, at_once):
    # two cores: pairs; three runs all at once, sharing the cores, rather than two rounds of
    # which the last leaves a core idle; never three then two (the two would each have a core
    # and their training times would not compare), so five and seven go one at a time
    assert cpu_runs_at_once(runs, cores=2, free_mb=20 * GB, run_mb=3 * GB) == at_once


def test_one_at_a_time_without_a_second_core_or_memory_for_two():
    assert cpu_runs_at_once(4, cores=1, free_mb=20 * GB, run_mb=3 * GB) == 1
    assert cpu_runs_at_once(4, cores=2, free_mb=5 * GB, run_mb=3 * GB) == 1
    assert cpu_runs_at_once(4, cores=2, free_mb=None, run_mb=3 * GB) == 1  # memory unknown
    # memory for two but not three: three runs in two rounds of two would end later
    assert cpu_runs_at_once(3, cores=2, free_mb=8 * GB, run_mb=3 * GB) == 1
    assert cpu_runs_at_once(3, cores=2, free_mb=9 * GB, run_mb=3 * GB) == 3


def test_more_runs_than_cores_only_where_each_run_has_one_thread():
    # four cores: pairs of two-thread runs; five runs, two threads each, would not fit the cores
    assert cpu_runs_at_once(3, cores=4, free_mb=20 * GB, run_mb=1) == 1
    assert cpu_runs_at_once(4, cores=4, free_mb=20 * GB, run_mb=1) == 2


def test_the_choice_follows_what_more_threads_gain():
    assert cpu_runs_at_once(4, 2, 20 * GB, 1, gain=2.0) == 1  # threads that scale perfectly
    assert cpu_runs_at_once(3, 2, 20 * GB, 1, gain=2.0) == 1
    assert cpu_runs_at_once(4, 2, 20 * GB, 1, gain=1.2) == 2
    assert cpu_runs_at_once(5, 2, 20 * GB, 1, gain=1.5) == 2  # threads that barely help


def prepared(device: str = "cpu", base_mb: float = 500.0) -> Prepared:
    from loraplace.fast.hardware import Paths

    paths = Paths(device, False, False, False, False, "float32")
    return Prepared([], paths, {}, {}, ((), None), base_mb)


def test_the_plan_on_a_cpu_and_as_set(monkeypatch):
    monkeypatch.setattr(runner, "cpu_cores", lambda: 4)
    monkeypatch.setattr(runner, "available_mb", lambda: 20 * GB)
    cfg = StudyConfig()
    plan = lambda c, runs: astuple(local_plan(c, runs, prepared()))[:2]  # noqa: E731
    assert plan(cfg, 4) == (2, 2)  # unset, on a CPU: two, half the cores each
    assert plan(cfg, 3) == (1, None)  # four cores: two threads a run
    assert plan(StudyConfig(runs_per_device="auto"), 4) == (2, 2)
    assert plan(StudyConfig(threads=1), 4) == (1, None)  # the user's threads
    assert plan(StudyConfig(runs_per_device="1"), 4) == (1, None)
    assert plan(StudyConfig(runs_per_device="3"), 4) == (3, 1)
    monkeypatch.setattr(runner, "available_mb", lambda: 4 * GB)  # 2 x (3 x 500 + 1,024) MB needed
    assert plan(cfg, 4) == (1, None)


def test_the_eta_counts_rounds_of_runs_at_once(tmp_path):
    from types import SimpleNamespace

    from loraplace.study.display import StudyProgress

    lines = []
    todo = [SimpleNamespace(name=n, seed=42, folder=tmp_path / n) for n in "abcde"]
    with StudyProgress(todo, tmp_path, lines.append, at_once=3) as progress:
        for name in ("a", "b", "c"):
            progress.begin(name, 42)
        progress.end("a", 42, 60.0, {"status": "ok"})
        progress.begin("d", 42)  # four runs left, 60 s each, three at a time: two rounds
    assert lines[-1].endswith("ETA 2m00s)")
