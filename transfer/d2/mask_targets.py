"""Mask R-CNN's polygon mask targets, rasterized on the device that trains.

detectron2 keeps polygon masks on the host and rasterizes each sampled foreground proposal's
28 x 28 target there with pycocotools (``PolygonMasks.crop_and_resize``): thousands of targets per
batch of COCO images, one at a time while the GPU waits, then a blocking copy per image.
``PackedPolygons`` holds the polygons of an image's objects in one padded tensor on the device;
its ``crop_and_resize`` rasterizes every proposal's target at once with a few tensor operations
and reads nothing back, and ``mask_targets`` does so for several images per pass.

Rasterization samples pixel centres with the even-odd rule per polygon and takes the union of an
object's polygons, as pycocotools' ``merge`` does. pycocotools first rounds vertices to 1/5 pixel,
as we do, then walks the edges at 5x resolution; the two still disagree on a small share of pixels
(where the boundary passes through), fewer than detectron2's bitmask targets do, which it documents
as equally accurate (tests/test_mask_targets.py checks both bounds; the README has the figures).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.structures import PolygonMasks

# Objects rasterized per pass: at most this many elements in the (object, row, polygon, edge) tensors
# (a few tens of bytes each at their peak, well within a GPU's memory): few passes of a few dozen
# kernels each for a batch on a GPU. (A CPU would be faster with passes of tensors small enough to
# stay in its caches.)
CHUNK_ELEMENTS = 2 ** 24


def mask_targets(masks: list, boxes: list[torch.Tensor], mask_size: int) -> torch.Tensor:
    """The (N, mask_size, mask_size) targets of every image's ``masks`` within its ``boxes``, concatenated.

    ``PackedPolygons`` are rasterized several images per pass (a few operators per pass instead of
    per image): images with the smallest polygons first, each pass as many as fit in
    ``CHUNK_ELEMENTS`` once padded to its largest, so that little of the work is padding. Other mask
    structures per image, as detectron2 does (BitMasks of a whole batch would take gigabytes).
    """
    if not all(isinstance(m, PackedPolygons) for m in masks):
        return cat([m.crop_and_resize(b, mask_size).to(b.device) for m, b in zip(masks, boxes)])
    passes = [[]]
    for i in sorted(range(len(masks)), key=lambda i: math.prod(padded_shape([masks[i]]))):
        if passes[-1] and padded_elements([masks[j] for j in passes[-1] + [i]], mask_size) > CHUNK_ELEMENTS:
            passes.append([])
        passes[-1].append(i)
    targets = [None] * len(masks)
    for images in passes:
        packed = PackedPolygons.cat([masks[i] for i in images])
        rasterized = packed.crop_and_resize(cat([boxes[i] for i in images]), mask_size)
        for i, image_targets in zip(images, rasterized.split([len(masks[i]) for i in images])):
            targets[i] = image_targets
    return cat(targets)


def padded_shape(masks: list[PackedPolygons]) -> tuple[int, int]:
    """The most polygons and vertices among ``masks``: the shape they take together."""
    return max(m.vertices.shape[1] for m in masks), max(m.vertices.shape[2] for m in masks)


def padded_elements(masks: list[PackedPolygons], mask_size: int) -> int:
    """The size of the (object, row, polygon, edge) tensors that rasterizing ``masks`` together takes."""
    return sum(len(m) for m in masks) * mask_size * math.prod(padded_shape(masks))


class PackedPolygons:
    """The polygons of N objects as a ``(N, polygons, vertices, 2)`` tensor of x, y.

    A polygon shorter than the longest is padded with its first vertex (zero-length edges), an
    object with fewer polygons with all-zero ones: padding never crosses a scanline. Indexing
    and ``to`` work like detectron2's mask structures, so ``Instances`` can hold it.
    """

    def __init__(self, vertices: torch.Tensor):
        self.vertices = vertices

    @classmethod
    def from_polygon_masks(cls, masks: PolygonMasks, device) -> PackedPolygons:
        objects = masks.polygons
        num_polygons = max((len(polygons) for polygons in objects), default=1)
        num_vertices = max((len(polygon) // 2 for polygons in objects for polygon in polygons), default=1)
        packed = np.zeros((len(objects), num_polygons, num_vertices, 2), dtype=np.float32)
        for i, polygons in enumerate(objects):
            for j, polygon in enumerate(polygons):
                xy = polygon.reshape(-1, 2)
                packed[i, j] = xy[0]
                packed[i, j, :len(xy)] = xy
        vertices = torch.from_numpy(packed)
        if torch.device(device).type == "cuda":
            vertices = vertices.pin_memory()  # so that the copy need not wait for the GPU
        return cls(vertices.to(device, non_blocking=True))

    @staticmethod
    def cat(packed: list[PackedPolygons]) -> PackedPolygons:
        """The objects of several PackedPolygons in one, padded to the most polygons and vertices."""
        polygons, vertices = padded_shape(packed)

        def padded(v: torch.Tensor) -> torch.Tensor:
            if v.shape[2] < vertices:  # repeating the last vertex adds zero-length edges only
                v = F.pad(v, (0, 0, 0, vertices - v.shape[2]), mode="replicate")
            return F.pad(v, (0, 0, 0, 0, 0, polygons - v.shape[1]))  # all-zero polygons

        return PackedPolygons(torch.cat([padded(p.vertices) for p in packed]))

    def __len__(self) -> int:
        return self.vertices.shape[0]

    def __getitem__(self, item) -> PackedPolygons:
        if isinstance(item, int):
            item = slice(item, item + 1)
        return PackedPolygons(self.vertices[item])

    def to(self, *args, **kwargs) -> PackedPolygons:
        return PackedPolygons(self.vertices.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def crop_and_resize(self, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
        """Object i rasterized within boxes[i] at mask_size x mask_size: a bool (N, mask_size, mask_size)
        tensor, as ``PolygonMasks.crop_and_resize``, on this structure's device."""
        assert len(boxes) == len(self), f"{len(boxes)} != {len(self)}"
        boxes = boxes.to(self.vertices.device)
        _, polygons, vertices, _ = self.vertices.shape
        step = max(1, CHUNK_ELEMENTS // (mask_size * polygons * vertices))
        return torch.cat([rasterize(v, b, mask_size) for v, b in zip(self.vertices.split(step), boxes.split(step))])


def rasterize(vertices: torch.Tensor, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """``PackedPolygons.crop_and_resize`` of the objects ``vertices`` (N, polygons, vertices, 2) in one pass."""
    # Box coordinates, scaled so that the box spans [0, mask_size] (sizes clamped as detectron2's).
    scale = mask_size / (boxes[:, 2:] - boxes[:, :2]).clamp(min=0.1)
    start = (vertices - boxes[:, None, None, :2]) * scale[:, None, None, :]
    start = torch.floor(start * 5 + 0.5) / 5  # pycocotools' rounding (it rasterizes at 5x)
    end = start.roll(-1, dims=2)  # edge k runs from vertex k to vertex k + 1 (the last closes it)
    # (object, row, polygon, edge): where each edge crosses each row's pixel centre line, if it does.
    centres = torch.arange(mask_size, device=boxes.device, dtype=start.dtype) + 0.5
    x0, y0, x1, y1 = (t[:, None] for t in (start[..., 0], start[..., 1], end[..., 0], end[..., 1]))
    y = centres[:, None, None]
    crosses = (y0 > y) != (y1 > y)
    x = torch.where(crosses, x0 + (y - y0) * (x1 - x0) / (y1 - y0), torch.inf).sort(dim=-1).values
    # A pixel centre is inside a polygon when an odd number of its crossings lie left of it.
    left = torch.searchsorted(x, centres.expand(*x.shape[:-1], mask_size).contiguous())
    return (left % 2 == 1).any(dim=2)
