"""A CUDA build of torch, faked on a CPU build, for tests in a child process (PYTHONPATH).

torch.cuda says it has GPUs as CUDA does (8, or those CUDA_VISIBLE_DEVICES names; none where it
is empty), and records whether anything asked what only an initialised CUDA can tell (device
capabilities and properties, torch's lazy initialisation): `torch.cuda.is_initialized()`.
"""

import os

import torch

_state = {"initialized": False}


def _visible() -> int:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return 8 if value is None else len([v for v in value.split(",") if v.strip()])


def _initialise(*args, **kwargs):
    _state["initialized"] = True


class _Properties:
    major, minor, name, total_memory = 9, 0, "FAKE H100", 80 * 2**30


def _capability(*args, **kwargs):
    _initialise()
    return (9, 0)


def _properties(*args, **kwargs):
    _initialise()
    return _Properties()


torch.cuda.is_available = lambda: _visible() > 0
torch.cuda.device_count = _visible
torch.cuda.is_initialized = lambda: _state["initialized"]
torch.cuda._lazy_init = _initialise
torch.cuda.get_device_capability = _capability
torch.cuda.get_device_properties = _properties
