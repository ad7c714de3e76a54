"""The batched (GPU) augmentation backend, checked on CPU tensors against torchvision's CPU path:
the same parameter distributions, the same pixel operations, and a loader that yields what the
training loop expects."""
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import decode_jpeg

from transfer.pretrain import augment, benchmark, jpeg_data
from transfer.pretrain import gpu_augment as G

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance between two 1-D samples."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)))


def rate_ok(observed, p, n):
    """Within 4.5 binomial standard deviations of p."""
    return abs(observed - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9


# ----------------------------------------------------------------------------- parameter distributions


@pytest.mark.parametrize("size", [(375, 500), (500, 333), (40, 400)])  # the last one often falls back
def test_crop_boxes_follow_torchvision_distribution(size):
    h, w = size
    n = 3000
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(224, scale=(0.2, 1.0))
    ref = np.array([rrc.get_params(torch.empty(3, h, w), rrc.scale, rrc.ratio) for _ in range(n)], float)
    ours = G.RandomResizedCrop(224, scale=(0.2, 1.0)).sample(
        torch.full((n,), h), torch.full((n,), w), torch.Generator().manual_seed(1)).numpy().astype(float)
    for boxes in (ref, ours):  # every box inside the image
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= h).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()
    features = {
        "area": lambda b: b[:, 2] * b[:, 3] / (h * w),
        "log_aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
        "top": lambda b: b[:, 0] / h,
        "left": lambda b: b[:, 1] / w,
    }
    for name, f in features.items():
        assert ks_statistic(f(ref), f(ours)) < 0.05, name
    # The central fallback crop: same rate (and none where every attempt fits easily).
    def central(b):
        return np.mean((b[:, 0] == (h - b[:, 2]) // 2) & (b[:, 1] == (w - b[:, 3]) // 2)
                       & (b[:, 2] * b[:, 3] > 0.9 * h * w))

    assert abs(central(ref) - central(ours)) < 0.04


def test_jitter_parameters_follow_torchvision_distribution():
    n = 6000
    torch.manual_seed(0)
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    ref_orders, ref_factors = [], []
    for _ in range(n):
        order, b, c, s, h = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        ref_orders.append(tuple(order.tolist()))
        ref_factors.append((b, c, s, h))
    ref_factors = np.array(ref_factors)
    ours = G.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, p=0.8).sample(
        n, torch.Generator().manual_seed(2))
    factors = ours["factors"].numpy()
    for j in range(4):
        assert ks_statistic(ref_factors[:, j], factors[:, j]) < 0.04
        lo, hi = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)[j]
        assert factors[:, j].min() >= lo and factors[:, j].max() <= hi
    # Orders: each of the 24 permutations about equally often, in both paths.
    for orders in (ref_orders, [tuple(o) for o in ours["order"].tolist()]):
        counts = np.array([orders.count(p) for p in set(orders)])
        assert len(counts) == 24 and rate_ok(counts.min() / n, 1 / 24, n) and rate_ok(counts.max() / n, 1 / 24, n)
    assert rate_ok(ours["applied"].float().mean().item(), 0.8, n)


def test_pipeline_probabilities_and_blur_sigma_match_moco_v2():
    aug = G.GPUAugment.from_transform(augment.moco_augmentation(224, aug_plus=True))
    n = 4000
    _, params = aug.sample(torch.full((n // 2,), 300), torch.full((n // 2,), 400), 2, torch.Generator().manual_seed(3))
    by_type = {type(op).__name__: p for op, p in zip(aug.ops, params)}
    assert rate_ok(by_type["ColorJitter"]["applied"].float().mean().item(), 0.8, n)
    assert rate_ok(by_type["RandomGrayscale"]["applied"].float().mean().item(), 0.2, n)
    assert rate_ok(by_type["GaussianBlur"]["applied"].float().mean().item(), 0.5, n)
    assert rate_ok(by_type["RandomHorizontalFlip"]["applied"].float().mean().item(), 0.5, n)
    # MoCo's PIL blur draws sigma = lo + (hi - lo) * rand; compare with its draws.
    torch.manual_seed(0)
    ref = [0.1 + 1.9 * torch.rand(()).item() for _ in range(n)]
    assert ks_statistic(ref, by_type["GaussianBlur"]["sigma"].numpy()) < 0.04


def test_translation_of_both_presets():
    v2 = [type(op).__name__ for op in G.GPUAugment.from_transform(augment.moco_augmentation(224, True)).ops]
    assert v2 == ["ColorJitter", "RandomGrayscale", "GaussianBlur", "RandomHorizontalFlip", "Normalize"]
    v1 = G.GPUAugment.from_transform(augment.moco_augmentation(224, False))
    assert [type(op).__name__ for op in v1.ops] == ["RandomGrayscale", "ColorJitter", "RandomHorizontalFlip",
                                                    "Normalize"]
    assert v1.ops[1].p == 1.0 and v1.ops[1].ranges[3] == pytest.approx((-0.4, 0.4))
    with pytest.raises(ValueError, match="RandomRotation"):
        G.GPUAugment.from_transform(T.Compose([T.RandomResizedCrop(8), T.RandomRotation(10)]))


# ----------------------------------------------------------------------------- pixel operations


def test_colour_operations_equal_torchvision_functionals():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 12, 10)
    x[0] = x[0, :1]  # a gray image (hue undefined)
    f = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.75])
    h = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.4])
    def per(v):
        return v.view(-1, 1, 1, 1)

    for ours, theirs, factors in [
        (G.ColorJitter.brightness, TF.adjust_brightness, f),
        (G.ColorJitter.contrast, TF.adjust_contrast, f),
        (G.ColorJitter.saturation, TF.adjust_saturation, f),
        (G.ColorJitter.hue, TF.adjust_hue, h),
    ]:
        got = ours(x.clone(), per(factors))
        want = torch.stack([theirs(x[i], float(factors[i])) for i in range(len(x))])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=ours.__name__)


