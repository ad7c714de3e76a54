"""The dictionary mechanisms (transfer/pretrain/{moco,memory_bank,end_to_end}.py) and the collapse-proof
consistency meter (transfer/pretrain/monitors.py): each mechanism's negatives come from where it says."""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from transfer.pretrain import config, engine, mechanisms, monitors
from transfer.pretrain.augment import TwoCropDataset, moco_augmentation
from transfer.pretrain.end_to_end import EndToEnd
from transfer.pretrain.memory_bank import MemoryBank
from transfer.pretrain.moco import MoCo
from transfer.pretrain.shuffle_bn import SplitBatchNorm

from conftest import Tiny

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`




Independent = functools.partial(Tiny, batch_independent=True)


def images(n, size=8, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- memory bank


def test_a_memory_bank_row_is_the_momentum_blend_of_the_query_after_its_image_is_seen():
    torch.manual_seed(0)
    bank = MemoryBank(Independent, num_images=10, dim=8, K=6, bank_m=0.5)
    before = bank.memory.clone()
    ids = torch.tensor([13, 4, 7, 29])  # view ids: images 3, 4, 7, 9 (epoch * 10 + image)
    im = images(4)
    with torch.no_grad():
        q = F.normalize(bank.encoder_q(im), dim=1)
    bank(im, images(4, seed=1), ids)
    rows = ids % 10
    torch.testing.assert_close(bank.memory[rows], F.normalize(0.5 * before[rows] + 0.5 * q, dim=1), rtol=0, atol=1e-6)
    untouched = torch.tensor([0, 1, 2, 5, 6, 8])
    assert torch.equal(bank.memory[untouched], before[untouched])
    assert bank.memory_ids[rows].tolist() == ids.tolist() and (bank.memory_ids[untouched] == -1).all()
    assert int(bank.step) == 1 and bank.memory_step[rows].tolist() == [1] * 4


def test_memory_bank_positives_are_the_stored_rows_and_negatives_k_sampled_rows_never_the_image_itself():
    torch.manual_seed(0)
    bank = MemoryBank(Independent, num_images=6, dim=8, K=40, T=0.5)
    stored = bank.memory.clone()
    im, ids = images(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(7)
    logits, labels = bank(im, images(4, seed=1), ids)
    torch.manual_seed(7)
    idx = torch.randint(6, (40,))  # the draw forward() made
    with torch.no_grad():
        q = F.normalize(bank.encoder_q(im), dim=1)
    assert logits.shape == (4, 41) and labels.tolist() == [0] * 4
    torch.testing.assert_close(logits[:, 0], (q * stored[:4]).sum(1) / 0.5, rtol=0, atol=1e-5)
    own = idx[None, :] == ids[:, None]
    assert own.any() and torch.isinf(logits[:, 1:][own]).all()  # 40 draws from 6 rows hit each image
    torch.testing.assert_close(logits[:, 1:][~own], (q @ stored[idx].T / 0.5)[~own], rtol=0, atol=1e-5)


def test_memory_bank_has_no_key_encoder_and_trains_the_query_encoder():
    torch.manual_seed(0)
    bank = MemoryBank(Tiny, num_images=8, dim=8, K=8, bn_splits=2)
    logits, labels = bank(images(4), images(4, seed=1), torch.arange(4))
    F.cross_entropy(logits, labels).backward()
    assert [name for name, _ in bank.named_children()] == ["encoder_q"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.encoder_q.parameters())


# ----------------------------------------------------------------------------- end-to-end


def test_end_to_end_negatives_are_the_other_keys_of_the_batch_and_gradients_reach_the_key_branch():
    torch.manual_seed(0)
    model = EndToEnd(Independent, dim=8, T=0.5, shuffle_bn=False)
    im_q, im_k = images(4), images(4, seed=1).requires_grad_()
    logits, labels = model(im_q, im_k)
    with torch.no_grad():
        q, k = (F.normalize(model.encoder_q(x), dim=1) for x in (im_q, im_k))
    assert logits.shape == (4, 5) and labels.tolist() == [0] * 4
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.5, rtol=0, atol=1e-5)
    expected = (q @ k.T / 0.5).masked_fill(torch.eye(4, dtype=torch.bool), float("-inf"))
    torch.testing.assert_close(logits[:, 1:], expected, rtol=0, atol=1e-5)
    F.cross_entropy(logits, labels).backward()
    assert im_k.grad is not None and im_k.grad.abs().sum() > 0  # through the keys, not only the queries


def _end_to_end_rank(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        model = EndToEnd(Independent, dim=8, T=0.5, shuffle_bn=True)
        im_q, im_k = images(8)[4 * rank:4 * rank + 4], images(8, seed=1)[4 * rank:4 * rank + 4]
        logits, labels = model(im_q, im_k)
        F.cross_entropy(logits, labels).backward()
        grads = [p.grad for p in model.parameters()]
        torch.save({"logits": logits.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_end_to_end_negatives_span_the_global_batch_of_all_processes_with_gradients(tmp_path):
    mp.spawn(_end_to_end_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    single = EndToEnd(Independent, dim=8, T=0.5, shuffle_bn=False)  # one process, the whole batch of 8
    logits, labels = single(images(8), images(8, seed=1))
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits.detach(), rtol=0, atol=1e-5)
    F.cross_entropy(logits, labels).backward()
    # Each rank's loss is the mean over its 4 queries; the gradients of both ranks together are
    # the whole batch's (twice the mean over 8), keys of one rank receiving the other's gradient.
    for p, g0, g1 in zip(single.parameters(), ranks[0]["grads"], ranks[1]["grads"]):
        torch.testing.assert_close(g0 + g1, 2 * p.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- shuffle-BN on and off


def test_without_shuffle_bn_query_and_key_share_batch_norm_statistics():
    cfg = config.load_config("v2", arch="resnet18", moco_k=256, shuffle_bn=False)  # v2: bn_splits null
    assert engine.bn_groups(cfg, world_size=1) == 1  # no split either: plain BatchNorm over the batch
    assert engine.bn_groups(config.override(cfg, shuffle_bn=True), world_size=1) == 8
    model = mechanisms.build(cfg, engine.bn_groups(cfg, 1), num_images=32)
    assert not any(isinstance(m, SplitBatchNorm) for m in model.modules())

    torch.manual_seed(0)
    im = images(8)
    off = MoCo(Tiny, dim=8, K=16, m=0.0, T=1.0, shuffle_bn=False)
    rng = torch.get_rng_state()
    logits, _ = off(im, im)
    assert torch.equal(torch.get_rng_state(), rng)  # no shuffle drawn
    # m = 0: the key encoder is the query encoder; the same batch in the same BN: k == q exactly
    torch.testing.assert_close(logits[:, 0], torch.ones(8), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    on = MoCo(Tiny, dim=8, K=16, m=0.0, T=1.0, shuffle_bn=True, bn_splits=2)
    logits, _ = on(im, im)
    assert (logits[:, 0] < 1 - 1e-4).any()  # the key sat in another BN group than its query


# ----------------------------------------------------------------------------- the builder


def test_the_builder_makes_each_mechanism_from_the_settings():
    built = {}
    for name, cls in (("moco", MoCo), ("memory_bank", MemoryBank), ("end_to_end", EndToEnd)):
        built[name] = mechanisms.build(config.load_config("ablation_demo", mechanism=name, small_stem=True), 1,
                                       num_images=300)
        assert type(built[name]) is cls
        assert built[name].encoder_q.conv1.kernel_size == (3, 3)
        assert isinstance(built[name].encoder_q.maxpool, nn.Identity)
    assert built["moco"].queue.shape == (128, 256) and built["memory_bank"].memory.shape == (300, 128)


# ----------------------------------------------------------------------------- the consistency meter


def test_the_consistency_meter_sees_collapse_that_the_raw_cosine_misses():
    torch.manual_seed(0)
    n, images_ = 64, torch.arange(64)
    distinct = F.normalize(torch.randn(n, 32), dim=1)
    reencoded = F.normalize(distinct + 0.3 * torch.randn(n, 32) / 32 ** 0.5, dim=1)  # a little moved, still distinct
    good, spread_good = monitors.consistency_scores(distinct, reencoded, images_)
    common = torch.randn(32)
    stored = F.normalize(common + 0.01 * torch.randn(n, 32), dim=1)
    reencoded = F.normalize(common + 0.01 * torch.randn(n, 32), dim=1)  # all alike: what collapse looks like
    collapsed, spread_collapsed = monitors.consistency_scores(stored, reencoded, images_)
    assert collapsed["cosine"].mean() > good["cosine"].mean()  # the raw cosine prefers the collapsed run...
    assert collapsed["margin"].mean() < 0.01 < 0.5 < good["margin"].mean()  # ...the meter does not
    assert good["retrieved"].all() and collapsed["retrieved"].float().mean() < 0.2
    assert spread_collapsed > 0.99 and abs(spread_good) < 0.1


def test_the_consistency_fall_is_the_newest_quarter_of_keys_minus_the_oldest_and_zero_for_keys_of_one_age():
    import pandas as pd

    # 8 keys: ages 0..7 given in shuffled order, margins falling with age (the oldest rotted)
    ages = [5, 0, 7, 2, 1, 6, 3, 4]
    rows = pd.DataFrame({"age_steps": ages, "margin": [0.5 - 0.1 * a for a in ages]})
    newest, oldest = (0.5 + 0.4) / 2, (0.5 - 0.6 + 0.5 - 0.7) / 2  # ages 0, 1 and ages 6, 7
    assert monitors.consistency_fall(rows) == pytest.approx(newest - oldest)
    assert monitors.consistency_fall(rows.assign(margin=0.3)) == 0  # old keys as consistent as new ones
    same_age = pd.DataFrame({"age_steps": [0] * 8, "margin": [0.9, 0.1] * 4})  # end-to-end: encoded now
    assert monitors.consistency_fall(same_age) == 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, colour_image_folder):
    root = colour_image_folder(tmp_path_factory.mktemp("images"), per_class=8, val_per_class=1)
    return TwoCropDataset(root / "train", moco_augmentation(32, aug_plus=True), seed=0)  # 24 images


def test_the_memory_bank_is_measured_against_its_rows_by_age_and_end_to_end_is_consistent_by_construction(dataset):
    torch.manual_seed(0)
    bank = MemoryBank(torchvision.models.resnet18, num_images=len(dataset), dim=16, K=8)
    optimizer = torch.optim.SGD(bank.parameters(), 0.5)
    for step in range(3):  # three batches of 8 views: every image seen once, one step apart
        batch = [dataset[i] for i in range(8 * step, 8 * step + 8)]
        im_q, im_k = (torch.stack([b[j] for b in batch]) for j in (0, 1))
        logits, labels = bank(im_q, im_k, torch.arange(8 * step, 8 * step + 8))
        optimizer.zero_grad(), F.cross_entropy(logits, labels).backward(), optimizer.step()
    with monitors.untouched(bank, torch.device("cpu")):
        ages, scores, spread = monitors.dictionary_consistency(bank, dataset, 8, 8, torch.device("cpu"), max_keys=24)
    assert sorted(set(ages.tolist())) == [0, 1, 2] and len(ages) == 24
    assert scores["cosine"].max() < 1  # a row blends old and new features; the encoder moved on
    assert 0 <= scores["retrieved"].float().mean() <= 1 and -1 <= spread <= 1

    e2e = EndToEnd(torchvision.models.resnet18, dim=16)
    with monitors.untouched(e2e, torch.device("cpu")):
        ages, scores, spread = monitors.dictionary_consistency(e2e, dataset, 8, 8, torch.device("cpu"), max_keys=16)
    assert ages.tolist() == [0] * 16 and (scores["cosine"] > 1 - 1e-5).all()
    # the keys are their own re-encodings: the margin is 1 minus the mean cosine between different images
    assert scores["margin"].mean().item() == pytest.approx(1 - spread, abs=1e-5)
