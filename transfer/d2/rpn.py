"""detectron2's RPN, trained with (almost) no waits of the host for the GPU.

detectron2's RPN labels and samples anchors one image at a time, and several of its steps read a
GPU value back on the host: the Matcher's ``assert`` and ``nonzero``, ``subsample_labels``'s two
``nonzero``, the losses' boolean-mask indexing and the two anchor counts it logs (``.item()``).
Each of those stops the host until the GPU has finished everything queued, and the first one
comes right after the backbone's forward pass has been queued: from then on the host works one
image at a time while the GPU idles (the README's "Fine-tuning speed" has the profile).

``SyncFreeRPN`` computes the same training targets and losses without a read-back:

- matching: the same IoU matrix and thresholds per image, with ``torch.where`` in place of
  boolean-mask assignment and ``nonzero``;
- sampling: for the whole batch at once, each anchor gets a uniform random key and each image
  keeps the ``k`` smallest keys among its positives (``k = min(#positives, 256 * 0.5)``) and
  among its negatives (``k = min(#negatives, 256 - kept positives)``): a uniform random subset of
  each class of the same size as detectron2's ``randperm`` draw;
- losses: masks as weights instead of indexing, regression targets for the whole batch at once;
  the per-image anchor counts are not logged.

In training, proposal selection runs one NMS call per image instead of one per feature level
(``select_proposals``): the same proposals with a couple of read-backs per image instead of one or
more per level.
Inference is detectron2's. Select it with ``MODEL.PROPOSAL_GENERATOR.NAME SyncFreeRPN``;
``tests/test_rpn.py`` checks it against RPN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import cat, nms
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.structures import Boxes, Instances, pairwise_iou
from fvcore.nn import smooth_l1_loss

from transfer import d2compat
from transfer.d2.prefetch import to_device


def match(matcher: Matcher, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matcher(quality)`` without read-backs, for a (#gt, #anchors) IoU matrix with at least one
    row, or for a batch of them, (N, #gt, #anchors). Rows of -1 (padding) are never matched: an
    image with only those gets detectron2's convention for an image without objects (background)."""
    matched_vals, matches = quality.max(dim=-2)
    labels = torch.ones_like(matches, dtype=torch.int8)
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        labels = torch.where((matched_vals >= low) & (matched_vals < high), label, labels)
    if matcher.allow_low_quality_matches:
        # Every anchor that ties for the best match of some gt box becomes positive.
        best = (quality == quality.max(dim=-1, keepdim=True).values) & (quality >= 0)
        labels = torch.where(best.any(dim=-2), 1, labels)
    return matches, labels


def batched_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """detectron2's ``pairwise_iou`` (same arithmetic) for N images at once: (N, G, 4), (N, P, 4) -> (N, G, P)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    width_height = (torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
                    - torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])).clamp(min=0)
    inter = width_height.prod(dim=3)
    return torch.where(inter > 0, inter / (area1[:, :, None] + area2[:, None, :] - inter), 0.0)


def sample_sizes(positive: torch.Tensor, negative: torch.Tensor, batch_size: int, positive_fraction: float):
    """``subsample_labels``' sample sizes for each row: (#positives, #negatives, the most positives)."""
    most_positive = int(batch_size * positive_fraction)
    num_positive = positive.sum(dim=1).clamp(max=most_positive)
    num_negative = torch.minimum(negative.sum(dim=1), batch_size - num_positive)
    return num_positive, num_negative, most_positive


def candidates_first(candidates: torch.Tensor, most: int) -> torch.Tensor:
    """(N, most) column indices: each row's True entries in random order, then other entries.

    The first ``k`` of a row are a uniform random subset of its candidates (``k`` <= their count),
    drawn as ``subsample_labels`` draws them (``randperm``), without a read-back.
    """
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill_(~candidates, 2.0)
    return keys.topk(min(most, candidates.shape[1]), dim=1, largest=False).indices


def sample_per_row(candidates: torch.Tensor, counts: torch.Tensor, most: int) -> torch.Tensor:
    """A mask of a uniform random subset of each row's True entries, of ``counts[row]`` (<= ``most``) entries."""
    order = candidates_first(candidates, most)
    take = torch.arange(order.shape[1], device=candidates.device) < counts[:, None]
    return torch.zeros_like(candidates).scatter_(1, order, take)


