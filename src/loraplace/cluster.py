"""A study's runs on a Ray cluster: one Ray task a run, results handed back as return values.

    loraplace study --config configs/offline.yaml --executor ray --out runs/offline
    loraplace study ... --executor ray --ray-address 10.0.0.1:6379   # or RAY_ADDRESS=...

Each run is a plain Ray task with the resources `cpus_per_run` and `gpus_per_run` (Ray assigns
the GPU and sets CUDA_VISIBLE_DEVICES). On its node the task trains in a temporary folder laid
out like OUT, in a fresh process (`python -m loraplace.cluster SPEC`: train.py's run, ended
with the task, on the paths the node resolves), and returns result.json and every file the run made as bytes through Ray's
object store; the driver writes them into OUT atomically, result.json last, so a run counts as
done (`is_done`) only once all its files are there. No node needs the driver's filesystem. A
task whose process or node died is tried again (`max_retries`); a run that fails for its own
reason (a diverged loss) returns its failed result and is not tried again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import run_dir, write_bytes_atomic, write_json, write_result
from loraplace.ray_progress import LOOK_S, Mail, forwarding
from loraplace.study_display import StudyProgress
from loraplace.train.progress import FILE as PROGRESS

INSTALL = "pip install 'loraplace[ray]'"
SPEC = "spec.json"
BASE_EVAL = "base_eval.json"


class RunProcessDied(Exception):
    """A run's process ended without writing its result (killed, out of memory): retried."""


def require_ray():
    """The `ray` module, or the one sentence that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in one sentence, not after a minute of Ray's retries, where HOST:PORT does not answer."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://..." and other forms: Ray's own checks
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(
            f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}); "
            "start one with `ray start --head` or check --ray-address"
        ) from None


def connect(ray, cfg: StudyConfig) -> bool:
    """Join the cluster at `ray_address` (else $RAY_ADDRESS), or start a local Ray for this study.
    True if this call connected (and the caller should disconnect)."""
    if ray.is_initialized():  # the caller's own Ray session (tests, notebooks)
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _reachable(address)
    try:  # "local": a Ray of its own, not whichever cluster `ray start` left on this machine
        ray.init(address=address or "local", include_dashboard=False)
    except ConnectionError as err:
        raise UserError(f"cannot connect to the Ray cluster at {address!r} ({err})") from None
    return True


def run_resources(ray, cfg: StudyConfig) -> tuple[float, float]:
    """(CPUs, GPUs) for one run; refused in one sentence if no node of the cluster has them."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = cfg.gpus_per_run
    if gpus is None:  # a GPU a run where the cluster has GPUs
        gpus = 1.0 if any(n.get("GPU", 0) > 0 for n in nodes) else 0.0
    cpus = cfg.cpus_per_run
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise UserError(
            f"no node of the Ray cluster offers what one run asks for ({cpus:g} CPUs, "
            f"{gpus:g} GPUs; set cpus_per_run and gpus_per_run); its largest has "
            f"{largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs"
        )
    return cpus, gpus


def paths_here(spec: dict) -> dict:
    """The spec as this node runs it. The driver resolved the `auto` paths (device, libraries,
    product dtype) on its own machine; a node that resolves them otherwise (a GPU node under a
    CPU driver, a CPU without bfloat16) drops them and the run resolves its own (train.py)."""
    if "paths" not in spec:
        return spec
    cfg = StudyConfig(**spec["config"])
    try:
        here = cfg.resolve_paths().to_dict()
    except UserError:
        return spec  # a path this node cannot take: the run records why
    if here == spec["paths"]:
        return spec
    return {k: v for k, v in spec.items() if k not in ("paths", "products")}


def _node() -> dict:
    import ray

    return {
        "name": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "ray_id": ray.get_runtime_context().get_node_id(),
    }


def _files(root: Path) -> tuple[dict[str, bytes], list[str]]:
    """Every file under `root` by its path relative to it (the spec excepted), and every folder."""
    files, folders = {}, []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            folders.append(rel)
        elif path.name != SPEC:
            files[rel] = path.read_bytes()
    return files, folders


def train_on_node(
    spec: dict, study: str, threads: int, box=None, run_env: dict | None = None
) -> dict:
    """(A Ray task, on a node) Train one run in a temporary folder laid out like OUT; its
    progress.json goes to the driver through the mailbox `box` as it changes.

    Returns its result (with the node it ran on), every file it made by its path relative to
    OUT, its folders, the temporary folder it used (deleted by then) and its wall time.
    Raises `RunProcessDied` where the run's process ended without a result (Ray retries).
    """
    from loraplace.runner import _env

    started = time.perf_counter()
    cfg = StudyConfig(**spec["config"])
    name, seed = spec["strategy"]["name"], spec["seed"]
    node = _node()
    # the untrained model's evaluation, cached per node and study (train.base_evaluation checks
    # its key, so a stale file is recomputed, never used)
    cache = Path(tempfile.gettempdir()) / "loraplace-base-eval" / f"{study}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplace-run-") as tmp:
        root = Path(tmp)
        folder = run_dir(root, name, seed)
        folder.mkdir(parents=True)
        local = spec | {"run_dir": str(folder), "base_eval": str(cache)}
        write_json(folder / SPEC, local)
        env = _env(cfg, root, f"{name}-seed-{seed}")
        env["WANDB_RUN_GROUP"] = os.environ.get("WANDB_RUN_GROUP", study)
        env["OMP_NUM_THREADS"] = str(threads)  # train.py sets torch's threads where `threads` is
        env |= run_env or {}  # the study's display: no Trainer bars, output to run.log
        import ray

        if not ray.get_gpu_ids():  # a run given no GPU sees none
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "loraplace.cluster", str(folder / SPEC)]
        with forwarding(box, (name, seed), folder / PROGRESS):
            code = subprocess.run(cmd, env=env, cwd=tmp).returncode
        result_path = folder / "result.json"
        if not result_path.is_file():
            raise RunProcessDied(
                f"the run's process on {node['name']} ended with status {code} before its result"
            )
        result = json.loads(result_path.read_text()) | {"node": node}
        result_path.unlink()
        files, folders = _files(root)
        if cache.is_file():
            files[BASE_EVAL] = cache.read_bytes()
    return {
        "result": result,
        "files": files,
        "folders": folders,
        "worker_dir": tmp,
        "wall_s": time.perf_counter() - started,
    }


