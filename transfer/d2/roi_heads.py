"""Our ROI heads: the C4 box head of the MoCo paper, and heads with sync-free proposal sampling.

``Res5ROIHeadsExtraNorm``: fine-tuning a self-supervised backbone with normalisation trained
everywhere means the new head needs a norm too (MoCo paper §4.2); the official detection code calls
this head ``Res5ROIHeadsExtraNorm`` and configs select it with ``MODEL.ROI_HEADS.NAME``.

``SyncFreeSampling``: detectron2's ROI heads sample the proposals of each image with ~9 read-backs
of GPU values (see transfer/d2/rpn.py for why those cost time): the Matcher, boolean-mask label
assignment, ``subsample_labels``, the logged sample counts, the polygon masks' indices. This
sampling draws the same way with one read-back for the whole batch; ``SyncFreeStandardROIHeads``
(FPN; its mask head also takes the sampled foreground as a slice) and
``SyncFreeRes5ROIHeadsExtraNorm`` (C4) are the heads above with it.
"""
from __future__ import annotations

from transfer import d2compat  # noqa: F401  (before any detectron2 import)

import torch
from detectron2.layers import get_norm
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads, StandardROIHeads
from detectron2.structures import PolygonMasks, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch.nn.utils.rnn import pad_sequence

from transfer.d2.rpn import candidates_first, match, sample_sizes


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 stage ends with a ``MODEL.RESNETS.NORM`` layer."""

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


class SyncFreeSampling:
    """``label_and_sample_proposals`` of detectron2's ROIHeads with one read-back per batch."""

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        # Each proposal's class (num_classes: background, -1: ignored) and matched gt box, per image.
        classes, matches = [], []
        for proposals_i, targets_i in zip(proposals, targets):
            if len(targets_i) == 0:
                matches_i = torch.zeros(len(proposals_i), dtype=torch.int64, device=proposals_i.proposal_boxes.device)
                classes_i = torch.full_like(matches_i, self.num_classes)
            else:
                matches_i, labels_i = match(self.proposal_matcher,
                                            pairwise_iou(targets_i.gt_boxes, proposals_i.proposal_boxes))
                classes_i = torch.where(labels_i == 0, self.num_classes, targets_i.gt_classes[matches_i])
                classes_i = torch.where(labels_i == -1, -1, classes_i)
            classes.append(classes_i)
            matches.append(matches_i)
        # subsample_labels for all images at once (padding is neither foreground nor background).
        padded = pad_sequence(classes, batch_first=True, padding_value=-1)
        foreground, background = (padded != -1) & (padded != self.num_classes), padded == self.num_classes
        num_foreground, num_background, most_foreground = sample_sizes(
            foreground, background, self.batch_size_per_image, self.positive_fraction)
        order = torch.cat([candidates_first(foreground, most_foreground),
                           candidates_first(background, self.batch_size_per_image)], dim=1)
        matched = pad_sequence(matches, batch_first=True).gather(1, order)
        # The one read-back: how many of each image's samples to keep, and (for polygon masks,
        # which live on the host) which gt objects they are matched to.
        host = torch.cat([num_foreground[:, None], num_background[:, None], matched], dim=1).tolist()

        sampled_proposals = []
        first_background = min(most_foreground, padded.shape[1])  # where the background columns start
        for i, (proposals_i, targets_i) in enumerate(zip(proposals, targets)):
            fg, bg, *matched_i = host[i]
            keep = torch.cat([order[i, :fg], order[i, first_background:first_background + bg]])
            sampled = proposals_i[keep]
            sampled._num_foreground = fg  # they come first (an attribute, not a per-proposal field)
            sampled.gt_classes = classes[i][keep]
            if len(targets_i) > 0:  # as detectron2: images without objects get no gt_* fields
                on_host = matched_i[:fg] + matched_i[first_background:first_background + bg]
                on_device = matches[i][keep]
                for name, value in targets_i.get_fields().items():
                    if name.startswith("gt_") and not sampled.has(name):
                        sampled.set(name, value[on_host] if isinstance(value, PolygonMasks) else value[on_device])
            sampled_proposals.append(sampled)

        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(row[0] for row in host) / len(host))
        storage.put_scalar("roi_head/num_bg_samples", sum(row[1] for row in host) / len(host))
        return sampled_proposals


@ROI_HEADS_REGISTRY.register()
class SyncFreeStandardROIHeads(SyncFreeSampling, StandardROIHeads):
    """StandardROIHeads (same config keys and weights) sampling proposals with one read-back per batch.

    Its mask head trains on the sampled foreground, which comes first: a slice, where detectron2's
    ``select_foreground_proposals`` reads each image's foreground indices back.
    """

    def _forward_mask(self, features, instances):
        if not (self.training and self.mask_on):
            return super()._forward_mask(features, instances)
        instances = [x[:x._num_foreground] for x in instances]
        if self.mask_pooler is None:
            return self.mask_head({f: features[f] for f in self.mask_in_features}, instances)
        boxes = [x.proposal_boxes for x in instances]
        return self.mask_head(self.mask_pooler([features[f] for f in self.mask_in_features], boxes), instances)


@ROI_HEADS_REGISTRY.register()
class SyncFreeRes5ROIHeadsExtraNorm(SyncFreeSampling, Res5ROIHeadsExtraNorm):
    """Res5ROIHeadsExtraNorm (same config keys and weights) sampling proposals with one read-back per batch."""