def anchor_deltas(transform, anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``transform.get_deltas(anchors, boxes)`` for boxes (N, R, 4) against anchors (R, 4).

    The same formula as ``Box2BoxTransform.get_deltas``, for the whole batch and without its final
    check that every anchor has a positive width (a read-back; anchors are generated positive).
    """
    size = anchors[:, 2:] - anchors[:, :2]
    centre = anchors[:, :2] + 0.5 * size
    target_size = boxes[..., 2:] - boxes[..., :2]
    target_centre = boxes[..., :2] + 0.5 * target_size
    dx, dy = ((target_centre - centre) / size).unbind(-1)
    dw, dh = torch.log(target_size / size).unbind(-1)
    wx, wy, ww, wh = transform.weights
    return torch.stack([wx * dx, wy * dy, ww * dw, wh * dh], dim=-1)


def select_proposals(proposals, logits, image_sizes, nms_thresh: float, pre_nms_topk: int, post_nms_topk: int,
                     min_box_size: float) -> list[Instances]:
    """detectron2's ``find_top_rpn_proposals`` in training, with one NMS call per image.

    detectron2 runs NMS level by level (torchvision's ``batched_nms`` loops over the levels when an
    image has many boxes on a GPU, reading back per level) and checks every image's boxes twice.
    Here the levels are shifted apart so that one NMS call per image keeps the same boxes, boxes
    under ``min_box_size`` form a group of their own and are dropped after NMS (detectron2 drops
    them before: same result). All else, the Inf/NaN check included, works on the whole batch, not
    image by image: this runs after the host's first wait for the GPU, where each operator dispatched
    adds to the step (see ``HostReadbacks.ops_after_wait``).
    """
    device = logits[0].device
    rows = torch.arange(len(image_sizes), device=device)[:, None]
    boxes, scores, levels = [], [], []
    for level, (proposals_i, logits_i) in enumerate(zip(proposals, logits)):
        k = min(logits_i.shape[1], pre_nms_topk)
        logits_i, order = logits_i.sort(descending=True, dim=1)  # (detectron2: faster than topk)
        scores.append(logits_i[:, :k])
        boxes.append(proposals_i[rows, order[:, :k]])
        levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
    boxes, scores, levels = cat(boxes, dim=1), cat(scores, dim=1), cat(levels)
    if not (torch.isfinite(boxes).all() & torch.isfinite(scores).all()):
        raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
    # Every image's boxes clipped to its size (Boxes.clip, without its Inf/NaN check), at once; each
    # image's groups are shifted apart by its largest side + 1.
    bounds = to_device(torch.tensor([[w, h, w, h, max(h, w) + 1.0] for h, w in image_sizes]), device)
    boxes = torch.minimum(boxes.clamp(min=0), bounds[:, None, :4].to(boxes.dtype))
    widths, heights = (boxes[..., 2:] - boxes[..., :2]).unbind(-1)
    nonempty = (widths > min_box_size) & (heights > min_box_size)  # Boxes.nonempty
    group = torch.where(nonempty, levels, len(proposals))
    shifted = boxes.float() + (group * bounds[:, 4:])[..., None]
    scores_float = scores.float()
    keeps = []
    for n in range(len(image_sizes)):
        keep = nms(shifted[n], scores_float[n], nms_thresh)
        keep = keep[nonempty[n, keep]][:post_nms_topk]  # sorted by score, as NMS returns them
        keeps.append(keep + n * boxes.shape[1])
    # One gather for the whole batch, then a view per image.
    counts = [len(keep) for keep in keeps]
    keep = cat(keeps)
    image_boxes = boxes.flatten(0, 1)[keep].split(counts)
    image_scores = scores.flatten()[keep].split(counts)
    return [Instances(size, proposal_boxes=Boxes(b), objectness_logits=s)
            for size, b, s in zip(image_sizes, image_boxes, image_scores)]


@PROPOSAL_GENERATOR_REGISTRY.register()
class SyncFreeRPN(RPN):
    """detectron2's RPN (same config keys and weights) without its read-backs in training."""

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: list[Boxes], gt_instances):
        anchors = Boxes.cat(anchors)
        labels, matched_boxes = [], []
        for instances in gt_instances:
            gt_boxes = instances.gt_boxes
            if len(gt_boxes) == 0:  # the Matcher's convention: all background
                labels_i = torch.zeros(len(anchors), dtype=torch.int8, device=anchors.device)
                matched_boxes.append(torch.zeros_like(anchors.tensor))
            else:
                matches, labels_i = match(self.anchor_matcher, pairwise_iou(gt_boxes, anchors))
                matched_boxes.append(gt_boxes.tensor[matches])
            if self.anchor_boundary_thresh >= 0:
                inside = anchors.inside_box(instances.image_size, self.anchor_boundary_thresh)
                labels_i = torch.where(inside, labels_i, -1)
            labels.append(labels_i)
        labels = self._subsample_batch(torch.stack(labels))
        return list(labels.unbind(0)), matched_boxes

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        if not self.training:
            return super().predict_proposals(anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
        with torch.no_grad():
            proposals = d2compat.decode_proposals(self, anchors, pred_anchor_deltas)
            return select_proposals(proposals, pred_objectness_logits, image_sizes, self.nms_thresh,
                                    self.pre_nms_topk[True], self.post_nms_topk[True], self.min_box_size)

    def _subsample_batch(self, labels: torch.Tensor) -> torch.Tensor:
        """``subsample_labels`` of every image (row) at once: -1 where not sampled."""
        positive, negative = labels == 1, labels == 0
        num_positive, num_negative, most_positive = sample_sizes(
            positive, negative, self.batch_size_per_image, self.positive_fraction)
        sampled = torch.full_like(labels, -1)
        sampled.masked_fill_(sample_per_row(positive, num_positive, most_positive), 1)
        sampled.masked_fill_(sample_per_row(negative, num_negative, self.batch_size_per_image), 0)
        return sampled

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        if self.box_reg_loss_type != "smooth_l1":
            return super().losses(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        positive = gt_labels == 1
        anchors = Boxes.cat(anchors).tensor
        gt_deltas = anchor_deltas(self.box2box_transform, anchors, torch.stack(gt_boxes))
        # Non-positive anchors may be matched to nothing (zero boxes: infinite deltas): zero them.
        gt_deltas = torch.where(positive[..., None], gt_deltas, 0.0)
        pred_deltas = cat(pred_anchor_deltas, dim=1)
        box_loss = smooth_l1_loss(pred_deltas, gt_deltas, beta=self.smooth_l1_beta, reduction="none")
        localization_loss = torch.where(positive[..., None], box_loss, 0.0).sum()
        objectness_loss = F.binary_cross_entropy_with_logits(
            cat(pred_objectness_logits, dim=1), gt_labels.clamp(min=0).to(torch.float32),
            weight=(gt_labels >= 0).to(torch.float32), reduction="sum")
        normalizer = self.batch_size_per_image * len(gt_labels)
        losses = {"loss_rpn_cls": objectness_loss / normalizer, "loss_rpn_loc": localization_loss / normalizer}
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
