"""SyncFreeSampling (in SyncFreeStandardROIHeads, SyncFreeRes5ROIHeadsExtraNorm): detectron2's proposal
sampling with one read-back per batch."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from transfer.d2 import roi_heads, step_scalars  # (importing roi_heads registers the heads)
from transfer.d2.mask_targets import PackedPolygons
from transfer.finetune_bench import HostReadbacks

# detectron2's (or our C4) head -> its sync-free version, and the features each reads.
HEADS = {"StandardROIHeads": ("SyncFreeStandardROIHeads", {"p2": ShapeSpec(channels=8, stride=4)}),
         "Res5ROIHeadsExtraNorm": ("SyncFreeRes5ROIHeadsExtraNorm", {"res4": ShapeSpec(channels=64, stride=16)})}


def build_heads(name, **settings):
    sync_free, shapes = HEADS[name]
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.IN_FEATURES = list(shapes)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, cfg.MODEL.RESNETS.NUM_GROUPS = 16, 1  # a narrow res5
    cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = "FastRCNNConvFCHead", 1
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.merge_from_list([x for item in settings.items() for x in item])
    cfg.MODEL.ROI_HEADS.NAME = name
    reference = build_roi_heads(cfg, shapes)
    cfg.MODEL.ROI_HEADS.NAME = sync_free
    return reference, build_roi_heads(cfg, shapes)


def boxes(n, generator, size=90.0):
    xy = torch.rand(n, 2, generator=generator) * size * 0.7
    return torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * size * 0.3 + 2], dim=1)


def proposals_and_targets():
    """Three images: 4 objects, none, 7 objects; proposals near the objects and at random."""
    generator = torch.Generator().manual_seed(0)
    proposals, targets = [], []
    for n, count in ((4, 300), (0, 50), (7, 700)):
        target = Instances((96, 96))
        target.gt_boxes = Boxes(boxes(n, generator))
        target.gt_classes = torch.randint(0, 3, (n,), generator=generator)
        target.gt_masks = PolygonMasks([[b[[0, 1, 2, 1, 2, 3, 0, 3]].tolist()] for b in target.gt_boxes.tensor])
        near = target.gt_boxes.tensor.repeat(count // max(n, 1), 1)[:count // 2]
        near = near + torch.randn(near.shape, generator=generator) * 4
        proposal = Instances((96, 96))
        proposal.proposal_boxes = Boxes(torch.cat([near, boxes(count - len(near), generator)]))
        proposal.objectness_logits = torch.randn(count, generator=generator)
        proposals.append(proposal)
        targets.append(target)
    return proposals, targets


def first_polygons(masks):
    """Each object's first polygon, flat (the test objects' polygons all have 4 vertices)."""
    if isinstance(masks, PackedPolygons):
        return masks.vertices[:, 0].flatten(1)
    return torch.tensor(np.stack([p[0] for p in masks.polygons]))


def rows(instances):
    """The sampled proposals as sorted (box, class, gt box, gt polygon) rows: the order is random."""
    fields = [instances.proposal_boxes.tensor, instances.gt_classes[:, None].float()]
    if instances.has("gt_boxes"):
        fields += [instances.gt_boxes.tensor, first_polygons(instances.gt_masks)]
    return sorted(map(tuple, torch.cat(fields, dim=1).tolist()))


@pytest.mark.parametrize("head", sorted(HEADS))
def test_sampling_takes_what_detectron2_takes_when_it_takes_everything(head):
    reference, ours = build_heads(head, **{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 100000})
    proposals, targets = proposals_and_targets()
    with EventStorage():
        expected = reference.label_and_sample_proposals(proposals, targets)
        got = ours.label_and_sample_proposals(proposals, targets)
    for mine, theirs in zip(got, expected):
        assert set(mine.get_fields()) == set(theirs.get_fields())
        assert rows(mine) == rows(theirs)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_sampled_counts_are_detectron2s_and_nothing_else_is_read_back(head):
    reference, ours = build_heads(head, **{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64})
    proposals, targets = proposals_and_targets()
    with EventStorage() as storage:
        with HostReadbacks() as counted:
            expected = reference.label_and_sample_proposals(proposals, targets)
        assert sum(counted.readbacks.values()) >= 3 * len(targets), counted.readbacks
        expected_counts = storage.latest()["roi_head/num_fg_samples"][0]
        with HostReadbacks() as counted:
            got = ours.label_and_sample_proposals(proposals, targets)
        assert storage.latest()["roi_head/num_fg_samples"][0] == expected_counts
    # Its one read-back is a copy to the host (.tolist()), which a CPU does not make: nothing else.
    assert not counted.readbacks, counted.readbacks
    for mine, theirs in zip(got, expected):
        assert len(mine) == len(theirs)
        for label in (3, -1):
            assert (mine.gt_classes == label).sum() == (theirs.gt_classes == label).sum()
        # Foreground first, each matched to an object of its class; background after.
        foreground = mine.gt_classes < 3
        assert foreground[:foreground.sum()].all()
        if mine.has("gt_boxes"):
            assert len(mine.gt_masks) == len(mine)


def logged(storage, prefix):
    return {name: value for name, (value, _) in storage.latest().items() if name.startswith(prefix)}


def test_the_mask_head_trains_on_the_same_foreground_and_logs_the_same_without_read_backs():
    reference, ours = build_heads("StandardROIHeads", **{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64})
    ours.load_state_dict(reference.state_dict())
    ours.train(), reference.train()
    proposals, targets = proposals_and_targets()
    features = {"p2": torch.randn(3, 8, 24, 24, generator=torch.Generator().manual_seed(3))}
    with EventStorage() as storage:
        sampled = ours.label_and_sample_proposals(proposals, targets)
        with HostReadbacks() as detectron2s:
            expected = reference._forward_mask(features, sampled)
        with step_scalars.collect() as scalars, HostReadbacks() as counted:
            got = ours._forward_mask(features, sampled)
        torch.testing.assert_close(got["loss_mask"], expected["loss_mask"])
        assert step_scalars.read_back(scalars) == pytest.approx(logged(storage, "mask_rcnn/"))
    # detectron2 reads each image's foreground indices back (and indexes its fields with them),
    # and each statistic it logs.
    assert not counted.readbacks and sum(detectron2s.readbacks.values()) >= len(sampled) + 3, detectron2s.readbacks


@pytest.mark.parametrize("agnostic", [False, True], ids=["per_class", "class_agnostic"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_box_losses_and_statistics_are_detectron2s_without_read_backs(head, agnostic):
    reference, ours = build_heads(head, **{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64,
                                           "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": agnostic})
    assert type(ours.box_predictor) is roi_heads.SyncFreeFastRCNNOutputLayers
    ours.load_state_dict(reference.state_dict())
    proposals, targets = proposals_and_targets()
    generator = torch.Generator().manual_seed(4)
    with EventStorage() as storage:
        sampled = ours.label_and_sample_proposals(proposals, targets)
        features = torch.randn(sum(map(len, sampled)), ours.box_predictor.cls_score.in_features, generator=generator)
        predictions = reference.box_predictor(features)
        expected = reference.box_predictor.losses(predictions, sampled)
        with step_scalars.collect() as scalars, HostReadbacks() as counted:
            got = ours.box_predictor.losses(predictions, sampled)
        assert not counted.readbacks, counted.readbacks
        torch.testing.assert_close(got, expected)
        assert expected["loss_box_reg"] > 0
        assert step_scalars.read_back(scalars) == pytest.approx(logged(storage, "fast_rcnn/"))
