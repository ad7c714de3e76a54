"""Training batches loaded in a background thread and copied to the GPU without making the host wait.

detectron2's trainer takes the next batch at the start of each step, from the host thread that
queues the GPU's work: while the data loader hands the batch over, nothing new is queued. The
model then copies each image and each annotation field to the GPU
(``GeneralizedRCNN.preprocess_image``, ``Instances.to``) from pageable memory without
``non_blocking``: PyTorch synchronizes the stream after each such copy, several times per image,
so the step cannot start before the previous one has finished on the GPU.

``Prefetcher`` draws the loader's batches in a thread, ``depth`` ahead (the thread runs while the
training thread waits for the GPU: PyTorch releases the GIL there), and on a GPU pins them and
copies them with ``non_blocking=True``. The model's own ``.to(device)`` calls then find everything
in place and do nothing. Polygon masks stay on the host, as detectron2 keeps them.

Prefetching changes no result: a loader with worker processes draws its augmentations from their own
random state. A loader without workers (``DATALOADER.NUM_WORKERS 0``) maps its data in the training
process, with the global random state that the training thread uses too: use ``depth`` 0 there
(no thread, batches drawn when asked for).
"""
from __future__ import annotations

import queue
import threading
import weakref

import torch
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints

_END = object()


def to_device(value, device: torch.device):
    """``value`` (a batch: lists and dicts of tensors and detectron2 structures) with its tensors on
    ``device``; from pinned memory and without waiting, when that is a GPU."""
    if isinstance(value, torch.Tensor):
        if device.type == "cuda" and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if isinstance(value, (Boxes, Keypoints, BitMasks)):  # their .to() has no non_blocking
        return type(value)(to_device(value.tensor, device))
    if isinstance(value, Instances):
        return Instances(value.image_size, **{k: to_device(v, device) for k, v in value.get_fields().items()})
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value  # strings, numbers, PolygonMasks (read on the host)


class Prefetcher:
    """Iterates ``loader`` in a thread, at most ``depth`` batches ahead, and yields its batches on ``device``.

    An exception in the loader is raised by the iteration; an iteration that is closed (or dropped)
    early stops its thread, and ``close()`` closes every iteration still open.
    """

    def __init__(self, loader, device, depth: int = 2):
        self.loader, self.device, self.depth = loader, torch.device(device), depth
        self.iterations = weakref.WeakSet()

    def __iter__(self):
        if self.depth == 0:
            batches = (to_device(batch, self.device) for batch in self.loader)
        else:
            # The loader's iterator is made here, as without prefetching: making one draws from the
            # global torch RNG (its base seed), which must not race with the training thread's draws.
            batches = self._prefetch(iter(self.loader))
        self.iterations.add(batches)
        return batches

    def close(self) -> None:
        """Stop drawing batches: every iteration still open ends (and its thread with it)."""
        for batches in list(self.iterations):
            batches.close()

    def _prefetch(self, loader_batches):
        device = self.device
        if device.type == "cuda" and device.index is None:
            # The current device is per thread: the thread must be told this one's (DDP sets it).
            device = torch.device("cuda", torch.cuda.current_device())
        batches = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._load, args=(loader_batches, device, batches, stop), name="prefetch",
                                  daemon=True)
        thread.start()
        try:
            while (batch := batches.get()) is not _END:
                if isinstance(batch, BaseException):
                    raise batch
                yield batch
        finally:
            stop.set()
            thread.join()

    @staticmethod
    def _load(loader_batches, device: torch.device, batches: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for batch in loader_batches:
                if not put(to_device(batch, device)):
                    return
            put(_END)
        except BaseException as error:  # raised again in the training thread
            put(error)
