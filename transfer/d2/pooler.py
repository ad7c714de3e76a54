"""detectron2's ROIPooler with one read-back per call.

``ROIPooler.forward`` reads GPU values back once per feature level (``nonzero`` of the boxes at
that level) and once more to give each box its image index (``repeat_interleave`` over a tensor
of counts, which it first copies to the GPU). ``SyncFreeROIPooler`` sorts the boxes by level,
reads the levels' box counts back in one copy and pools each level's slice: the same output.
"""
from __future__ import annotations

from transfer import d2compat  # noqa: F401  (before any detectron2 import)

import copy

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes


class SyncFreeROIPooler(ROIPooler):
    @classmethod
    def of(cls, pooler: ROIPooler) -> SyncFreeROIPooler:
        """``pooler`` (same levels, output size, ROIAlign type; it has no weights), pooling with ours."""
        ours = copy.copy(pooler)
        ours.__class__ = cls
        return ours

    def forward(self, x: list[torch.Tensor], box_lists: list[Boxes]) -> torch.Tensor:
        if not box_lists or not isinstance(box_lists[0], Boxes):  # (rotated boxes: detectron2's)
            return super().forward(x, box_lists)
        boxes = torch.cat([b.tensor for b in box_lists])
        # (image index, x0, y0, x1, y1) rows, the image indices made on the device (no copy).
        image = torch.cat([torch.full((len(b),), i, dtype=boxes.dtype, device=boxes.device)
                           for i, b in enumerate(box_lists)])
        rois = torch.cat([image[:, None], boxes], dim=1)
        if len(self.level_poolers) == 1:
            return self.level_poolers[0](x[0], rois)
        # (all images' boxes at once: the same levels with one area computation, not one per image)
        levels = assign_boxes_to_levels([Boxes(boxes)], self.min_level, self.max_level, self.canonical_box_size,
                                        self.canonical_level)
        order = torch.argsort(levels, stable=True)
        counts = torch.zeros(len(self.level_poolers), dtype=torch.int64, device=levels.device)
        counts = counts.scatter_add_(0, levels, torch.ones_like(levels)).tolist()  # the one read-back
        pooled, start = [], 0
        for level, (pooler, count) in enumerate(zip(self.level_poolers, counts)):
            pooled.append(pooler(x[level], rois[order[start:start + count]]))
            start += count
        pooled = torch.cat(pooled)
        output = torch.zeros((len(rois), *pooled.shape[1:]), dtype=x[0].dtype, device=x[0].device)
        return output.index_put_((order,), pooled)  # index_put_, as detectron2 (pytorch#49852)
