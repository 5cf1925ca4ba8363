"""`--executor ray`: a local Ray and a two-node Ray cluster on this machine, the tiny model.

Every cluster here is loopback only. The two-node cluster's head has no CPUs, so runs go to the
two worker nodes, and each worker node keeps its temporary folders in a folder of its own.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import ALPACA_HEAD, REPO

from loraplace.cli import build_parser, main, study_config
from loraplace.config import load_config
from loraplace.core.errors import UserError
from loraplace.core.results import damaged_results, load_results
from loraplace.study.runner import run_study

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(
    ray is None, reason="ray is not installed: pip install 'loraplace[ray]'"
)

SETTINGS = {
    "data": str(ALPACA_HEAD),
    "train_split": "train[:8]",
    "eval_split": "train[100:104]",
    "epochs": 1,
    "strategies": ["full", "attention"],
    "seeds": [1],
}
# one thread a run, on both executors: two would wait on each other on a busy 2-core machine
SETS = [
    "max_length=64",
    "loss_on=all",
    "generations=1",
    "max_new_tokens=4",
    "report_to=[]",
    "threads=1",
]
CLI_ARGS = ["--data", str(ALPACA_HEAD), "--train-split", "train[:8]", "--eval-split", "train[100:104]",
            "--epochs", "1", "--strategy", "full", "--strategy", "attention", "--seed", "1",
            *[a for s in SETS for a in ("--set", s)]]  # fmt: skip


def config(model_dir, *sets: str, **overrides):
    return load_config(None, SETTINGS | {"model": str(model_dir)} | overrides, [*SETS, *sets])


def on(cluster, model_dir):
    """The config of a study that joins `cluster` (and leaves it at the end)."""
    return config(model_dir, executor="ray", ray_address=cluster.address)


def eval_losses(out: Path) -> dict:
    return {(r["strategy"], r["seed"]): r["metrics"]["eval_loss"] for r in load_results(out)}


def files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")}


def run_processes() -> dict[int, tuple[int, str]]:
    """The runs training on Ray nodes now: pid -> (the Ray worker's pid, its spec path)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"loraplace.study.ray" in argv[:3] and len(argv) >= 4:
            parent = int(stat.rpartition(")")[2].split()[1])
            found[int(entry.name)] = (parent, argv[3].decode())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status is left


@pytest.fixture(scope="module")
def local_results(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """The two runs by the local executor, to compare with."""
    out = tmp_path_factory.mktemp("local") / "out"
    run_study(config(tiny_gpt2_dir), out, log=lambda line: None)
    return out


def test_without_ray_the_executor_says_how_to_install(monkeypatch, capsys, tiny_gpt2_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    out = tmp_path / "out"
    code = main(
        ["study", "--model", str(tiny_gpt2_dir), "--out", str(out), *CLI_ARGS, "--executor", "ray"]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "pip install 'loraplace[ray]'" in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "item,message",
    [
        ("gpus_per_run=1.5", "'gpus_per_run' must be a fraction of one GPU or a whole number"),
        ("cpus_per_run=0", "'cpus_per_run' must be positive"),
        ("max_retries=-1", "'max_retries' must be 0 or more"),
        ("executor=slurm", "'executor' must be one of local, ray"),
    ],
)
def test_bad_cluster_settings_one_sentence(tiny_gpt2_dir, item, message):
    with pytest.raises(UserError, match=message):
        config(tiny_gpt2_dir, item)


def test_the_kuberay_example_runs_a_valid_study_on_ray():
    manifest = yaml.safe_load((REPO / "examples/kuberay-rayjob.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["loraplace", "study"]
    args = build_parser().parse_args(argv[1:])
    args.config = str(REPO / "configs" / Path(args.config).name)  # the image's copy of configs/
    assert study_config(args).executor == "ray"
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # runs go to workers
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


@needs_ray
def test_an_unreachable_cluster_is_one_sentence(capsys, tiny_gpt2_dir, tmp_path):
    assert not ray.is_initialized()
    out = tmp_path / "out"
    argv = ["study", "--model", str(tiny_gpt2_dir), "--out", str(out), *CLI_ARGS]
    code = main([*argv, "--executor", "ray", "--ray-address", "127.0.0.1:1"])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot reach the Ray cluster at '127.0.0.1:1'" in err, err
    assert "Traceback" not in err and err.count("\n") == 1


@needs_ray
@pytest.mark.slow
def test_a_local_ray_gives_the_local_executors_results(
    capsys, tiny_gpt2_dir, tmp_path, local_results
):
    """The study starts a Ray of its own on this machine and shuts it down at the end."""
    out = tmp_path / "out"
    argv = [
        "study",
        "--model",
        str(tiny_gpt2_dir),
        "--out",
        str(out),
        *CLI_ARGS,
        "--executor",
        "ray",
    ]
    code = main(argv)
    stdout, _ = capsys.readouterr()
    assert code == 0, stdout
    assert "run 2/2 finished" in stdout and not ray.is_initialized()
    assert eval_losses(out) == eval_losses(local_results)
    assert {p for p in files(out) if p.startswith("runs/")} == {
        p for p in files(local_results) if p.startswith("runs/")
    }
    for result in load_results(out):
        assert result["status"] == "ok" and result["node"]["name"] in stdout

    code = main(argv)  # a second time: nothing to do, nothing rewritten
    stdout, _ = capsys.readouterr()
    assert code == 0 and "2 already done" in stdout and "finished" not in stdout


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head with no CPUs and two worker nodes of one CPU, each with its own temporary folder:
    (the cluster, {node id: its temporary folder}). Each study joins it by its address."""
    if ray is None:
        pytest.skip("ray is not installed: pip install 'loraplace[ray]'")
    root = tmp_path_factory.mktemp("nodes")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    temps = {}
    for i in range(2):
        temp = root / f"node-{i}"
        temp.mkdir()
        node = cluster.add_node(num_cpus=1, env_vars={"TMPDIR": str(temp)})
        temps[node.node_id] = temp
    cluster.wait_for_nodes()
    yield cluster, temps
    cluster.shutdown()


def _watch(stop: threading.Event, seen: dict, act=None) -> threading.Thread:
    """Record the runs' processes in `seen` until `stop`. `act(pid, worker, spec)` is called
    once, for the first run seen training for a second (to kill something mid-run)."""

    def loop():
        first_seen, acted = {}, act is None
        while not stop.is_set():
            now = time.monotonic()
            for pid, (worker, spec) in run_processes().items():
                seen[pid] = (worker, spec)
                first_seen.setdefault(pid, now)
                if not acted and now - first_seen[pid] > 1:
                    act(pid, worker, spec)
                    acted = True
            time.sleep(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _study_watched(cfg, out, act=None) -> tuple[list[str], dict]:
    """Run the study while watching its runs' processes: its log lines and what was seen."""
    lines, seen, stop = [], {}, threading.Event()
    thread = _watch(stop, seen, act)
    try:
        run_study(cfg, out, log=lines.append)
    finally:
        stop.set()
        thread.join()
    return lines, seen


@needs_ray
@pytest.mark.slow
def test_two_nodes_give_the_local_executors_results_through_the_object_store(
    two_nodes, tiny_gpt2_dir, tmp_path, local_results
):
    cluster, temps = two_nodes
    out = tmp_path / "out"
    lines, seen = _study_watched(on(cluster, tiny_gpt2_dir), out)
    assert eval_losses(out) == eval_losses(local_results)
    assert not damaged_results(out)  # each result.json checksummed as written, its node included
    workers = {n.node_id for n in cluster.worker_nodes}
    assert {r["node"]["ray_id"] for r in load_results(out)} == workers  # one run on each node
    # the runs trained in their nodes' own folders, not in OUT, and left nothing there: what OUT
    # holds came back as return values
    specs = [Path(spec) for _, spec in seen.values()]
    assert len(specs) == 2
    assert all(
        any(s.is_relative_to(t) for t in temps.values()) and not s.is_relative_to(out)
        for s in specs
    )
    assert not any(s.exists() for s in specs)
    assert {p for p in files(out) if p.startswith("runs/")} == {
        p for p in files(local_results) if p.startswith("runs/")
    }
    assert sum("finished" in line for line in lines) == 2


@needs_ray
@pytest.mark.slow
def test_the_runs_progress_reaches_out_while_they_train_on_the_nodes(
    two_nodes, tiny_gpt2_dir, tmp_path
):
    """No node shares OUT: each task sends its run's progress.json to the driver's mailbox, and
    the driver writes it into OUT, where the display and `loraplace status` read it."""
    import json

    cluster, _ = two_nodes
    out, seen, stop = tmp_path / "out", {}, threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in out.glob("runs/*/seed-*/progress.json"):
                if not (path.parent / "result.json").is_file():
                    found = json.loads(path.read_text())  # whole: written atomically
                    states = seen.setdefault(path.parent.parent.name, [])
                    if (found["phase"], found["step"]) not in states:
                        states.append((found["phase"], found["step"]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines = []
    try:
        cfg = config(tiny_gpt2_dir, executor="ray", ray_address=cluster.address,
                     train_split="train[:80]")  # fmt: skip
        run_study(cfg, out, log=lines.append)
    finally:
        stop.set()
        watcher.join()
    for name in ("full", "attention"):
        # in OUT before the result, and advancing (the driver writes a run's latest each time
        # it drains the mailbox, so which states it shows depends on the machine's pace)
        assert len(seen[name]) >= 2, seen
        steps = [step for _, step in seen[name] if step is not None]
        assert steps == sorted(steps)
        final = json.loads((out / f"runs/{name}/seed-1/progress.json").read_text())
        assert final["step"] == final["total_steps"] == 20
        node = next(r["node"]["name"] for r in load_results(out) if r["strategy"] == name)
        assert f"  {name} seed 1: loading (on {node})" in lines
        assert any(line.startswith(f"  {name} seed 1: 100% step 20/20,") for line in lines)
    assert sum("finished" in line for line in lines) == 2


@needs_ray
@pytest.mark.slow
def test_a_run_that_fails_for_its_own_reason_is_recorded_not_retried(
    two_nodes, tiny_gpt2_dir, tmp_path
):
    cluster, _ = two_nodes
    out = tmp_path / "out"
    diverging = config(  # lr 1e38: the first update overflows, the loss diverges
        tiny_gpt2_dir, "lr=1e38", executor="ray", ray_address=cluster.address, strategies=["full"]
    )
    lines, seen = _study_watched(diverging, out)
    (result,) = load_results(out)
    assert result["status"] == "failed"
    assert "overflow" in result["error"] or "non-finite" in result["error"]
    assert len(seen) == 1 and "FAILED" in lines[-1]  # one process: it ran once


@needs_ray
@pytest.mark.slow
def test_a_killed_worker_is_retried_and_every_run_is_there_once(
    two_nodes, tiny_gpt2_dir, tmp_path, local_results
):
    out = tmp_path / "out"
    killed = []

    def kill(pid, worker, spec):
        os.kill(worker, signal.SIGKILL)  # the Ray worker running the task; its run dies with it
        killed.append((pid, worker))

    cluster, _ = two_nodes
    lines, seen = _study_watched(on(cluster, tiny_gpt2_dir), out, kill)
    assert len(killed) == 1
    (run_pid, worker), results = killed[0], load_results(out)
    assert len(results) == 2 and all(r["status"] == "ok" for r in results)
    assert eval_losses(out) == eval_losses(local_results)
    assert worker not in {r["parent_process"] for r in results}  # the killed attempt's was lost
    assert len(seen) == 3  # two runs, one of them twice
    assert sum("finished" in line for line in lines) == 2
    assert not [p for p in files(out) if p.endswith(".tmp")]  # nothing half-written
    for _ in range(50):  # the killed run's process went with its worker
        if not alive(run_pid):
            break
        time.sleep(0.1)
    assert not alive(run_pid)


@needs_ray
@pytest.mark.slow
def test_a_dead_node_s_run_is_retried_on_another(two_nodes, tiny_gpt2_dir, tmp_path, local_results):
    """Last of the two-node tests: it takes a node away."""
    cluster, temps = two_nodes
    out = tmp_path / "out"
    dead = []

    def remove(pid, worker, spec):
        node = next(n for n in cluster.worker_nodes if Path(spec).is_relative_to(temps[n.node_id]))
        cluster.remove_node(node, allow_graceful=False)
        dead.append(node.node_id)

    lines, _ = _study_watched(on(cluster, tiny_gpt2_dir), out, remove)
    results = load_results(out)
    assert len(dead) == 1 and len(results) == 2 and all(r["status"] == "ok" for r in results)
    assert dead[0] not in {r["node"]["ray_id"] for r in results}
    assert eval_losses(out) == eval_losses(local_results)
    assert sum("finished" in line for line in lines) == 2


@needs_ray
@pytest.mark.slow
def test_a_relative_data_path_reaches_nodes_that_do_not_share_the_drivers_folder(
    two_nodes, tiny_gpt2_dir, tmp_path, monkeypatch, local_results
):
    import json

    cluster, _ = two_nodes
    project = tmp_path / "project"
    project.mkdir()
    (project / "mydata.json").write_text(json.dumps(json.loads(ALPACA_HEAD.read_text())[:110]))
    monkeypatch.chdir(project)  # the runs train in their nodes' temporary folders, not here
    out = tmp_path / "out"
    cfg = config(tiny_gpt2_dir, executor="ray", ray_address=cluster.address, data="mydata.json")
    lines = []
    run_study(cfg, out, log=lines.append)
    results = load_results(out)
    assert [r["status"] for r in results] == ["ok", "ok"], lines
    assert eval_losses(out) == eval_losses(local_results)  # the same rows, shipped
    assert {r["config"]["data"] for r in results} == {"mydata.json"}  # as the user gave it
    lines = []
    run_study(cfg, out, log=lines.append)  # the same command again: nothing to do
    assert any("2 already done" in line for line in lines)


def test_shipped_data_arrives_whole_or_not_at_all(tmp_path):
    from loraplace.study.ray import RunProcessDied, data_payload, unpack_data

    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00arrow")
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    payload = data_payload(str(folder))
    copy = unpack_data(payload, tmp_path / "node")
    assert copy.name == "saved" and (copy / "train" / "data-00000-of-00001.arrow").read_bytes() == (
        b"\x00arrow"
    )
    assert unpack_data(payload, tmp_path / "node") == copy  # one copy per study on a node
    assert data_payload("embedded") is None and data_payload("tatsu-lab/alpaca") is None
    damaged = payload | {"bytes": payload["bytes"][:-1] + b"!"}
    with pytest.raises(RunProcessDied, match="arrived damaged"):
        unpack_data(damaged, tmp_path / "other")