def _n(count: float, word: str, plural: str = "") -> str:
    return f"{count:g} {word if count == 1 else plural or word + 's'}"


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _lost(spec: dict, error: str) -> dict:
    return {
        "status": "failed",
        "strategy": spec["strategy"]["name"],
        "seed": spec["seed"],
        "config": spec["config"],
        "strategy_spec": spec["strategy"],
        "error": error,
    }


def _reason(err: Exception, retries: int) -> str:
    """Why a task gave no result: its process or node died every time, or the task itself broke."""
    cause = getattr(err, "cause", None) or err  # a task's own exception inside RayTaskError
    first = (str(cause).strip().splitlines() or [""])[0]
    if cause is not err and not isinstance(cause, RunProcessDied):
        return f"the run's task failed on its node: {type(cause).__name__}: {first}"
    return f"lost after {retries} retries: {type(cause).__name__}: {first}"


def store(out: Path, spec: dict, payload: dict) -> dict:
    """Write a run's files into OUT atomically, its result.json last; the result."""
    for rel in payload["folders"]:
        (Path(out) / rel).mkdir(parents=True, exist_ok=True)
    for rel, data in payload["files"].items():
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    result = {k: v for k, v in payload["result"].items() if k != "checksum"}
    write_result(Path(spec["run_dir"]) / "result.json", result)  # checksummed with its node
    return result


def study_id(out: Path) -> str:
    """The study's name, and a short hash that keeps two studies of that name apart."""
    resolved = Path(out).resolve()
    return f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"


def run_on_ray(todo: list[dict], cfg: StudyConfig, out: Path, log=print) -> list[dict]:
    """Run the specs in `todo` as Ray tasks, all at once as far as the cluster has room; their
    results, in the order they finished, each also written to its run folder under OUT."""
    ray = require_ray()
    started_here = connect(ray, cfg)
    try:  # the display reads the progress files the mailbox brings into OUT
        with StudyProgress(todo, out, log, None, "ray") as progress, Mail(ray, todo) as mail:
            return _run(ray, todo, cfg, Path(out), progress, mail)
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, todo: list[dict], cfg: StudyConfig, out: Path, log, mail) -> list[dict]:
    cpus, gpus = run_resources(ray, cfg)
    threads = cfg.threads or max(1, math.floor(cpus))
    alive = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    log(
        f"ray: {_n(len(todo), 'run')} on {_n(len(alive), 'node')} ({_n(total.get('CPU', 0), 'CPU')}, "
        f"{_n(total.get('GPU', 0), 'GPU')}); each run {_n(cpus, 'CPU')}, {_n(gpus, 'GPU')}, "
        f"up to {_n(cfg.max_retries, 'retry', 'retries')}"
    )
    task = ray.remote(train_on_node)
    study = study_id(out)
    pending = {}
    for spec in todo:  # as the local executor leaves it: the spec, no result until it is back
        folder = Path(spec["run_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").unlink(missing_ok=True)
        write_json(folder / "spec.json", spec)
        ref = task.options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_retries=cfg.max_retries,
            retry_exceptions=[RunProcessDied],
            name=f"loraplace:{spec['strategy']['name']}-seed-{spec['seed']}",
        ).remote(spec, study, threads, mail.box, log.run_env)
        pending[ref] = spec
    started, results = time.perf_counter(), []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=LOOK_S)
        mail.drain()  # the runs' progress into OUT while they train
        if not ready:
            continue
        spec = pending.pop(ready[0])
        name, seed = spec["strategy"]["name"], spec["seed"]
        mail.finish((name, seed))
        try:
            payload = ray.get(ready[0])
            result = store(out, spec, payload)
            where = f" on {result['node']['name']} ({result['node']['ip']})"
            took, wall_s = f"{_fmt(payload['wall_s'])}, ", payload["wall_s"]
        except ray.exceptions.RayError as err:
            result = _lost(spec, _reason(err, cfg.max_retries))
            write_result(Path(spec["run_dir"]) / "result.json", result)
            where, took, wall_s = "", "", None
        results.append(result)
        log.finished(name, seed, wall_s, result)  # its last progress lines; its row goes
        elapsed = time.perf_counter() - started
        eta = f", ETA {_fmt(elapsed / len(results) * len(pending))}" if pending else ""
        status = "ok" if result.get("status") == "ok" else f"FAILED: {result.get('error')}"
        log(
            f"run {len(results)}/{len(todo)} finished: {name} seed {seed}{where}: {status} "
            f"({took}elapsed {_fmt(elapsed)}{eta})"
        )
    return results


if __name__ == "__main__":  # a run on a node: train.py's run, ended with its task
    from loraplace.core.results import die_with_parent

    die_with_parent()
    from loraplace.train.run import _quiet, run_spec_file

    _quiet()
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    if (local := paths_here(spec)) is not spec:
        write_json(spec_path, local)
    try:
        sys.exit(run_spec_file(spec_path))
    except KeyboardInterrupt:
        sys.exit(130)
