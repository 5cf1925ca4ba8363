"""A study's runs on a Ray cluster: one Ray task a run, results handed back as return values.

    loraplace study --config configs/offline.yaml --executor ray --out runs/offline
    loraplace study ... --executor ray --ray-address 10.0.0.1:6379   # or RAY_ADDRESS=...

Each run is a plain Ray task with the resources `cpus_per_run` and `gpus_per_run` (Ray assigns
the GPU and sets CUDA_VISIBLE_DEVICES). On its node the task trains in a temporary folder laid
out like OUT, in a fresh process (`python -m loraplace.study.ray SPEC`: the run, ended with the
task, on the paths the node resolves), and returns result.json and every file the run made as
bytes through Ray's object store; the driver writes them into OUT atomically, result.json
last, so a run counts as
done (`is_done`) only once all its files are there. No node needs the driver's filesystem. A
task whose process or node died is tried again (`max_retries`); a run that fails for its own
reason (a diverged loss) returns its failed result and is not tried again.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.core.errors import UserError
from loraplace.core.results import run_dir, write_bytes_atomic, write_result
from loraplace.core.timefmt import duration
from loraplace.study.display import StudyProgress
from loraplace.study.local import run_env
from loraplace.study.ray_progress import LOOK_S, Mail, forwarding
from loraplace.study.spec import SPEC, RunSpec
from loraplace.train.progress import FILE as PROGRESS

INSTALL = "pip install 'loraplace[ray]'"
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


def on_this_node(spec: RunSpec) -> RunSpec:
    """The spec as this node runs it. The driver resolved the `auto` paths (device, libraries,
    product dtype) on its own machine, or left them to the nodes; a node that resolves them
    otherwise (a GPU node under a CPU driver, a CPU without bfloat16) runs with its own paths
    and its own measured product libraries. UserError for a setting this node cannot run."""
    from loraplace.study.prepare import measure_products, product_shapes

    here = spec.config.resolve_paths()
    if here == spec.paths:
        return spec
    threads = spec.threads or spec.config.threads
    products = measure_products(spec.config, here, product_shapes(spec.config), threads)
    return spec.with_(paths=here, products=products)


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


def data_payload(data: str) -> dict | None:
    """The study's local data (a file, or a folder such as `datasets`' save_to_disk makes) as
    bytes for the object store, with a checksum; None for `embedded` and hub ids, which every
    node resolves itself. Nodes share no filesystem with the driver, or its working folder."""
    path = Path(data).expanduser()
    if path.is_file():
        content, kind = path.read_bytes(), "file"
    elif path.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(path, arcname=path.name)
        content, kind = buffer.getvalue(), "folder"
    else:
        return None
    return {"name": path.name, "kind": kind, "bytes": content,
            "sha256": hashlib.sha256(content).hexdigest()}  # fmt: skip


def unpack_data(payload: dict, root: Path) -> Path:
    """The driver's data, written on this node as it was there, under `root` in a folder named
    by its checksum (checked first), so the study's runs on a node share one copy (and the
    untrained model's evaluation, which is keyed by the data's path)."""
    if hashlib.sha256(payload["bytes"]).hexdigest() != payload["sha256"]:
        raise RunProcessDied("the study's data arrived damaged on this node (checksum differs)")
    target = root / payload["sha256"][:16] / payload["name"]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if payload["kind"] == "file":
        write_bytes_atomic(target, payload["bytes"])
        return target
    unpacked = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    with tarfile.open(fileobj=io.BytesIO(payload["bytes"])) as tar:
        tar.extractall(unpacked, filter="data")
    try:
        os.replace(unpacked / payload["name"], target)  # another run's copy may be there first
    except OSError:
        pass
    shutil.rmtree(unpacked, ignore_errors=True)
    return target


def gpu_share_note(gpus: float, need) -> str | None:
    """What a run's fraction of a GPU must hold, from the plan's estimate (`plan.memory`); None
    for whole GPUs. Ray shares a GPU by count, not by memory: runs that need more than their
    share of it run out of memory."""
    if not 0 < gpus < 1 or need is None:
        return None
    return (
        f"each run takes {gpus:g} of a GPU and needs {need.describe()}: "
        f"{round(1 / gpus)} at once fit on a GPU of {need.total_mb / gpus:,.0f} MB or more"
    )


def train_on_node(
    spec: RunSpec, study: str, threads: int, data: dict | None = None, box=None,
    display_env: dict | None = None,
) -> dict:  # fmt: skip
    """(A Ray task, on a node) Train one run in a temporary folder laid out like OUT; its
    progress.json goes to the driver through the mailbox `box` as it changes.

    `data`: the study's local data, shipped through the object store (`data_payload`).
    Returns its result (with the node it ran on), every file it made by its path relative to
    OUT, its folders, the temporary folder it used (deleted by then) and its wall time.
    Raises `RunProcessDied` where the run's process ended without a result (Ray retries).
    """
    started = time.perf_counter()
    cfg, name, seed = spec.config, spec.name, spec.seed
    node = _node()
    # the untrained model's evaluation, cached per node and study (train.base_evaluation checks
    # its key, so a stale file is recomputed, never used)
    cache = Path(tempfile.gettempdir()) / "loraplace-base-eval" / f"{study}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplace-run-") as tmp:
        root = Path(tmp)
        folder = run_dir(root, name, seed)
        folder.mkdir(parents=True)
        local = spec.with_(run_dir=str(folder), base_eval=str(cache), threads=threads)
        if data is not None:  # read from this node's copy; the result keeps the study's name
            copy = unpack_data(data, cache.parent.parent / "loraplace-data" / study)
            local = local.with_(config=replace(cfg, data=str(copy)))
        local.write()
        env = run_env(cfg, root, f"{name}-seed-{seed}")
        env["WANDB_RUN_GROUP"] = os.environ.get("WANDB_RUN_GROUP", study)
        env["OMP_NUM_THREADS"] = str(threads)  # the run sets torch's threads from the spec
        env |= display_env or {}  # the study's display: no Trainer bars, output to run.log
        import ray

        if not ray.get_gpu_ids():  # a run given no GPU sees none
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "loraplace.study.ray", str(folder / SPEC)]
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


def _reason(err: Exception, retries: int) -> str:
    """Why a task gave no result: its process or node died every time, or the task itself broke."""
    cause = getattr(err, "cause", None) or err  # a task's own exception inside RayTaskError
    first = (str(cause).strip().splitlines() or [""])[0]
    if cause is not err and not isinstance(cause, RunProcessDied):
        return f"the run's task failed on its node: {type(cause).__name__}: {first}"
    return f"lost after {retries} retries: {type(cause).__name__}: {first}"


def store(out: Path, spec: RunSpec, payload: dict) -> dict:
    """Write a run's files into OUT atomically, its result.json last; the result."""
    for rel in payload["folders"]:
        (Path(out) / rel).mkdir(parents=True, exist_ok=True)
    for rel, data in payload["files"].items():
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    result = {k: v for k, v in payload["result"].items() if k != "checksum"}
    result["config"] = spec.config.to_dict()  # the study's, not the node's copy of its data
    write_result(spec.folder / "result.json", result)  # checksummed with its node
    return result


