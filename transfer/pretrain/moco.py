"""MoCo (He et al., CVPR 2020): a query encoder, a momentum key encoder, a queue of negative keys.

Same structure and state-dict names as the official ``moco/builder.py`` (``encoder_q``,
``encoder_k``, ``queue`` of shape (dim, K), ``queue_ptr``), so official tools read our checkpoints.
One difference: shuffle-BN also works on ONE device. BatchNorm statistics computed over the whole
key batch leak which key is the positive; the official single-GPU run has that leak. With
``bn_splits > 1`` every BatchNorm normalises ``bn_splits`` sub-batches separately (as if they were
on that many GPUs) and the key batch is shuffled before, so a query and its key sit in different
BN groups. Under torch.distributed the official cross-rank shuffle does the same job.
"""
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per sub-batch: sample n is in group n % splits.

    Same parameters and buffers as BatchNorm2d (checkpoints are interchangeable); the running
    statistics are the mean over the groups; evaluation is plain BatchNorm.
    """

    def __init__(self, num_features, num_splits=8, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.num_splits} BatchNorm groups (--bn-splits)")
        # Under torch.compile the explicit formula fuses into a couple of kernels in any memory
        # format; in eager mode one cuDNN call on a reshaped view is fastest (a view only for
        # contiguous NCHW: channels_last pays a copy, so eager split-BN runs best without it).
        split_bn = split_batch_norm_formula if torch.compiler.is_compiling() else split_batch_norm_reshape
        out, mean, var = split_bn(x, self.weight, self.bias, self.num_splits, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        return out


def split_batch_norm_reshape(x, weight, bias, s, eps):
    """(normalised x, mean over groups of the group means, of the unbiased group variances).

    (N, C, H, W) -> (N/s, s*C, H, W): channel block j holds the samples n with n % s == j, so one
    batch_norm call normalises every group with its own statistics.
    """
    n, c, h, w = x.shape
    mean, var = x.new_zeros(s * c, dtype=torch.float32), x.new_ones(s * c, dtype=torch.float32)
    # momentum 1: the "running" buffers receive exactly this batch's per-group statistics
    out = F.batch_norm(x.reshape(n // s, s * c, h, w), mean, var, weight.repeat(s), bias.repeat(s),
                       True, 1.0, eps).reshape(n, c, h, w)
    return out, mean.view(s, c).mean(0), var.view(s, c).mean(0)


def split_batch_norm_formula(x, weight, bias, s, eps):
    """The same as ``split_batch_norm_reshape``, written out (statistics in float32)."""
    n, c, h, w = x.shape
    groups = x.view(n // s, s, c, h, w)  # a view in either memory format: N is the outer dimension
    var, mean = torch.var_mean(groups.float(), dim=(0, 3, 4), unbiased=False, keepdim=True)
    scale = weight.view(1, 1, c, 1, 1) * torch.rsqrt(var + eps)
    out = groups * scale.to(x.dtype) + (bias.view(1, 1, c, 1, 1) - mean * scale).to(x.dtype)
    count = n // s * h * w
    return out.view(n, c, h, w), mean.view(s, c).mean(0), (var.view(s, c) * count / (count - 1)).mean(0)


def norm_layer(bn_splits):
    """The BatchNorm class for the encoders: split statistics on one device, plain per process."""
    if bn_splits <= 1:
        return nn.BatchNorm2d
    return functools.partial(SplitBatchNorm, num_splits=bn_splits)


class MoCo(nn.Module):
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, bn_splits=1):
        """base_encoder: a torchvision-style constructor taking ``num_classes`` and ``norm_layer``.
        dim: feature dimension; K: queue size; m: key-encoder momentum; T: softmax temperature;
        mlp: 2-layer MLP head (MoCo v2); bn_splits: BatchNorm groups per process (see module doc).
        """
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = base_encoder(num_classes=dim, norm_layer=norm_layer(bn_splits))
        self.encoder_k = base_encoder(num_classes=dim, norm_layer=norm_layer(bn_splits))
        if mlp:  # fc -> Linear, ReLU, fc: keys fc.0 / fc.2 as in the official code
            for encoder in (self.encoder_q, self.encoder_k):
                hidden = encoder.fc.weight.shape[1]
                encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)

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
    def _batch_shuffle(self, x):
        """Shuffle the key batch; returns it and the index that undoes the shuffle (across ranks if distributed)."""
        if not is_distributed():
            idx_shuffle = torch.randperm(x.shape[0], device=x.device)
            return x[idx_shuffle], torch.argsort(idx_shuffle)
        x_gather = concat_all_gather(x)
        batch_size_all = x_gather.shape[0]
        idx_shuffle = torch.randperm(batch_size_all, device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # every rank applies rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        num_local = batch_size_all // dist.get_world_size()
        idx_this = idx_shuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        assert idx_this.numel() == num_local
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x, idx_unshuffle):
        if not is_distributed():
            return x[idx_unshuffle]
        x_gather = concat_all_gather(x)
        idx_this = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        return x_gather[idx_this]

    def forward(self, im_q, im_k, ids=None):
        """Returns (logits, labels): logits (N, 1+K) with the positive in column 0, labels zeros.

        ids: optional (N,) view ids of the key images, stored beside the queue.
        """
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            k = self._batch_unshuffle(k, idx_unshuffle)

        with torch.autocast(q.device.type, enabled=False):  # InfoNCE logits in float32, also under bf16 autocast
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k, ids)
        return logits, labels


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate ``tensor`` from every rank in rank order (no gradient); identity on one process."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)
