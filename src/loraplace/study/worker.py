"""The study's side of the fork server (`train.server`): CPU runs forked from a process that
imported the ML stack once (`reuse_process`).

    code = run_spec(spec_path, env, reuse_process=True, device="cpu")

A study running N runs at once keeps N servers, each giving one run at a time; a server that
dies is started again. A GPU run, or a run where a process cannot restart its peak-memory
count, is a fresh process of its own (`python -m loraplace.train.run SPEC`).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from loraplace.core.results import peak_memory_restartable

# The server serves CPU runs only, and sees no GPU: CUDA initialised in a process that then
# forks (bitsandbytes queries the GPU when PEFT imports it) fails in every child ("Cannot
# re-initialize CUDA in forked subprocess"). A GPU run starts in a fresh process instead.
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": ""}


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