def study_id(out: Path) -> str:
    """The study's name, and a short hash that keeps two studies of that name apart."""
    resolved = Path(out).resolve()
    return f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"


def run_on_ray(
    todo: list[RunSpec], cfg: StudyConfig, out: Path, log=print, gpu_run=None
) -> list[dict]:
    """Run the specs in `todo` as Ray tasks, all at once as far as the cluster has room; their
    results, in the order they finished, each also written to its run folder under OUT.
    `gpu_run`: a GPU run's estimated memory (`plan.memory.RunMemory`), for fractional GPUs."""
    ray = require_ray()
    started_here = connect(ray, cfg)
    try:  # the display reads the progress files the mailbox brings into OUT
        with StudyProgress(todo, out, log, None, "ray") as progress, Mail(ray, todo) as mail:
            return _run(ray, todo, cfg, Path(out), progress, mail, gpu_run)
    finally:
        if started_here:
            ray.shutdown()


def _run(
    ray, todo: list[RunSpec], cfg: StudyConfig, out: Path, log, mail, gpu_run=None
) -> list[dict]:
    cpus, gpus = run_resources(ray, cfg)
    threads = cfg.threads or max(1, math.floor(cpus))
    alive = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    log(
        f"ray: {_n(len(todo), 'run')} on {_n(len(alive), 'node')} ({_n(total.get('CPU', 0), 'CPU')}, "
        f"{_n(total.get('GPU', 0), 'GPU')}); each run {_n(cpus, 'CPU')}, {_n(gpus, 'GPU')}, "
        f"up to {_n(cfg.max_retries, 'retry', 'retries')}"
    )
    share = gpu_share_note(gpus, gpu_run)
    if share:
        log(f"ray: {share}")
    task = ray.remote(train_on_node)
    study = study_id(out)
    payload = data_payload(cfg.data)
    data = ray.put(payload) if payload else None  # once for every task, by reference
    pending = {}
    for spec in todo:  # as the local executor leaves it: the spec, no result until it is back
        spec.folder.mkdir(parents=True, exist_ok=True)
        (spec.folder / "result.json").unlink(missing_ok=True)
        spec.write()
        ref = task.options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_retries=cfg.max_retries,
            retry_exceptions=[RunProcessDied],
            name=f"loraplace:{spec.name}-seed-{spec.seed}",
        ).remote(spec, study, threads, data, mail.box, log.run_env)
        pending[ref] = spec
    started, results = time.perf_counter(), []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=LOOK_S)
        mail.drain()  # the runs' progress into OUT while they train
        if not ready:
            continue
        spec = pending.pop(ready[0])
        name, seed = spec.name, spec.seed
        mail.finish((name, seed))
        try:
            payload = ray.get(ready[0])
            result = store(out, spec, payload)
            where = f" on {result['node']['name']} ({result['node']['ip']})"
            took, wall_s = f"{duration(payload['wall_s'])}, ", payload["wall_s"]
        except ray.exceptions.RayError as err:
            result = spec.failed(_reason(err, cfg.max_retries))
            write_result(spec.folder / "result.json", result)
            where, took, wall_s = "", "", None
        results.append(result)
        log.finished(name, seed, wall_s, result)  # its last progress lines; its row goes
        elapsed = time.perf_counter() - started
        eta = f", ETA {duration(elapsed / len(results) * len(pending))}" if pending else ""
        status = "ok" if result.get("status") == "ok" else f"FAILED: {result.get('error')}"
        log(
            f"run {len(results)}/{len(todo)} finished: {name} seed {seed}{where}: {status} "
            f"({took}elapsed {duration(elapsed)}{eta})"
        )
    return results


def run_here(spec_path: Path) -> int:
    """A run on a node: its spec completed with this node's paths (`on_this_node`), then the
    run; a setting this node cannot run is the run's failed result, not a retry."""
    from loraplace.train.run import run_spec_file

    spec = RunSpec.read(spec_path)
    try:
        local = on_this_node(spec)
    except UserError as err:
        write_result(spec.folder / "result.json", spec.failed(f"on this node: {err}"))
        return 1
    if local is not spec:
        local.write(spec_path)
    return run_spec_file(spec_path)


if __name__ == "__main__":  # a run on a node, ended with its task
    from loraplace.core.quiet import quiet_libraries
    from loraplace.core.results import die_with_parent

    die_with_parent()
    quiet_libraries()
    try:
        sys.exit(run_here(Path(sys.argv[1])))
    except KeyboardInterrupt:
        sys.exit(130)
