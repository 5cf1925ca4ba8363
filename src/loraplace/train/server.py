"""The server that forks CPU runs from one process that imported the ML stack once.

    python -m loraplace.train.server FD     # specs on stdin, each run's exit status on FD

The server imports what a run imports and computes nothing; each run is a child it forks, so
every run starts as a fresh process would after its imports and nothing it allocates reaches
the next one. Its client, in the study's process, is `study.worker`. It serves CPU runs only
and sees no GPU (CUDA initialised before a fork fails in every child).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

from loraplace.core.results import die_with_parent, restart_peak_memory

# --- the server ------------------------------------------------------------------------------


def serve(commands, replies) -> None:
    """Run specs one after another, each in a child forked from this process (the study's
    `reuse_process`).

    Each line of `commands` is {"spec": path, "env": environment, "cwd": folder}; its run
    gets that environment and folder, a fresh seed (in `train_run`) and its own peak-memory
    count, and its exit status goes back as one line {"code": status}. This process imports
    Python's ML stack once (seconds per run; docs/measurements/2026-11-29-fast-paths-avx512-bf16.md, `reuse_process`) and never computes anything, so every child
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
