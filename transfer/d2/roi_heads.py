"""Our ROI heads: the C4 box head of the MoCo paper, and heads with sync-free proposal sampling.

``Res5ROIHeadsExtraNorm``: fine-tuning a self-supervised backbone with normalisation trained
everywhere means the new head needs a norm too (MoCo paper §4.2); the official detection code calls
this head ``Res5ROIHeadsExtraNorm`` and configs select it with ``MODEL.ROI_HEADS.NAME``.

``SyncFreeSampling``: detectron2's ROI heads sample the proposals of each image with several
read-backs of GPU values (see transfer/d2/rpn.py for why those cost time): the Matcher,
boolean-mask label assignment, ``subsample_labels``, the logged sample counts, the polygon masks'
indices. This sampling draws the same way with one read-back for the whole batch, hands each
image's samples on as ``SampledProposals`` (foreground first, their count known on the host) and
polygon masks as ``PackedPolygons`` (their targets are rasterized on the GPU);
``SyncFreeStandardROIHeads`` (FPN; its mask head also takes the sampled foreground as a slice) and
``SyncFreeRes5ROIHeadsExtraNorm`` (C4) are the heads above with it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, cat, cross_entropy, get_norm
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, FastRCNNOutputLayers, Res5ROIHeads, StandardROIHeads
from detectron2.structures import Instances, PolygonMasks
from detectron2.utils.events import get_event_storage
from fvcore.nn import smooth_l1_loss

from transfer import d2compat
from transfer.d2 import step_scalars
from transfer.d2.mask_targets import PackedPolygons, mask_targets
from transfer.d2.pooler import SyncFreeROIPooler
from transfer.d2.prefetch import to_device
from transfer.d2.rpn import anchor_deltas, batched_iou, candidates_first, match, sample_sizes


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 stage ends with a ``MODEL.RESNETS.NORM`` layer."""

    @classmethod
    @d2compat.overrides(Res5ROIHeads)
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


