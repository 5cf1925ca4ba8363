"""Faults on purpose, for the fault suite (tests/test_faults.py): one run of a study meets a full
disk, a memory cap, a kill -9 in the middle of a step, or a learning rate that diverges.

    LORAPLACE_FAULTS='{"full seed 42": {"file_size": 65536}}' loraplace study ...

Keys, per run ("STRATEGY seed SEED"):
  file_size     RLIMIT_FSIZE in bytes from the run's start: a write past it fails with EFBIG,
                as on a full disk (SIGXFSZ is ignored so the write fails instead of the process)
  memory_mb     RLIMIT_AS when training starts: the address space the run has then plus this;
                each step then asks for a buffer larger than the cap, as a step of a model too
                big for the machine would (a small model's steps reuse memory the run already
                holds, freed blocks included, so the cap alone may never be reached)
  kill_at_step  the run sends itself SIGKILL in that optimizer step, after the backward pass
  lr            the run's learning rate instead of the study's
Nothing happens unless the variable names the run.
"""

from __future__ import annotations

import json
import os
import resource
import signal

ENV = "LORAPLACE_FAULTS"


def for_run(strategy: str, seed: int) -> dict:
    try:
        return json.loads(os.environ.get(ENV) or "{}").get(f"{strategy} seed {seed}", {})
    except (ValueError, AttributeError):
        return {}


def limit_file_size(faults: dict) -> None:
    if "file_size" in faults:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = int(faults["file_size"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def callback(faults: dict):
    """A TrainerCallback for `memory_mb` and `kill_at_step`, or None."""
    if "memory_mb" not in faults and "kill_at_step" not in faults:
        return None
    from transformers import TrainerCallback

    class Faults(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if "memory_mb" in faults:
                cap = _address_space() + int(faults["memory_mb"] * 2**20)
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        def on_step_begin(self, args, state, control, **kwargs):
            if "memory_mb" in faults:
                import torch

                cap = resource.getrlimit(resource.RLIMIT_AS)[0]
                torch.empty(cap + 2**24, dtype=torch.uint8)  # beyond any reusable block

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == faults.get("kill_at_step"):
                os.kill(os.getpid(), signal.SIGKILL)

    return Faults()
