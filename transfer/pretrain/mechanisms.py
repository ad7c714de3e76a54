"""The dictionary mechanisms (``--mechanism``): three ways to feed the same InfoNCE loss with keys.

Each is a module with ``encoder_q``, ``forward(im_q, im_k, view_ids) -> (logits, labels)``,
``keys(im_k, view_ids)`` (a batch's positive keys, for the monitors) and ``stored_keys(...)`` (what
its dictionary holds, for the consistency monitor). Adding a mechanism is adding a module and a
line here.
"""
import torchvision

from transfer.pretrain.end_to_end import EndToEnd
from transfer.pretrain.memory_bank import MemoryBank
from transfer.pretrain.moco import MoCo

MECHANISMS = ("moco", "memory_bank", "end_to_end")


def build(cfg, bn_splits, num_images):
    """The configured mechanism around ``cfg.arch`` (a torchvision ResNet), on the CPU."""
    base = torchvision.models.get_model_builder(cfg.arch)
    shared = dict(dim=cfg.moco_dim, T=cfg.moco_t, mlp=cfg.mlp, bn_splits=bn_splits, small_stem=cfg.small_stem)
    if cfg.mechanism == "moco":
        return MoCo(base, K=cfg.moco_k, m=cfg.moco_m, shuffle_bn=cfg.shuffle_bn, **shared)
    if cfg.mechanism == "memory_bank":
        return MemoryBank(base, num_images, K=cfg.moco_k, bank_m=cfg.bank_m, **shared)
    if cfg.mechanism == "end_to_end":
        return EndToEnd(base, shuffle_bn=cfg.shuffle_bn, **shared)
    raise ValueError(f"unknown mechanism {cfg.mechanism!r}; expected one of {MECHANISMS}")
