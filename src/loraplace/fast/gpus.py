"""The GPUs a study can use, learnt without initialising CUDA in the asking process.

    count()       # how many GPUs this process sees (NVML where it can: no CUDA initialised)
    facts()       # {"gpus": [{"id": "0", "name": ..., "capability": [9, 0], "total_mb": ...,
                  #  "free_mb": ...}], "flash_attn": {"version": ..., "error": ...}}
    python -m loraplace.fast.gpus      # the same facts, as JSON, from a process of their own

A process that initialises CUDA cannot fork a child that uses it ("Cannot re-initialize CUDA
in forked subprocess"), and holds a context of several hundred MB on a GPU for as long as it
lives. The study's process only plans and schedules runs, so it learns about the GPUs from a
short child process and never initialises CUDA itself; a run, which uses CUDA anyway, asks in
its own process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import lru_cache

PROBE_TIMEOUT_S = 120


def visible_ids() -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES lets this process see, as it names them (indices or
    UUIDs); None where it is not set (every GPU)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def count() -> int:
    """GPUs this process sees. torch asks NVML where it can, which initialises no CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda._is_compiled() else 0


def flash_attn_status() -> dict:
    """{"version": ...} where flash-attn imports against this torch, {"error": ...} where it
    is installed but does not (a wheel built for another torch fails on its compiled part),
    {} where it is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return {}
    try:
        import flash_attn
        from flash_attn import flash_attn_func  # noqa: F401  (loads the compiled kernels)
    except (ImportError, OSError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return {"error": f"{type(err).__name__}: {first}"[:300]}
    return {"version": getattr(flash_attn, "__version__", "unknown")}


def facts_here() -> dict:
    """The GPUs' facts, asked in this process (which initialises CUDA in it)."""
    import torch

    found = []
    ids = visible_ids()
    for i in range(count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        found.append({
            "id": ids[i] if ids and i < len(ids) else str(i),
            "name": props.name,
            "capability": [props.major, props.minor],
            "total_mb": total / 2**20,
            "free_mb": free / 2**20,
        })  # fmt: skip
    return {"gpus": found, "flash_attn": flash_attn_status() if found else {}}


def facts() -> dict:
    """The GPUs' facts now (free memory changes): from a child process where CUDA is not
    initialised here, in this process where it already is; no GPUs, no process."""
    import torch

    if count() == 0:
        return {"gpus": [], "flash_attn": {}}
    if torch.cuda.is_initialized():
        return facts_here()
    proc = subprocess.run(
        [sys.executable, "-m", "loraplace.fast.gpus"],
        capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
    )  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the GPU probe failed with status {proc.returncode}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@lru_cache(maxsize=1)
def facts_at_start() -> dict:
    """`facts()` once per process: what the machine's choices (`hardware.Machine`) rest on."""
    return facts()


if __name__ == "__main__":
    print(json.dumps(facts_here()))
