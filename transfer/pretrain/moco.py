"""MoCo (He et al., CVPR 2020): a query encoder, a momentum key encoder, a queue of negative keys.

Same structure and state-dict names as the official ``moco/builder.py`` (``encoder_q``,
``encoder_k``, ``queue`` of shape (dim, K), ``queue_ptr``), so official tools read our checkpoints.
The keys come from a slowly moving copy of the query encoder, so the queue's keys, made by the
encoders of the last K / batch steps, stay comparable with each other (a consistent dictionary).
Shuffle-BN also works on ONE device here (``shuffle_bn.py``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfer.pretrain import contrastive
from transfer.pretrain.shuffle_bn import concat_all_gather


class MoCo(nn.Module):
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, bn_splits=1, shuffle_bn=True,
                 small_stem=False):
        """base_encoder: a torchvision-style constructor taking ``num_classes`` and ``norm_layer``.
        dim: feature dimension; K: queue size; m: key-encoder momentum; T: softmax temperature;
        mlp: 2-layer MLP head (MoCo v2); bn_splits: BatchNorm groups per process; shuffle_bn: shuffle
        the key batch (``shuffle_bn.py``); small_stem: the stem for 32-96 px images.
        """
        super().__init__()
        self.K, self.m, self.T, self.shuffle_bn = K, m, T, shuffle_bn
        self.encoder_q = contrastive.encoder(base_encoder, dim, bn_splits, small_stem)
        self.encoder_k = contrastive.encoder(base_encoder, dim, bn_splits, small_stem)
        if mlp:  # after both encoders: the random draws in the official code's order
            contrastive.add_mlp_head(self.encoder_q)
            contrastive.add_mlp_head(self.encoder_k)

        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Which training view each queued key came from (-1: random init); the dictionary
        # consistency monitor re-encodes these views. Not in the official layout, ignored by it.
        self.register_buffer("queue_ids", torch.full((K,), -1, dtype=torch.long))
        self._host_ptr = None  # queue_ptr as a Python int, once read

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_ptr = None  # queue_ptr was just replaced

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        params_q = [p.data for p in self.encoder_q.parameters()]
        params_k = [p.data for p in self.encoder_k.parameters()]
        torch._foreach_mul_(params_k, self.m)  # one kernel per few tensors, not two per parameter
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys, ids=None):
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        if self.K % batch_size:
            raise ValueError(f"queue size K={self.K} is not a multiple of the global batch {batch_size}")
        # The pointer is mirrored on the host: reading the buffer every step would wait for the GPU.
        ptr = self._host_ptr if self._host_ptr is not None else int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch_size] = keys.T.to(self.queue.dtype)
        if ids is not None:
            self.queue_ids[ptr:ptr + batch_size] = concat_all_gather(ids)
        self._host_ptr = (ptr + batch_size) % self.K
        self.queue_ptr.fill_(self._host_ptr)

    @torch.no_grad()
    def keys(self, im_k, ids=None):
        """The positive keys of a batch: the momentum encoder's, through shuffle-BN."""
        return contrastive.encode_keys(self.encoder_k, im_k, self.shuffle_bn)

    def forward(self, im_q, im_k, ids=None):
        """Returns (logits, labels): logits (N, 1+K) with the positive in column 0, labels zeros.

        ids: optional (N,) view ids of the key images, stored beside the queue.
        """
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self.keys(im_k)
        logits, labels = contrastive.info_nce_logits(q, k, self.queue.clone().detach(), self.T)
        self._dequeue_and_enqueue(k, ids)
        return logits, labels

    @torch.no_grad()
    def stored_keys(self, max_keys, global_batch):
        """About ``max_keys`` queued keys, as whole enqueued batches evenly spread over their ages
        (re-encoded together, they see BatchNorm batches like the ones that made them)."""
        num_batches = self.K // global_batch
        ages = torch.linspace(0, num_batches - 1, min(num_batches, max(1, max_keys // global_batch))).round().long()
        newest = (int(self.queue_ptr) - global_batch) % self.K  # first slot of the last enqueued batch
        slots, key_ages = [], []
        for age in ages.tolist():
            start = (newest - age * global_batch) % self.K
            batch = torch.arange(start, start + global_batch, device=self.queue.device)
            if (self.queue_ids[batch] >= 0).all():  # not slots still holding the random initial keys
                slots.append(batch)
                key_ages.append(torch.full((global_batch,), age))
        slots = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long, device=self.queue.device)
        ages = torch.cat(key_ages) if key_ages else torch.empty(0, dtype=torch.long)
        return contrastive.StoredKeys(self.queue[:, slots].T, self.queue_ids[slots], ages, self.encoder_k, "key")
