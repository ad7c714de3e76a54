"""The MoCo method (transfer/pretrain/moco.py): queue, momentum update, shuffle-BN, split-BN
(transfer/pretrain/shuffle_bn.py), InfoNCE."""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from transfer.pretrain.moco import MoCo
from transfer.pretrain.shuffle_bn import (
    SplitBatchNorm,
    batch_shuffle,
    batch_unshuffle,
    split_batch_norm_formula,
    split_batch_norm_reshape,
)

from conftest import Tiny


def images(n, size=8, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_queue_is_fifo_of_newest_keys():
    torch.manual_seed(0)
    model = MoCo(functools.partial(Tiny, batch_independent=True), dim=16, K=12, m=0.9)
    keys = []
    for step in range(5):
        im = images(4, seed=step)
        model(im, im, torch.arange(step * 4, step * 4 + 4))
        with torch.no_grad():  # the keys of this step: the key encoder as forward() left it, unshuffled
            keys.append(F.normalize(model.encoder_k(im), dim=1))
        # The queue holds the newest K = 3 batches, FIFO: batch b in slots 4b mod 12 .. +4.
        for b in range(max(0, step - 2), step + 1):
            slot = (4 * b) % 12
            torch.testing.assert_close(model.queue[:, slot:slot + 4].T, keys[b], rtol=0, atol=1e-6)
            assert model.queue_ids[slot:slot + 4].tolist() == list(range(4 * b, 4 * b + 4))
        assert int(model.queue_ptr) == (4 * (step + 1)) % 12
    assert sorted(model.queue_ids.tolist()) == list(range(8, 20))  # batches 2, 3, 4


def test_queue_size_must_be_multiple_of_batch():
    model = MoCo(functools.partial(Tiny, batch_independent=True), dim=8, K=10)
    with pytest.raises(ValueError, match="K=10 is not a multiple of the global batch 4"):
        model(images(4), images(4, seed=1))


def test_logits_positive_first_and_temperature():
    torch.manual_seed(0)
    model = MoCo(functools.partial(Tiny, batch_independent=True), dim=8, K=16, m=0.0, T=0.5)
    queue = model.queue.clone()
    im = images(4)
    logits, labels = model(im, im)
    with torch.no_grad():
        q = F.normalize(model.encoder_q(im), dim=1)
    # m=0: the key encoder is the query encoder, same images: the positive logit is 1 / T.
    torch.testing.assert_close(logits[:, 0], torch.full((4,), 2.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 1:], q @ queue / 0.5, rtol=0, atol=1e-5)
    assert logits.shape == (4, 17) and labels.tolist() == [0, 0, 0, 0]


def test_momentum_update_formula_and_extremes():
    torch.manual_seed(0)
    model = MoCo(Tiny, dim=8, K=8, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for pq, pk, new in zip(q, k, model.encoder_k.parameters()):
        torch.testing.assert_close(new, 0.9 * pk + 0.1 * pq)
    model.m = 1.0
    frozen = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.encoder_k.parameters()))
    model.m = 0.0
    model._momentum_update_key_encoder()
    assert all(torch.equal(a, b) for a, b in zip(model.encoder_q.parameters(), model.encoder_k.parameters()))


def test_no_gradient_reaches_key_encoder():
    torch.manual_seed(0)
    model = MoCo(Tiny, dim=8, K=16, bn_splits=2)
    logits, labels = model(images(4), images(4, seed=1))
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())


def test_shuffle_then_unshuffle_is_identity():
    torch.manual_seed(0)
    x = torch.arange(16.0).view(16, 1)
    shuffled, idx_unshuffle = batch_shuffle(x)
    assert not torch.equal(shuffled, x) and sorted(shuffled.flatten().tolist()) == x.flatten().tolist()
    assert torch.equal(batch_unshuffle(shuffled, idx_unshuffle), x)


