"""The C4 box head of the MoCo paper: detectron2's Res5ROIHeads plus one norm layer after res5.

Fine-tuning a self-supervised backbone with normalisation trained everywhere means the new head
needs a norm too (MoCo paper §4.2); the official detection code calls this head
``Res5ROIHeadsExtraNorm`` and configs select it with ``MODEL.ROI_HEADS.NAME``.
"""
from transfer import d2compat  # noqa: F401  (before any detectron2 import)

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 stage ends with a ``MODEL.RESNETS.NORM`` layer."""

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels
