"""The memory bank (Wu et al., CVPR 2018, as the MoCo paper compares with it): one stored feature per
training image, negatives sampled from the bank.

There is no key encoder: the positive key of an image is its row of the bank, and each time the
image is seen its row moves towards the new query feature with the bank's own momentum (0.5 in Wu
et al.). The dictionary can be as large as the dataset, but a row was written when its image was
last seen, by the encoder of that step: the rows come from many past encoders (MoCo paper, Fig. 2b).
Only the query crop is encoded; the key crop of a batch is not used.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from transfer.pretrain import contrastive
from transfer.pretrain.shuffle_bn import concat_all_gather, is_distributed


class MemoryBank(nn.Module):
    def __init__(self, base_encoder, num_images, dim=128, K=4096, T=0.07, mlp=False, bn_splits=1, small_stem=False,
                 bank_m=0.5):
        """num_images: bank size (the training set's); K: negatives sampled per step; bank_m: the
        momentum of a row's refresh. The other arguments as ``MoCo``'s."""
        super().__init__()
        self.K, self.T, self.bank_m = K, T, bank_m
        self.encoder_q = contrastive.encoder(base_encoder, dim, bn_splits, small_stem)
        if mlp:
            contrastive.add_mlp_head(self.encoder_q)
        self.register_buffer("memory", F.normalize(torch.randn(num_images, dim), dim=1))
        # For the consistency monitor: the view that last wrote each row (-1: random init) and the
        # step it was written at (``step`` counts the bank's updates).
        self.register_buffer("memory_ids", torch.full((num_images,), -1, dtype=torch.long))
        self.register_buffer("memory_step", torch.zeros(num_images, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def rows(self, ids):
        """The bank row of each view id: its image (view ids are epoch * num_images + image)."""
        return ids % self.memory.shape[0]

    @torch.no_grad()
    def keys(self, im_k, ids):
        """The positive keys of a batch: the images' stored features."""
        return self.memory[self.rows(ids)]

    @torch.no_grad()
    def _sample_negatives(self):
        """K row indices, one draw for the whole global batch (as MoCo's queue is shared)."""
        idx = torch.randint(self.memory.shape[0], (self.K,), device=self.memory.device)
        if is_distributed():
            dist.broadcast(idx, src=0)
        return idx

    @torch.no_grad()
    def _update(self, q, ids):
        """Each seen image's row <- normalise(bank_m * row + (1 - bank_m) * its query feature)."""
        q, ids = concat_all_gather(q), concat_all_gather(ids)
        rows = self.rows(ids)
        self.memory[rows] = F.normalize(self.bank_m * self.memory[rows] + (1 - self.bank_m) * q, dim=1)
        self.step += 1
        self.memory_ids[rows] = ids
        self.memory_step[rows] = self.step

    def forward(self, im_q, im_k, ids):
        """(logits (N, 1+K) with the stored feature as the positive in column 0, labels zeros)."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        k = self.keys(im_k, ids)
        idx = self._sample_negatives()
        # An image is never its own negative (at small scale K samples often hit it).
        exclude = idx[None, :] == self.rows(ids)[:, None]
        logits, labels = contrastive.info_nce_logits(q, k, self.memory[idx].T, self.T, exclude)
        self._update(q.detach(), ids)
        return logits, labels

    @torch.no_grad()
    def stored_keys(self, max_keys, global_batch):
        """About ``max_keys`` rows written by training, evenly spread over their ages."""
        seen = (self.memory_ids >= 0).nonzero().squeeze(1)
        ages = self.step - self.memory_step[seen]
        n = min(len(seen), max_keys) // global_batch * global_batch
        by_age = ages.argsort(stable=True)  # rows of one training batch stay together
        picked = by_age[torch.linspace(0, len(seen) - 1, n, device=seen.device).round().long()] if n else by_age[:0]
        rows = seen[picked]
        return contrastive.StoredKeys(self.memory[rows], self.memory_ids[rows], ages[picked].cpu(), self.encoder_q,
                                      "query")
