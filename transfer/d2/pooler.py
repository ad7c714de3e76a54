"""detectron2's ROIPooler with one read-back per call.

``ROIPooler.forward`` reads GPU values back once per feature level (``nonzero`` of the boxes at
that level) and once more to give each box its image index (``repeat_interleave`` over a tensor
of counts, which it first copies to the GPU). ``SyncFreeROIPooler`` sorts the boxes by level,
reads the levels' box counts back in one copy and pools each level's slice: the same output.
"""
from __future__ import annotations

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import nn


class SyncFreeROIPooler(nn.Module):
    """Pools as ``pooler`` does (its levels, output size, ROIAlign type), with one read-back per call.

    It holds detectron2's pooler rather than copying it: a pooler has no weights, so a model's
    state dict is the same with either.
    """

    def __init__(self, pooler: ROIPooler):
        super().__init__()
        self.pooler = pooler

    def forward(self, x: list[torch.Tensor], box_lists: list[Boxes]) -> torch.Tensor:
        pooler = self.pooler
        if not box_lists or not isinstance(box_lists[0], Boxes):  # (rotated boxes: detectron2's)
            return pooler(x, box_lists)
        boxes = torch.cat([b.tensor for b in box_lists])
        # (image index, x0, y0, x1, y1) rows, the image indices made on the device (no copy).
        image = torch.cat([torch.full((len(b),), i, dtype=boxes.dtype, device=boxes.device)
                           for i, b in enumerate(box_lists)])
        rois = torch.cat([image[:, None], boxes], dim=1)
        if len(pooler.level_poolers) == 1:
            return pooler.level_poolers[0](x[0], rois)
        # (all images' boxes at once: the same levels with one area computation, not one per image)
        levels = assign_boxes_to_levels([Boxes(boxes)], pooler.min_level, pooler.max_level,
                                        pooler.canonical_box_size, pooler.canonical_level)
        order = torch.argsort(levels, stable=True)
        counts = torch.zeros(len(pooler.level_poolers), dtype=torch.int64, device=levels.device)
        counts = counts.scatter_add_(0, levels, torch.ones_like(levels)).tolist()  # the one read-back
        pooled, start = [], 0
        for level, (level_pooler, count) in enumerate(zip(pooler.level_poolers, counts)):
            pooled.append(level_pooler(x[level], rois[order[start:start + count]]))
            start += count
        pooled = torch.cat(pooled)
        output = torch.zeros((len(rois), *pooled.shape[1:]), dtype=x[0].dtype, device=x[0].device)
        return output.index_put_((order,), pooled)  # index_put_, as detectron2's pooler assigns them
