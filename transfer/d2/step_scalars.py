"""Training statistics logged without making the host wait for the GPU.

detectron2 logs every loss and head statistic with ``.item()`` where it is computed: about 15
read-backs per Mask R-CNN step, each of which waits for the GPU to finish all queued work. Our
heads and trainer ``put`` such values here as tensors instead; the trainer reads everything a
step put back at once, after the optimizer's update is queued (transfer/d2/trainer.py).
Outside ``collect`` (a head used on its own), ``put`` logs at once, as detectron2 does.
"""
from __future__ import annotations

from contextlib import contextmanager

from transfer import d2compat  # noqa: F401  (before any detectron2 import)

import torch
from detectron2.utils.events import get_event_storage

_pending: dict[str, torch.Tensor] | None = None


@contextmanager
def collect():
    """Collect what ``put`` is given until the block ends: a name -> scalar tensor dict."""
    global _pending
    _pending = {}
    try:
        yield _pending
    finally:
        _pending = None


def put(**scalars: torch.Tensor) -> None:
    if _pending is None:
        get_event_storage().put_scalars(**read_back(scalars))
    else:
        _pending.update(scalars)


def read_back(scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """The values as floats, with one copy to the host."""
    if not scalars:
        return {}
    values = torch.stack([value.detach().float().reshape(()) for value in scalars.values()]).tolist()
    return dict(zip(scalars, values))