def test_split_bn_normalises_each_sub_batch():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=4)
    x = torch.randn(8, 3, 5, 5) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)  # groups with different scales
    out = bn(x)
    whole = F.batch_norm(x, None, None, training=True)
    for g in range(4):  # group g: samples g and g + 4
        group = x[g::4]
        expected = F.batch_norm(group, None, None, training=True)
        torch.testing.assert_close(out[g::4], expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out[g::4], whole[g::4], atol=1e-2)
    # Running statistics: the mean over groups of each group's update.
    group_means = torch.stack([x[g::4].mean((0, 2, 3)) for g in range(4)])
    torch.testing.assert_close(bn.running_mean, 0.1 * group_means.mean(0))
    # Evaluation is plain BatchNorm with those statistics, and the state dict is BatchNorm2d's.
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    torch.testing.assert_close(bn(x), plain(x))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_bn_formula_equals_reshape(memory_format):
    """The compiled path (explicit formula) and the eager path (one batch_norm on a reshaped view)
    give the same output, gradients and statistics, in both memory formats."""
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 5, 3) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)).to(memory_format=memory_format)
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    results = []
    for split_bn in (split_batch_norm_reshape, split_batch_norm_formula):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, weight, bias))
        out, mean, var = split_bn(xi, wi, bi, 4, 1e-5)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        results.append((out, mean, var, xi.grad, wi.grad, bi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out, mean, var = results[0][:3]
    torch.testing.assert_close(mean, torch.stack([x[g::4].mean((0, 2, 3)) for g in range(4)]).mean(0))
    torch.testing.assert_close(var, torch.stack([x[g::4].var((0, 2, 3)) for g in range(4)]).mean(0))


def test_moco_uses_split_bn_in_both_encoders():
    import torchvision

    model = MoCo(torchvision.models.resnet18, dim=16, K=32, bn_splits=4)
    for encoder in (model.encoder_q, model.encoder_k):
        norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 4 for m in norms)
    assert not any(isinstance(m, SplitBatchNorm) for m in MoCo(torchvision.models.resnet18, 16, 32).modules())


# ----------------------------------------------------------------------------- two processes over gloo


def _two_rank_worker(rank, init_file, out_dir, local_batch):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same model on both ranks
        model = MoCo(functools.partial(Tiny, batch_independent=True), dim=8, K=4 * local_batch, m=0.99)
        seen = []
        model.encoder_k.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, 0, 0, 0].clone()))
        # Image j of rank r is constant r * 100 + j: the key encoder's input tells where it came from.
        tags = rank * 100 + torch.arange(local_batch, dtype=torch.float32)
        im = tags.view(-1, 1, 1, 1).expand(-1, 3, 6, 6).contiguous()
        ids = tags.long()
        torch.manual_seed(1 + rank)  # different RNG per rank: rank 0's permutation must win anyway
        model(im, im, ids)
        with torch.no_grad():
            own_keys = F.normalize(model.encoder_k(im), dim=1)
        x = torch.randn(local_batch, 5, generator=torch.Generator().manual_seed(rank))
        shuffled, idx = batch_shuffle(x)
        roundtrip = batch_unshuffle(shuffled, idx)
        torch.save({"seen": seen[0], "own_keys": own_keys, "queue": model.queue, "queue_ids": model.queue_ids,
                    "ptr": model.queue_ptr, "x": x, "roundtrip": roundtrip}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_shuffle_bn_and_gathered_queue(tmp_path):
    local_batch = 8
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), local_batch), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    everything = sorted(torch.cat([r0["seen"], r1["seen"]]).tolist())
    assert everything == sorted([float(r * 100 + j) for r in (0, 1) for j in range(local_batch)])
    for r in (r0, r1):  # each rank's key batch (what its BatchNorm normalises together) mixes both ranks
        assert (r["seen"] < 100).any() and (r["seen"] >= 100).any()
    # Both ranks enqueue the same keys: rank 0's batch then rank 1's, each key back with its own image.
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["queue_ids"], r1["queue_ids"])
    assert int(r0["ptr"]) == 2 * local_batch
    torch.testing.assert_close(r0["queue"][:, :2 * local_batch].T, torch.cat([r0["own_keys"], r1["own_keys"]]),
                               rtol=0, atol=1e-6)
    assert r0["queue_ids"][:2 * local_batch].tolist() == [r * 100 + j for r in (0, 1) for j in range(local_batch)]
    for r in (r0, r1):
        assert torch.equal(r["roundtrip"], r["x"])
