"""What the three dictionary mechanisms share: the encoder, the positive keys, the InfoNCE logits.

MoCo (``moco.py``), the memory bank (``memory_bank.py``) and end-to-end (``end_to_end.py``) solve
the same instance-discrimination task with the same encoder and loss; they differ only in where the
keys and negatives come from and how the key side is updated (MoCo paper, Fig. 2).
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfer.pretrain.shuffle_bn import batch_shuffle, batch_unshuffle, norm_layer


def encoder(base_encoder, dim, bn_splits=1, small_stem=False):
    """``base_encoder(num_classes=dim)`` (a torchvision-style ResNet constructor) with the BatchNorm of
    ``bn_splits`` groups; ``small_stem``: the CIFAR-style stem for 32-96 px images."""
    model = base_encoder(num_classes=dim, norm_layer=norm_layer(bn_splits))
    if small_stem:
        small_image_stem(model)
    return model


def small_image_stem(resnet):
    """3x3 stride-1 stem convolution and no max-pool, as CIFAR ResNets: the 7x7 stride-2 stem and the
    pool would shrink a 32 px image to 8 px before the first block. Parameter names are unchanged;
    the conv1 kernel is 3x3 (detectron2's stem is 7x7: the converter refuses such weights)."""
    resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


def add_mlp_head(encoder):
    """fc -> Linear, ReLU, fc (MoCo v2): state-dict keys fc.0 / fc.2 as in the official code."""
    hidden = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)


def encode_keys(encoder, im, shuffle=True):
    """L2-normalised ``encoder(im)`` in ``im``'s order; with ``shuffle`` the batch goes through the
    encoder shuffled (shuffle-BN), so no key shares BatchNorm statistics with its query."""
    if not shuffle:
        return F.normalize(encoder(im).float(), dim=1)
    im, idx_unshuffle = batch_shuffle(im)
    return batch_unshuffle(F.normalize(encoder(im).float(), dim=1), idx_unshuffle)


def info_nce_logits(q, k, negatives, T, exclude=None):
    """Logits (N, 1+K): column 0 the positive q.k, then q against each negative (columns of ``negatives``,
    (dim, K)), divided by the temperature T; ``exclude`` (N, K) bool masks negatives that are really
    positives. Always in float32, also under bf16 autocast. The label of every row is 0."""
    with torch.autocast(q.device.type, enabled=False):
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, negatives)
        if exclude is not None:
            l_neg = l_neg.masked_fill(exclude, float("-inf"))
        logits = torch.cat([l_pos, l_neg], dim=1) / T
    return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


class StoredKeys(NamedTuple):
    """A sample of a dictionary's stored keys, for the consistency monitor: each key, the training
    view it was encoded from, its age in steps, and the encoder and crop that made it."""

    keys: torch.Tensor  # (n, dim), L2-normalised
    view_ids: torch.Tensor  # (n,)
    ages: torch.Tensor  # (n,) steps since the key was stored
    encoder: nn.Module  # re-encodes the views now
    crop: str  # "query" or "key": which of the view's two crops the key was encoded from
