"""Throughput of MoCo pre-training: end to end, the data pipeline alone, the training step alone.

Three rates per setting, in images/s (one image = its two crops, as the training loop counts):
- data: the loader alone (decode + two augmented crops, delivered on the device);
- compute: the training step alone, on random inputs already on the device;
- end to end: loader + step, as ``engine.Trainer.train`` runs them.
The end to end rate is about min(data, compute) when the two overlap well. Peak device memory
is read over the end-to-end phase.

Loaders are timed from the moment their first round of workers has delivered (a DataLoader's
workers all finish their first batch together, so earlier batches would measure the start-up).
"""
import dataclasses
import io
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfer.pretrain import engine, jpeg_data
from transfer.pretrain.augment import MEAN, STD, TwoCropDataset, ViewSampler, moco_augmentation
from transfer.pretrain.precision import autocast_dtype

BANK_IMAGES = 1_281_167  # --mechanism memory_bank: a bank the size of ImageNet's train set


@dataclasses.dataclass
class Setting:
    """One benchmarked configuration (the model comes from the engine's PretrainConfig)."""

    name: str
    backend: str  # cpu: PIL in loader workers; gpu: nvJPEG + GPUAugment
    precision: str  # fp32 or bf16
    channels_last: bool
    compile: bool
    bn_splits: int
    decode: str = "device"  # JPEG decode on the device (nvJPEG; gpu backend only) or in the loader workers


# ----------------------------------------------------------------------------- synthetic data


def _ilsvrc_like_size(rng):
    """(width, height) following ImageNet's train set roughly: most images have a long side of 500
    and a 4:3 or 3:2 aspect (a quarter portrait); the rest are spread from 200 to 1200 px."""
    if rng.random() < 0.75:
        long_side, aspect = 500, rng.choice([4 / 3, 4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9])
    else:
        long_side, aspect = int(rng.integers(200, 1200)), float(rng.uniform(1.0, 2.0))
    w, h = long_side, max(64, round(long_side / aspect))
    return (h, w) if rng.random() < 0.25 else (w, h)


def _write_image(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = _ilsvrc_like_size(rng)
    # Smooth colour fields plus texture: compresses like a photo (ImageNet averages ~110 kB).
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 14, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())


def synthetic_imagefolder(root, num_images, num_classes=10, seed=0, workers=None):
    """An ImageFolder ``root/<class>/<i>.jpg`` of random JPEGs with ImageNet-like sizes (idempotent)."""
    root = Path(root)
    marker = root / f".complete_{num_images}_{num_classes}_{seed}"
    if marker.exists():
        return root
    jobs = []
    for i in range(num_images):
        folder = root / f"class{i % num_classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:07d}.jpg", seed * 1_000_003 + i))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_image, jobs, chunksize=64))
    marker.touch()
    return root


# ----------------------------------------------------------------------------- pieces


def build_model(cfg, setting, device):
    """The preset's model and optimizer as the engine builds them, with the setting's speed options."""
    model, optimizer = engine.build_model(cfg, setting.bn_splits, BANK_IMAGES, device, setting.channels_last)
    if setting.compile and device.type == "cuda":
        engine.compile_encoders(model)
    return model, optimizer


def build_loader(cfg, setting, root, batch_size, workers, device, epochs=1000):
    """An endless loader of (im_q, im_k, view_ids) on ``device`` for the setting's backend."""
    transform = moco_augmentation(cfg.image_size, cfg.aug_plus)
    if setting.backend == "gpu":
        n = len(jpeg_data.JpegFolder(root))
        sampler = ViewSampler(n, batch_size, 0, 1, cfg.seed, epochs)
        return jpeg_data.build_loader(root, transform, batch_size, sampler, workers, device, cfg.seed,
                                      decode_on_device=setting.decode == "device", channels_last=setting.channels_last)
    dataset = TwoCropDataset(root, transform, seed=cfg.seed)
    sampler = ViewSampler(len(dataset), batch_size, 0, 1, cfg.seed, epochs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def _on_device(batch, device):
    im_q, im_k, ids = batch
    return im_q.to(device, non_blocking=True), im_k.to(device, non_blocking=True), ids


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(batches, work, warmup, steps, device):
    """images/s of ``work(batch)`` over ``steps`` batches, after ``warmup`` batches."""
    it = iter(batches)
    for _ in range(warmup):
        work(next(it))
    _sync(device)
    start = time.perf_counter()
    n = 0
    for _ in range(steps):
        n += work(next(it))
    _sync(device)
    return n / (time.perf_counter() - start)


def random_batches(batch_size, image_size, device):
    """Endless normalised random crops on the device (what the compute-only rate trains on)."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    ids = torch.arange(batch_size)
    while True:
        q, k = (((torch.rand(batch_size, 3, image_size, image_size, device=device)) - mean) / std for _ in range(2))
        yield q, k, ids


def measure(cfg, setting, root, batch_size, workers, device, warmup, steps):
    """{data, compute, end_to_end (images/s), peak_memory_gib} for one setting."""
    model, optimizer = build_model(cfg, setting, device)
    model.train()
    amp_dtype = autocast_dtype(setting.precision, device)

    def step(batch):  # the step of engine.Trainer.train
        im_q, im_k, ids = engine.batch_to_device(batch, device, setting.channels_last)
        engine.train_step(model, optimizer, im_q, im_k, ids, amp_dtype)
        return im_q.shape[0]

    def load(batch):
        im_q, _, _ = _on_device(batch, device)
        return im_q.shape[0]

    result = {"compute": _timed(random_batches(batch_size, cfg.image_size, device), step, warmup, steps, device)}
    loader = build_loader(cfg, setting, root, batch_size, workers, device)
    # Skip the first round of workers (start-up), then time whole rounds.
    rounds = max(workers, 1)
    data_warmup = max(warmup, rounds)
    data_steps = -(-steps // rounds) * rounds
    batches = iter(loader)
    result["data"] = _timed(batches, load, data_warmup, data_steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["end_to_end"] = _timed(batches, step, rounds, data_steps, device)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del batches, loader
    return result


def format_table(rows):
    """Markdown table of measured rows (dicts of Setting fields + measure() results)."""
    header = ["setting", "backend", "decode", "precision", "channels_last", "compile", "bn_splits", "data img/s",
              "compute img/s", "end-to-end img/s", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {r['name']} | {r['backend']} | {r['decode']} | {r['precision']} | {r['channels_last']} | "
                     f"{r['compile']} | {r['bn_splits']} | {r['data']:,.0f} | {r['compute']:,.0f} | "
                     f"{r['end_to_end']:,.0f} | {peak} |")
    return "\n".join(lines)
