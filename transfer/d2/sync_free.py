"""Which RPN and ROI heads a config trains with: detectron2's, or their sync-free versions.

Our sync-free heads (transfer/d2/rpn.py, roi_heads.py) have the same weights, config keys and
results as the heads they replace, with fewer GPU read-backs per step. ``with_heads`` swaps them
in by name; heads without a sync-free version stay.
"""
from __future__ import annotations

from transfer.errors import UserError

# detectron2's heads -> ours, by config node.
SYNC_FREE = {"PROPOSAL_GENERATOR": {"RPN": "SyncFreeRPN"},
             "ROI_HEADS": {"StandardROIHeads": "SyncFreeStandardROIHeads",
                           "Res5ROIHeadsExtraNorm": "SyncFreeRes5ROIHeadsExtraNorm"}}
HEADS = ("detectron2", "sync_free")


def with_heads(cfg, heads: str):
    """``cfg`` with detectron2's heads (``detectron2``) or their sync-free versions (``sync_free``)."""
    if heads not in HEADS:
        raise UserError(f"--heads {heads}: one of {', '.join(HEADS)}")
    cfg = cfg.clone()
    cfg.defrost()
    if heads == "sync_free":
        for node, ours in SYNC_FREE.items():
            cfg.MODEL[node].NAME = ours.get(cfg.MODEL[node].NAME, cfg.MODEL[node].NAME)
    cfg.freeze()
    return cfg
