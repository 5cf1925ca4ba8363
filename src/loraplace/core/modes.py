"""A module in eval mode for a while, then as it was.

with evaluating(model):
    model(**batch)          # no dropout; the training flag comes back after, errors too
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
