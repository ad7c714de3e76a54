"""Shuffle-BN: keep a query and its positive key out of the same BatchNorm statistics.

BatchNorm statistics computed over a batch leak which key is the positive: the queries of a batch
and their keys are the same images, so the model can match them through the batch statistics
instead of learning a representation (MoCo paper, Sec. 3.3). The official code shuffles the key
batch across GPUs before the key encoder and unshuffles it after. On ONE device that shuffle does
nothing, so here every BatchNorm can also normalise ``num_splits`` sub-batches separately
(``SplitBatchNorm``, as if they were on that many GPUs): with the key batch shuffled first, a query
and its key sit in different BN groups. Under torch.distributed the cross-rank shuffle does the job.
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
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.num_splits} BatchNorm groups "
                             "(--bn-splits)")
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


# ----------------------------------------------------------------------------- the key-batch shuffle


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


def gather_with_grad(tensor):
    """``concat_all_gather`` through which gradients flow back to the rank that made each row
    (end-to-end: a key is a negative of every rank's queries)."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return concat_all_gather(tensor)  # the forward is the plain gather; the backward below routes gradients

    @staticmethod
    def backward(ctx, grad):
        # This rank's rows receive the sum of every rank's gradient for them (a copy: all_reduce
        # works in place, and a contiguous one: the gradient of keys.T is a transposed view).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


@torch.no_grad()
def batch_shuffle(x):
    """Shuffle the batch; returns it and the index that undoes the shuffle (across ranks if distributed)."""
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


def batch_unshuffle(x, idx_unshuffle):
    """Undo ``batch_shuffle`` on the encoded batch (differentiable when ``x`` needs a gradient)."""
    if not is_distributed():
        return x[idx_unshuffle]
    x_gather = gather_with_grad(x) if x.requires_grad else concat_all_gather(x)
    idx_this = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
    return x_gather[idx_this]
