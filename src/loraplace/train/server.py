"""Runs forked from one server process that imported the ML stack once (`reuse_process`).

    code = run_spec(spec_path, env, reuse_process=True)   # the study's side: the client
    python -m loraplace.train.server FD                   # the server: specs on stdin, replies on FD

The server imports what a run imports and computes nothing; each run is a child it forks, so
every run starts as a fresh process would after its imports and nothing it allocates reaches
the next one. Where peak memory cannot be restarted per process, each run is its own process.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from loraplace.core.results import die_with_parent, peak_memory_restartable, restart_peak_memory

# --- the client: in the study's process -----------------------------------------------------


class Worker:
    """A `python -m loraplace.train.server` process: spec paths in on stdin, statuses back;
    each run in a child it forks."""

    def __init__(self) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplace.train.server", str(write)],
            stdin=subprocess.PIPE,
            text=True,
            pass_fds=(write,),
            env=os.environ | HIDE_GPUS,
        )
        os.close(write)
        self.replies = os.fdopen(read)
        self.jobs = 0

    def run(self, spec_path: Path, env: dict) -> int | None:
        """The run's exit status; None if the worker died (it is not used again)."""
        try:
            job = {"spec": str(spec_path), "env": env, "cwd": os.getcwd()}
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            self.jobs += 1
        except OSError:
            return None
        line = self.replies.readline()
        return json.loads(line)["code"] if line else None

    def close(self, timeout: float | None = None) -> int:
        """End its input (it exits after the run in hand); kill it if `timeout` passes first,
        or at once if it was never given a run."""
        timeout = timeout if self.jobs else 0
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.replies.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# Every live server, and those waiting for a run: a study running N runs at once keeps N.
_workers: list[Worker] = []
_idle: list[Worker] = []
_lock = threading.RLock()


def close_worker(timeout: float | None = 30) -> None:
    """Close every server, idle or running a run."""
    with _lock:
        workers = list(_workers)
        _workers.clear()
        _idle.clear()
    for worker in workers:
        worker.close(timeout)


atexit.register(close_worker)


# The server serves CPU runs only, and sees no GPU: CUDA initialised in a process that then
# forks (bitsandbytes queries the GPU when PEFT imports it) fails in every child ("Cannot
# re-initialize CUDA in forked subprocess"). A GPU run starts in a fresh process instead.
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": ""}


def uses_worker(reuse_process: bool, device: str = "cpu") -> bool:
    """Whether runs on `device` are forked from a server: CPU runs, where a process can
    restart its peak-memory count (else every run is its own process, and its own peak)."""
    return reuse_process and device == "cpu" and peak_memory_restartable()


def start_worker(count: int = 1) -> Worker:
    """A live idle server, and `count` of them waiting in all, started now where missing (the
    study starts them early, so that their imports overlap its checks or the first runs)."""
    with _lock:
        for worker in [w for w in _idle if w.proc.poll() is not None]:
            _idle.remove(worker)
            _workers.remove(worker)
            worker.close(0)
        while len(_idle) < count:
            _idle.append(Worker())
            _workers.append(_idle[-1])
        return _idle[-1]


def _take() -> Worker:
    with _lock:
        worker = start_worker()
        _idle.remove(worker)
        return worker


def run_spec(spec_path: Path, env: dict, reuse_process: bool, device: str = "cpu") -> int:
    """Run one spec outside this process; its exit status (a dead worker's own status).
    Runs may be given from several threads at once: each gets a server of its own."""
    if not uses_worker(reuse_process, device):
        cmd = [sys.executable, "-m", "loraplace.train.run", str(spec_path)]
        return subprocess.run(cmd, env=env).returncode
    worker = _take()
    code = worker.run(spec_path, env)
    with _lock:
        if code is not None:
            if worker in _workers:  # not closed meanwhile
                _idle.append(worker)
            return code
        if worker in _workers:
            _workers.remove(worker)
    return worker.close()


# --- the server ------------------------------------------------------------------------------


def serve(commands, replies) -> None:
    """Run specs one after another, each in a child forked from this process (the study's
    `reuse_process`).

    Each line of `commands` is {"spec": path, "env": environment, "cwd": folder}; its run
    gets that environment and folder, a fresh seed (in `train_run`) and its own peak-memory
    count, and its exit status goes back as one line {"code": status}. This process imports
    Python's ML stack once (seconds per run; docs/performance.md) and never computes anything, so every child
    starts as a fresh process would after its imports: nothing a run allocates or leaves
    behind reaches the next one, and OpenMP's threads are first started in the child. A run's
    peak memory adds what only this process holds while the run is alive (`peak_memory_mb`).
    """
    from loraplace.fast.kernels import limit_onednn_caches
    from loraplace.train import run

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the study stops the run, not this
    _preload()
    if cuda_initialized():
        raise RuntimeError("the fork server initialised CUDA while importing; it cannot fork runs")
    gc.freeze()  # what the imports made stays untouched by the children's collections
    for line in commands:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the run
            code, run.SERVER = 1, os.getppid()
            try:
                die_with_parent()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.environ.clear()
                os.environ.update(job["env"])
                limit_onednn_caches()  # the study's environment may not have them
                os.chdir(job["cwd"])
                restart_peak_memory()
                code = run.run_spec_file(Path(job["spec"]))
                _finish_loggers()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _preload() -> None:
    """Import what a run imports, without running any of it."""
    import peft  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import loraplace.fast.headloss  # noqa: F401
    import loraplace.fast.kernels  # noqa: F401
    import loraplace.fast.segments  # noqa: F401
    import loraplace.plan.adapters  # noqa: F401
    import loraplace.plan.models  # noqa: F401
    import loraplace.plan.planning  # noqa: F401
    import loraplace.train.load  # noqa: F401


def cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


def _finish_loggers() -> None:
    """A forked run ends without exit handlers: close an open W&B run by hand."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


if __name__ == "__main__":
    from loraplace.core.quiet import quiet_libraries

    quiet_libraries()
    with os.fdopen(int(sys.argv[1]), "w") as reply_pipe:
        serve(sys.stdin, reply_pipe)
    sys.exit(0)
