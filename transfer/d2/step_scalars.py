"""Training statistics logged without making the host wait for the GPU.

detectron2 logs every loss and head statistic with ``.item()`` where it is computed: a read-back
per value, each of which waits for the GPU to finish all queued work. Our
heads and trainer ``put`` such values here as tensors instead; the trainer reads everything a
step put back at once, after the optimizer's update is queued (transfer/d2/trainer.py).
Outside ``collect`` (a head used on its own), ``put`` logs at once, as detectron2 does.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from detectron2.utils.events import get_event_storage

# The dict of the innermost ``collect`` block running in this thread, None outside one.
_collecting: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("step_scalars", default=None)


@contextmanager
def collect():
    """Collect what ``put`` is given until the block ends: a name -> scalar tensor dict."""
    scalars: dict[str, torch.Tensor] = {}
    token = _collecting.set(scalars)
    try:
        yield scalars
    finally:
        _collecting.reset(token)


def put(**scalars: torch.Tensor) -> None:
    collecting = _collecting.get()
    if collecting is None:
        get_event_storage().put_scalars(**read_back(scalars))
    else:
        collecting.update(scalars)


def read_back(scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """The values as floats, with one copy to the host."""
    if not scalars:
        return {}
    values = torch.stack([value.detach().float().reshape(()) for value in scalars.values()]).tolist()
    return dict(zip(scalars, values))