class SyncFreeFastRCNNOutputLayers(FastRCNNOutputLayers):
    """FastRCNNOutputLayers whose losses and logged statistics read nothing back.

    detectron2 selects the foreground rows with ``nonzero`` and logs three accuracies with
    ``.item()``; here the box loss masks the background rows out (the same sum) and the
    statistics go to step_scalars. With no foreground, the foreground accuracies log 0 (detectron2:
    nothing). Other box losses than smooth L1 are detectron2's.
    """

    def losses(self, predictions, proposals):
        scores, proposal_deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals]) if proposals else torch.empty(0, dtype=torch.int64)
        step_scalars.put(**classification_statistics(scores, gt_classes))
        if proposals:
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
            # as detectron2: images without objects regress to themselves, masked out anyway
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals])
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        losses = {"loss_cls": cross_entropy(scores, gt_classes, reduction="mean"),
                  "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes)}
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def box_reg_loss(self, proposal_boxes, gt_boxes, pred_deltas, gt_classes):
        if self.box_reg_loss_type != "smooth_l1" or proposal_boxes.shape[1] != 4:
            return super().box_reg_loss(proposal_boxes, gt_boxes, pred_deltas, gt_classes)
        foreground = (gt_classes >= 0) & (gt_classes < self.num_classes)
        if pred_deltas.shape[1] != 4:  # class-specific: each row's deltas for its class
            rows = torch.arange(len(gt_classes), device=pred_deltas.device)
            pred_deltas = pred_deltas.view(-1, self.num_classes, 4)[rows, gt_classes.clamp(0, self.num_classes - 1)]
        targets = anchor_deltas(self.box2box_transform, proposal_boxes, gt_boxes)
        loss = smooth_l1_loss(pred_deltas, targets, self.smooth_l1_beta, reduction="none").sum(dim=1)
        return torch.where(foreground, loss, 0.0).sum() / max(gt_classes.numel(), 1.0)


def classification_statistics(scores, gt_classes, prefix="fast_rcnn"):
    """detectron2's ``_log_classification_stats`` as tensors (background is the last class)."""
    background = scores.shape[1] - 1
    predicted = scores.argmax(dim=1)
    foreground = (gt_classes >= 0) & (gt_classes < background)
    num_foreground = foreground.sum().clamp(min=1)
    return {f"{prefix}/cls_accuracy": (predicted == gt_classes).float().mean(),
            f"{prefix}/fg_cls_accuracy": (foreground & (predicted == gt_classes)).sum() / num_foreground,
            f"{prefix}/false_negative": (foreground & (predicted == background)).sum() / num_foreground}


def mask_loss(logits: torch.Tensor, instances) -> torch.Tensor:
    """detectron2's ``mask_rcnn_loss`` (without its visualisation), statistics to step_scalars."""
    size = logits.shape[2]
    instances = [x for x in instances if len(x)]
    if not instances:
        return logits.sum() * 0
    targets = mask_targets([x.gt_masks for x in instances], [x.proposal_boxes.tensor for x in instances], size)
    if logits.shape[1] == 1:  # class-agnostic
        logits = logits[:, 0]
    else:
        logits = logits[torch.arange(len(logits), device=logits.device), cat([x.gt_classes for x in instances])]
    targets = targets if targets.dtype == torch.bool else targets > 0.5
    wrong = (logits > 0) != targets
    positive = targets.sum()
    negative = targets.numel() - positive
    step_scalars.put(**{"mask_rcnn/accuracy": 1 - wrong.float().mean(),
                        "mask_rcnn/false_positive": (wrong & ~targets).sum() / negative.clamp(min=1),
                        "mask_rcnn/false_negative": (wrong & targets).sum() / positive.clamp(min=1)})
    return F.binary_cross_entropy_with_logits(logits, targets.float())


class SyncFreeSampling:
    """``label_and_sample_proposals`` of detectron2's ROIHeads with one read-back per batch;
    ``SyncFreeFastRCNNOutputLayers`` as the box predictor and ``SyncFreeROIPooler`` as poolers."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        features = ret["box_predictor"].cls_score.in_features
        ret["box_predictor"] = SyncFreeFastRCNNOutputLayers(cfg, ShapeSpec(channels=features))
        for name in ("pooler", "box_pooler", "mask_pooler", "keypoint_pooler"):
            if isinstance(ret.get(name), ROIPooler):
                ret[name] = SyncFreeROIPooler(ret[name])
        return ret

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        classes, matches = self._label(proposals, targets)
        # subsample_labels for all images at once (padding is neither foreground nor background).
        foreground, background = (classes != -1) & (classes != self.num_classes), classes == self.num_classes
        num_foreground, num_background, most_foreground = sample_sizes(
            foreground, background, self.batch_size_per_image, self.positive_fraction)
        order = torch.cat([candidates_first(foreground, most_foreground),
                           candidates_first(background, self.batch_size_per_image)], dim=1)
        # The one read-back: how many of each image's samples to keep.
        host = torch.stack([num_foreground, num_background], dim=1).tolist()

        sampled_proposals = []
        first_background = min(most_foreground, classes.shape[1])  # where the background columns start
        for i, (proposals_i, targets_i) in enumerate(zip(proposals, targets)):
            fg, bg = host[i]
            keep = torch.cat([order[i, :fg], order[i, first_background:first_background + bg]])
            sampled = SampledProposals(proposals_i[keep], num_foreground=fg)
            sampled.gt_classes = classes[i][keep]
            if len(targets_i) > 0:  # as detectron2: images without objects get no gt_* fields
                matched = matches[i][keep]
                for name, value in targets_i.get_fields().items():
                    if not name.startswith("gt_") or sampled.has(name):
                        continue
                    if isinstance(value, PolygonMasks):  # rasterized on the device: mask_targets.py
                        value = PackedPolygons.from_polygon_masks(value, keep.device)
                    sampled.set(name, value[matched])
            sampled_proposals.append(sampled)

        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(row[0] for row in host) / len(host))
        storage.put_scalar("roi_head/num_bg_samples", sum(row[1] for row in host) / len(host))
        return sampled_proposals

    def _label(self, proposals, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Each proposal's class (num_classes: background, -1: ignored or padding) and matched object,
        for all images at once, each (images, most proposals): one IoU matrix and match for the batch."""
        boxes = stack_padded([p.proposal_boxes.tensor for p in proposals])
        gt_boxes = stack_padded([t.gt_boxes.tensor for t in targets], min_length=1)
        gt_classes = stack_padded([t.gt_classes for t in targets], min_length=1)
        lengths = to_device(torch.tensor([[len(t), len(p)] for t, p in zip(targets, proposals)]), boxes.device)
        real_objects = torch.arange(gt_boxes.shape[1], device=boxes.device) < lengths[:, :1]
        real_proposals = torch.arange(boxes.shape[1], device=boxes.device) < lengths[:, 1:]
        iou = torch.where(real_objects[:, :, None], batched_iou(gt_boxes, boxes), -1.0)  # padding: never matched
        matches, labels = match(self.proposal_matcher, iou)
        classes = torch.where(labels == 0, self.num_classes, gt_classes.gather(1, matches))
        classes = torch.where((labels == -1) | ~real_proposals, -1, classes)  # padding: never sampled
        return classes, matches


class SampledProposals(Instances):
    """One image's sampled proposals (detectron2's ``Instances``): the first ``num_foreground`` of
    them are foreground, a count known on the host."""

    def __init__(self, proposals: Instances, num_foreground: int):
        super().__init__(proposals.image_size, **proposals.get_fields())
        self._num_foreground = num_foreground  # (Instances takes a public name for a per-proposal field)

    @property
    def num_foreground(self) -> int:
        return self._num_foreground


def stack_padded(tensors: list[torch.Tensor], min_length: int = 0) -> torch.Tensor:
    """The tensors stacked along a new first dimension, each padded with zeros to the longest
    (and to at least ``min_length``): a few operators for the whole batch (``pad_sequence``
    dispatches a few per tensor)."""
    longest = max(min_length, *(len(t) for t in tensors))
    rows = np.concatenate([np.arange(len(t)) + i * longest for i, t in enumerate(tensors)])
    stacked = tensors[0].new_zeros((len(tensors) * longest, *tensors[0].shape[1:]))
    stacked[to_device(torch.from_numpy(rows), stacked.device)] = cat(tensors)
    return stacked.view(len(tensors), longest, *tensors[0].shape[1:])


@ROI_HEADS_REGISTRY.register()
class SyncFreeStandardROIHeads(SyncFreeSampling, StandardROIHeads):
    """StandardROIHeads (same config keys and weights) sampling proposals with one read-back per batch.

    Its mask head trains on the sampled foreground, which comes first: a slice, where detectron2's
    ``select_foreground_proposals`` reads each image's foreground indices back; its loss is
    ``mask_loss``.
    """

    @d2compat.overrides(StandardROIHeads)
    def _forward_mask(self, features, instances):
        if not (self.training and self.mask_on):
            return super()._forward_mask(features, instances)
        instances = [x[:x.num_foreground] for x in instances]
        if self.mask_pooler is None:
            x = {f: features[f] for f in self.mask_in_features}
        else:
            x = self.mask_pooler([features[f] for f in self.mask_in_features], [i.proposal_boxes for i in instances])
        return {"loss_mask": mask_loss(self.mask_head.layers(x), instances) * self.mask_head.loss_weight}


@ROI_HEADS_REGISTRY.register()
class SyncFreeRes5ROIHeadsExtraNorm(SyncFreeSampling, Res5ROIHeadsExtraNorm):
    """Res5ROIHeadsExtraNorm (same config keys and weights) sampling proposals with one read-back per batch."""