def test_jitter_applies_each_samples_own_order():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 8, 8)
    jitter = G.ColorJitter((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1), p=1.0)
    params = jitter.sample(5, torch.Generator().manual_seed(4))
    params["applied"][3] = False
    got = jitter.apply(x.clone(), params)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(5):
        want = x[i]
        if params["applied"][i]:
            for op in params["order"][i].tolist():
                want = fns[op](want, float(params["factors"][i, op]))
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=0)


def test_grayscale_blur_flip_equal_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 20)
    mask = torch.tensor([True, False, True, False])
    got = G.RandomGrayscale().apply(x.clone(), {"applied": mask})
    for i in range(4):
        want = TF.rgb_to_grayscale(x[i], 3) if mask[i] else x[i]
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=0)

    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0], dtype=torch.float64)
    blur = G.GaussianBlur((0.1, 2.0))
    got = blur.apply(x.clone(), {"applied": torch.ones(4, dtype=torch.bool), "sigma": sigma})
    for i in range(4):
        want = TF.gaussian_blur(x[i], [blur.kernel_size] * 2, [float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)

    got = G.RandomHorizontalFlip().apply(x.clone(), {"applied": mask})
    for i in range(4):
        torch.testing.assert_close(got[i], TF.hflip(x[i]) if mask[i] else x[i])


def test_resized_crop_matches_torchvision():
    torch.manual_seed(0)
    # A smooth image, so that resampling filters agree up to small differences.
    img = TF.resize(torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8), [60, 80], antialias=True)
    boxes = torch.tensor([[5, 7, 30, 40], [0, 0, 60, 80], [10, 20, 8, 8]])  # shrink, shrink, enlarge
    crop = G.RandomResizedCrop(16)
    got = crop.apply([img], boxes, views=3)
    for v, (top, left, h, w) in enumerate(boxes.tolist()):
        want = TF.resized_crop(img.float() / 255, top, left, h, w, [16, 16], antialias=True)
        assert (got[v] - want).abs().mean() < 0.01
    # Enlarging is plain bilinear interpolation (align_corners=False) in both; only the outermost
    # output pixels differ: roi_align blends in the real neighbours outside the box where
    # cropping first repeats the box's edge.
    want = TF.resized_crop(img.float() / 255, 10, 20, 8, 8, [16, 16], antialias=False)
    torch.testing.assert_close(got[2][:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_full_pipeline_output_statistics_match_cpu_path():
    """Per-crop brightness and colourfulness over many crops of one photo-like image: the PIL path
    and the batched path give the same distributions (within sampling noise)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    pil = Image.fromarray(small).resize((48, 36), Image.BICUBIC)
    n = 400
    cpu_transform = augment.moco_augmentation(24, aug_plus=True)
    torch.manual_seed(0)
    cpu = torch.stack([cpu_transform(pil) for _ in range(n)])
    image = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    ours = G.GPUAugment.from_transform(cpu_transform)([image] * (n // 2), views=2,
                                                      generator=torch.Generator().manual_seed(5))
    ours = torch.cat(ours)
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype
    for stat in (lambda b: b.mean((1, 2, 3)), lambda b: b.std(1).mean((1, 2)),
                 lambda b: b[:, :, :, :12].mean((1, 2, 3))):
        assert ks_statistic(stat(cpu).numpy(), stat(ours).numpy()) < 0.12


# ----------------------------------------------------------------------------- data path


def _jpeg_folder(root, sizes):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def test_read_jpeg_passes_baseline_and_reencodes_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "base.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "prog.jpg", quality=90, progressive=True)
    Image.fromarray(pixels).save(tmp_path / "png.jpg", format="PNG")  # a PNG named .jpg (ImageNet has one)
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    base = jpeg_data.read_jpeg(tmp_path / "base.jpg")
    assert bytes(base.numpy()) == (tmp_path / "base.jpg").read_bytes()
    for name in ("prog.jpg", "png.jpg", "cmyk.jpg"):
        data = jpeg_data.read_jpeg(tmp_path / name)
        with Image.open(io.BytesIO(bytes(data.numpy()))) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive") and im.size == (30, 20)
        assert decode_jpeg(data).shape == (3, 20, 30)


def test_gpu_loader_yields_two_crops_like_the_cpu_backend(tmp_path):
    root = _jpeg_folder(tmp_path / "imgs", [(40, 30), (30, 44), (64, 48), (50, 50), (36, 24), (80, 40)])
    transform = augment.moco_augmentation(16, aug_plus=True)
    sampler = augment.ViewSampler(6, 3, 0, 1, seed=0, epochs=2)
    loader = jpeg_data.build_loader(root, transform, 3, sampler=sampler, workers=0, device="cpu", seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 2 epochs x 2 batches
    lo = (0 - max(augment.MEAN)) / min(augment.STD)
    hi = (1 - min(augment.MEAN)) / min(augment.STD)
    for im_q, im_k, ids in batches:
        assert im_q.shape == im_k.shape == (3, 3, 16, 16) and im_q.dtype == torch.float32
        assert im_q.min() >= lo - 1e-4 and im_q.max() <= hi + 1e-4
        assert not torch.equal(im_q, im_k)  # independent views
    assert sorted(torch.cat([b[2] for b in batches[:2]]).tolist()) == list(range(6))  # one epoch of view ids
    # Seeded by view ids: the same run gives the same crops again (resume).
    again = list(jpeg_data.build_loader(root, transform, 3, sampler=sampler, workers=0, device="cpu", seed=0))
    torch.testing.assert_close(again[3][0], batches[3][0])
    # Bytes batched by a worker process (one flat tensor per batch) give the same crops.
    in_worker = jpeg_data.build_loader(root, transform, 3, sampler=sampler, workers=1, device="cpu", seed=0)
    torch.testing.assert_close(next(iter(in_worker))[1], batches[0][1])
    # Decoding in the workers instead gives the same images.
    worker_decoded = jpeg_data.GPUTwoCropLoader(jpeg_data.JpegFolder(root, decode=True),
                                                G.GPUAugment.from_transform(transform),
                                                3, sampler=sampler, workers=0, device="cpu", seed=0)
    torch.testing.assert_close(next(iter(worker_decoded))[0], batches[0][0])


def test_synthetic_imagefolder_is_imagenet_like(tmp_path):
    root = benchmark.synthetic_imagefolder(tmp_path / "synth", 12, num_classes=3, workers=2)
    files = sorted(root.glob("*/*.jpg"))
    assert len(files) == 12 and len({f.parent for f in files}) == 3
    sizes = [Image.open(f).size for f in files]
    assert all(64 <= min(s) and max(s) <= 1200 for s in sizes)
    assert 20_000 < np.mean([f.stat().st_size for f in files]) < 400_000  # photo-like compression


def test_bench_pretrain_measures_every_setting(tmp_path):
    """tools/bench_pretrain.py on CPU: one row per setting (official recipe + each decode place), three rates each."""
    import json
    import sys

    from transfer import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import bench_pretrain

    out = tmp_path / "rows.json"
    bench_pretrain.main(["--data", str(tmp_path / "synth"), "--synthetic", "24", "--device", "cpu",
                         "--arch", "resnet18", "--batch-size", "4", "--image-size", "32", "--moco-k", "8",
                         "--workers", "0", "--bn-splits", "2", "--warmup", "1", "--steps", "1",
                         "--decode", "device", "workers", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["decode"], r["bn_splits"]) for r in rows] == [
        ("cpu", "workers", 1), ("gpu", "device", 2), ("gpu", "workers", 2)]
    assert all(r[k] > 0 for r in rows for k in ("data", "compute", "end_to_end"))
    assert not any(r["compile"] for r in rows)  # compile is CUDA-only
