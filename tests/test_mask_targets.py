"""PackedPolygons: Mask R-CNN's polygon mask targets rasterized with tensor operations."""
import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from transfer.d2.mask_targets import PackedPolygons
from transfer.finetune_bench import HostReadbacks


def objects_and_proposals(seed=0, count=60, jitter=8.0):
    """Star-shaped objects of 1-3 polygons (3-40 vertices, overlapping or not) and proposals around them."""
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(count):
        cx, cy = rng.uniform(60, 300, 2)
        polygons = []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(3, 40))
            angle, radius = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(10, 60, n)
            polygons.append(np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], 1).ravel())
        objects.append(polygons)
    masks = PolygonMasks(objects)
    boxes = masks.get_bounding_boxes().tensor + torch.from_numpy(rng.normal(0, jitter, (count, 4))).float()
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return masks, boxes


def test_targets_agree_with_pycocotools_more_closely_than_detectron2s_bitmask_targets():
    masks, boxes = objects_and_proposals()
    expected = masks.crop_and_resize(boxes, 28)  # detectron2: pycocotools, per proposal, on the host
    got = PackedPolygons.from_polygon_masks(masks, "cpu").crop_and_resize(boxes, 28)
    assert got.shape == expected.shape and got.dtype == torch.bool
    disagree = (got != expected).float().mean().item()
    # detectron2's other mask format (bitmasks, ROIAlign), which it documents as equally accurate.
    bitmask = BitMasks.from_polygon_masks(masks, 400, 400).crop_and_resize(boxes, 28)
    assert disagree < 0.01 and disagree < (bitmask != expected).float().mean().item(), disagree
    iou = (got & expected).sum((1, 2)) / (got | expected).sum((1, 2)).clamp(min=1)
    assert iou.min() > 0.9, iou.min()


def test_rectangles_on_the_pixel_grid_and_overlapping_polygons_rasterize_as_pycocotools_does():
    square = [0, 0, 28, 0, 28, 28, 0, 28]
    objects = [[square], [[0, 0, 14, 0, 14, 28, 0, 28]],
               [[3, 3, 20, 3, 20, 20, 3, 20], [10, 10, 25, 10, 25, 25, 10, 25]],  # this and the next: unions
               [[0, 0, 14, 0, 14, 28, 0, 28], [7, 7, 21, 7, 21, 21, 7, 21]]]
    masks = PolygonMasks([[np.array(p, dtype=np.float64) for p in obj] for obj in objects])
    boxes = torch.tensor([[0, 0, 28, 28], [0, 0, 28, 28], [0, 0, 28, 28], [0, 0, 56, 56]], dtype=torch.float32)
    got = PackedPolygons.from_polygon_masks(masks, "cpu").crop_and_resize(boxes, 28)
    torch.testing.assert_close(got, masks.crop_and_resize(boxes, 28))
    assert got[0].all() and got[1].sum() == 14 * 28


def test_packed_polygons_index_and_move_like_detectron2s_masks_and_read_nothing_back():
    masks, boxes = objects_and_proposals(count=5)
    instances = Instances((400, 400), gt_boxes=Boxes(boxes), gt_masks=PackedPolygons.from_polygon_masks(masks, "cpu"))
    order = torch.tensor([4, 0, 0, 2])  # a proposal per index; an object can be matched twice
    picked = instances[order].to("cpu")
    assert isinstance(picked.gt_masks, PackedPolygons) and len(picked.gt_masks) == 4
    with HostReadbacks() as counted:
        got = picked.gt_masks.crop_and_resize(picked.gt_boxes.tensor, 14)
    assert not counted.readbacks, counted.readbacks
    expected = PolygonMasks([masks.polygons[i] for i in order]).crop_and_resize(picked.gt_boxes.tensor, 14)
    assert (got != expected).float().mean() < 0.02
    assert len(instances[1]) == 1 and len(instances[torch.tensor([True, False, True, False, False])]) == 2
    empty = instances[torch.zeros(0, dtype=torch.int64)]
    assert empty.gt_masks.crop_and_resize(empty.gt_boxes.tensor, 28).shape == (0, 28, 28)


def test_a_batch_rasterizes_in_passes_of_several_images_as_its_images_do_one_by_one(monkeypatch):
    from transfer.d2 import mask_targets

    # Three images whose objects have different numbers of polygons and vertices (padded differently),
    # the largest first: the passes take them smallest first.
    images = [objects_and_proposals(seed=4, count=4), objects_and_proposals(seed=2, count=5),
              objects_and_proposals(seed=1, count=4)]
    images[1][0].polygons[0] = images[1][0].polygons[0][:1]  # one polygon in the second image's first object
    packed = [PackedPolygons.from_polygon_masks(masks, "cpu") for masks, _ in images]
    sizes = [p.vertices.shape[1] * p.vertices.shape[2] for p in packed]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    one_by_one = torch.cat([p.crop_and_resize(boxes, 28) for p, (_, boxes) in zip(packed, images)])
    boxes = [boxes for _, boxes in images]
    with HostReadbacks() as counted:
        together = mask_targets.mask_targets(packed, boxes, 28)
    assert not counted.readbacks and torch.equal(together, one_by_one)
    # One image per pass, each in passes of a few objects, when the tensors would exceed the bound.
    monkeypatch.setattr(mask_targets, "CHUNK_ELEMENTS", 28 * 3 * 40 * 2)
    assert torch.equal(mask_targets.mask_targets(packed, boxes, 28), one_by_one)
    # Other mask structures: per image, as detectron2 does.
    polygons = [masks for masks, _ in images]
    expected = torch.cat([m.crop_and_resize(b, 28) for m, b in zip(polygons, boxes)])
    assert torch.equal(mask_targets.mask_targets(polygons, boxes, 28), expected)
