"""End-to-end (the MoCo paper's Fig. 2a; SimCLR's dictionary): the keys are the current batch, encoded
by the query encoder itself, with gradients through both branches.

The dictionary is perfectly consistent (every key comes from today's encoder) but only as large as
the global batch: each query's negatives are the other images' keys of the batch, gathered from
every process with their gradients. MoCo's queue and momentum encoder exist to escape that limit.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfer.pretrain import contrastive
from transfer.pretrain.shuffle_bn import gather_with_grad, is_distributed


class EndToEnd(nn.Module):
    def __init__(self, base_encoder, dim=128, T=0.07, mlp=False, bn_splits=1, shuffle_bn=True, small_stem=False):
        """The arguments as ``MoCo``'s; there is no K: the negatives are the global batch."""
        super().__init__()
        self.T, self.shuffle_bn = T, shuffle_bn
        self.encoder_q = contrastive.encoder(base_encoder, dim, bn_splits, small_stem)
        if mlp:
            contrastive.add_mlp_head(self.encoder_q)

    def keys(self, im_k, ids=None):
        """The positive keys of a batch: the query encoder's, through shuffle-BN, with gradient."""
        return contrastive.encode_keys(self.encoder_q, im_k, self.shuffle_bn)

    def forward(self, im_q, im_k, ids=None):
        """(logits (N, 1+B) with the positive in column 0, then every key of the global batch of B with
        the image's own masked out, labels zeros)."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        k = self.keys(im_k)
        keys = gather_with_grad(k)
        offset = torch.distributed.get_rank() * q.shape[0] if is_distributed() else 0
        exclude = torch.zeros(q.shape[0], keys.shape[0], dtype=torch.bool, device=q.device)
        own = torch.arange(q.shape[0], device=q.device)
        exclude[own, offset + own] = True
        return contrastive.info_nce_logits(q, k, keys.T, self.T, exclude)

    @torch.no_grad()
    def stored_keys(self, max_keys, global_batch):
        """None: nothing is stored; every key is encoded at the step that uses it (consistency 1)."""
        return None
