"""Fine-tuning speed: s/iter, images/s and peak memory of a task's training step, per precision.

The step is the one a real run takes: the task's resolved config (``finetune.resolve_config``),
our ``Trainer`` (detectron2's data loader, model, optimizer; AMPTrainer for ``amp``), timed over
``iters`` steps after ``warmup`` (their mean). Data time is the loader's share of the step, as
detectron2's trainer measures it. Weights: given, or a random-init ResNet-50 converted on the fly
(the "random init" row of a transfer table); the config's norms apply (``opts`` may override them,
e.g. to BN).

One more step runs under ``HostReadbacks``, the profiler here, which counts the operators it
dispatches and those that make the host wait for a GPU. A detection step is bound by the host
rather than by the GPU (README, "Fine-tuning speed"): these counts show on any machine what a
change does to that host work. ``heads="sync_free"`` times the same model with our sync-free RPN
and ROI heads in place of detectron2's (transfer/d2/sync_free.py). ``time_mask_targets`` times the
Mask R-CNN polygon mask targets alone. The synthetic COCO data these benchmarks read is
``transfer.datasets.demo.synthetic_coco``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from transfer.errors import UserError


@dataclass
class StepTiming:
    task: str
    precision: str
    heads: str
    batch: int
    s_per_iter: float
    data_s_per_iter: float
    peak_memory_gib: float | None
    ops_per_step: int | None = None  # operators dispatched by one training step
    readbacks_per_step: int | None = None  # of those, the ones that wait for the GPU
    ops_after_wait: int | None = None  # operators dispatched after the step's first read-back

    @property
    def images_per_s(self) -> float:
        return self.batch / self.s_per_iter


class HostReadbacks(TorchDispatchMode):
    """Counts dispatched operators, and those that read a GPU result back to the host.

    A read-back (``.item()``, ``bool(tensor)``, ``nonzero``, ``unique``, boolean-mask indexing,
    ``masked_select``, NMS, whose CUDA kernel finishes on the host, a copy to the host) stops the
    host until the GPU has run everything queued before it, so the host cannot queue work ahead of
    the GPU. So does a copy to the GPU that is not ``non_blocking`` (PyTorch synchronizes the
    stream after it), e.g. ``torch.tensor(values, device="cuda")``. ``readbacks``: operator name ->
    count. ``device``: where the model runs. On a GPU, operators on host tensors only (e.g. a
    ``nonzero`` in the data mapper) wait for nothing and are not counted. On a CPU every tensor is a
    host tensor: everything is counted as if the model's tensors were on a GPU, but for copies
    between host and GPU (``.cpu()``, ``.tolist()``, ``.to("cuda")``), which do not exist there.

    ``ops_after_wait``: operators dispatched after the first read-back. Once the host has waited,
    the GPU has nothing queued and runs each of these as soon as the host dispatches it, so the
    host's time for them adds to the step (until the backward pass's large kernels let the host
    get ahead again). It means something on a GPU only: on a CPU the first read-back counted is
    ``ImageList`` reading the image sizes (host tensors on a GPU), before the backbone.
    """

    READBACK = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_numpy", "aten::_unique2",
                "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select",
                "aten::repeat_interleave", "torchvision::nms"}
    MASK_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __init__(self, device="cpu"):
        super().__init__()
        self.gpu = torch.device(device).type != "cpu"
        self.ops = self.ops_after_wait = 0
        self.readbacks = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.ops_after_wait += bool(self.readbacks)
        if self._reads_back(func._schema.name, args, kwargs):
            self.readbacks[func._schema.name] += 1
        return func(*args, **kwargs)

    def _reads_back(self, name: str, args, kwargs) -> bool:
        if name == "aten::_to_copy":
            source, target = args[0].device, torch.device(kwargs.get("device") or args[0].device)
            return self._waits(source, target, kwargs.get("non_blocking", False))
        if name == "aten::copy_":
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            return self._waits(args[1].device, args[0].device, non_blocking)
        if name not in self.READBACK and name not in self.MASK_INDEXING:
            return False
        if self.gpu and not any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in tree_leaves(args)):
            return False  # host tensors only: nothing to wait for
        if name in self.MASK_INDEXING:  # x[mask]: the result's size is the mask's count
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        return True

    @staticmethod
    def _waits(source: torch.device, target: torch.device, non_blocking: bool) -> bool:
        """Whether a copy waits for the GPU: any copy to the host, a blocking one to the GPU."""
        if source.type != "cpu" and target.type == "cpu":
            return True
        return source.type == "cpu" and target.type != "cpu" and not non_blocking


def random_init_weights(folder) -> Path:
    """A random torchvision ResNet-50, converted: the backbone detectron2 builds, random weights."""
    import torchvision

    from transfer.convert import convert

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "random_resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), source)
    return convert(source).weights_path


def time_steps(task_name: str, weights, precision: str, schedule: str = "demo", batch: int | None = None,
               warmup: int = 3, iters: int = 10, datasets_root=None, opts=(),
               heads: str = "detectron2") -> StepTiming:
    from detectron2.utils.events import EventStorage

    from transfer.d2.sync_free import with_heads
    from transfer.d2.trainer import Trainer
    from transfer.datasets import catalog
    from transfer.finetune import register_datasets, resolve_config
    from transfer.tasks import get_task

    task = get_task(task_name)
    register_datasets(task_name, datasets_root)  # a custom task's datasets too
    catalog.check([*task.train], datasets_root)
    extra = list(opts) + (["SOLVER.IMS_PER_BATCH", batch] if batch else [])
    with tempfile.TemporaryDirectory() as out:
        cfg = resolve_config(task, weights, schedule, output_dir=out, opts=extra, amp=precision == "amp")
        if warmup + iters + 1 > cfg.SOLVER.MAX_ITER:  # the data (and the schedule) end with the last iteration
            raise UserError(f"{warmup} warm-up + {iters} timed steps + 1 counted do not fit in {task.name}'s "
                            f"{schedule} schedule ({cfg.SOLVER.MAX_ITER} iterations)")
        trainer = Trainer(with_heads(cfg, heads))
        trainer.resume_or_load(resume=False)
        trainer.iter = trainer.start_iter = 0
        cuda = cfg.MODEL.DEVICE == "cuda"
        data_times = []
        with EventStorage(0) as trainer.storage:
            for i in range(warmup + iters):
                if i == warmup:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                trainer.storage.iter = trainer.iter = i
                trainer.run_step()
                if i >= warmup:
                    data_times.append(trainer.storage.history("data_time").latest())
            if cuda:
                torch.cuda.synchronize()
            # Timed as training runs, without waiting for the GPU between steps: a step's host
            # work may overlap the GPU's work on the one before.
            s_per_iter = (time.perf_counter() - start) / iters
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            trainer.storage.iter = trainer.iter = warmup + iters
            with HostReadbacks(cfg.MODEL.DEVICE) as counted:
                trainer.run_step()
    return StepTiming(task.name, precision, heads, cfg.SOLVER.IMS_PER_BATCH, s_per_iter, statistics.median(data_times),
                      peak, counted.ops, sum(counted.readbacks.values()), counted.ops_after_wait)


def markdown(rows: list[StepTiming]) -> str:
    columns = ["task", "precision", "heads", "batch", "s/iter", "data s/iter", "img/s", "peak GiB", "ops/step",
               "read-backs/step", "ops after 1st read-back"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        peak = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "n/a"
        lines.append(f"| {r.task} | {r.precision} | {r.heads} | {r.batch} | {r.s_per_iter:.3f} "
                     f"| {r.data_s_per_iter:.3f} | {r.images_per_s:.1f} | {peak} | {r.ops_per_step} "
                     f"| {r.readbacks_per_step} | {r.ops_after_wait} |")
    return "\n".join(lines)


@dataclass
class MaskTargetTiming:
    rasterizer: str
    device: str
    rois: int
    ms_per_batch: float
    readbacks: int  # per batch


def time_mask_targets(root, device: str = "cpu", images: int = 16, rois_per_image: int = 128, mask_size: int = 28,
                      repeats: int = 5, seed: int = 0) -> list[MaskTargetTiming]:
    """A batch's Mask R-CNN polygon mask targets: detectron2's (``PolygonMasks``: pycocotools per proposal
    on the host, then a copy) against ours (``PackedPolygons`` on ``device``: several images per pass,
    as training does, and one image at a time), each including the indexing by matched object that
    the ROI heads do. Objects: the first ``images`` images of the ``demo.synthetic_coco`` data under
    ``root``; proposals: their boxes, jittered, ``rois_per_image`` each.
    """
    import json

    import numpy as np
    from detectron2.structures import PolygonMasks

    from transfer.d2.mask_targets import PackedPolygons, mask_targets

    data = json.loads((Path(root) / "coco" / "annotations" / "instances_train2017.json").read_text())
    rng = np.random.default_rng(seed)
    batch = []
    for image in data["images"][:images]:
        objects = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        masks = PolygonMasks([[np.asarray(p, dtype=np.float64) for p in a["segmentation"]] for a in objects])
        x, y, w, h = np.array([a["bbox"] for a in objects], dtype=np.float32).T
        matched = rng.integers(0, len(objects), rois_per_image)
        jitter = rng.normal(0, 0.1, (rois_per_image, 4)) * np.stack([w, h, w, h], 1)[matched]
        boxes = np.stack([x, y, x + w, y + h], 1)[matched] + jitter
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        batch.append((masks, torch.as_tensor(matched, device=device), torch.as_tensor(boxes, device=device)))

    def detectron2s():
        return [masks[matched.tolist()].crop_and_resize(boxes, mask_size) for masks, matched, boxes in batch]

    def packed():
        return [PackedPolygons.from_polygon_masks(masks, device)[matched] for masks, matched, _ in batch]

    def ours():
        return mask_targets(packed(), [boxes for _, _, boxes in batch], mask_size)

    def ours_per_image():
        return [masks.crop_and_resize(boxes, mask_size) for masks, (_, _, boxes) in zip(packed(), batch)]

    rows = []
    for name, targets in (("detectron2", detectron2s), ("packed_polygons", ours),
                          ("packed_polygons per image", ours_per_image)):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            targets()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        with HostReadbacks(device) as counted:
            targets()
        rows.append(MaskTargetTiming(name, device, images * rois_per_image, 1000 * statistics.median(times[1:]),
                                     sum(counted.readbacks.values())))
    return rows
