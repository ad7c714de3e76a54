"""The MoCo pre-training loop: configuration, data, LR schedule, precision, checkpoint + resume, logs, monitors.

One process per device. Under torchrun every process trains on its slice of each global batch
(DistributedDataParallel; shuffle-BN across ranks); alone, the process uses split BatchNorm.
A run is a sequence of global steps; every random draw is either seeded per view (the data) or
part of the saved RNG state (the key shuffle), so ``--resume`` continues the same loss sequence.
"""
import csv
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import yaml

from transfer.errors import UserError
from transfer import fileio
from transfer.fileio import atomic_torch_save
from transfer.image_folder import SKIPPED, ImageFolder, check_skipped, read_skipped
from transfer.pretrain import knn
from transfer.pretrain.augment import TwoCropDataset, ViewSampler, eval_transform, moco_augmentation
from transfer.pretrain.moco import MoCo

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
CHECKPOINT = "checkpoint_last.pth.tar"


@dataclasses.dataclass
class PretrainConfig:
    """Every setting of a run; the presets in configs/pretrain/*.yaml give all of the first block."""

    arch: str
    moco_dim: int
    moco_k: int
    moco_m: float
    moco_t: float
    mlp: bool
    bn_splits: Optional[int]
    aug_plus: bool
    image_size: int
    aug_backend: str
    workers: int
    lr: float
    schedule: list
    cos: bool
    epochs: int
    batch_size: int
    wd: float
    momentum: float
    seed: int
    precision: str
    channels_last: bool
    compile: bool
    print_freq: int
    monitor_every: int
    knn_k: int
    knn_t: float
    knn_max_images: int
    consistency_keys: int
    # where, and how far
    output: str = "output/pretrain"
    data: Optional[str] = None  # root with train/<class>/ (and val/<class>/ for the k-NN monitor); None: demo images
    resume: Optional[str] = None
    max_steps: Optional[int] = None  # stop (with a checkpoint) at this global step; --resume continues
    device: str = "auto"  # auto: CUDA (GPU LOCAL_RANK) when available, else CPU; or cuda / cpu


def load_config(preset="v2", **overrides) -> PretrainConfig:
    """A preset name (configs/pretrain/<name>.yaml) or YAML path, with overrides (None means: keep)."""
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else PRESETS / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise UserError(f"--preset {preset}: no such preset ({', '.join(names)}) or YAML file")
    values = fileio.read_yaml_mapping(path, "a mapping of pre-training settings")
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"{path}: unknown settings {unknown}")
    try:
        return PretrainConfig(**values)
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Process:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def init_process(device="auto") -> Process:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device}: expected auto, cuda or cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    device = torch.device(f"cuda:{local_rank}" if device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Process(rank, world_size, device)


def data_dirs(data):
    """(train dir, val dir or None) of an ImageFolder root; the built-in demo images without ``data``."""
    if data is None:
        from transfer.datasets import demo

        data = demo.ensure() / "imagenet"
    root = Path(data)
    train, val = root / "train", root / "val"
    if not train.is_dir():
        raise UserError(f"--data {root}: expected an ImageFolder root with train/<class>/*.jpg "
                        f"(and val/<class>/ for the k-NN monitor); {train} does not exist")
    return train, (val if val.is_dir() else None)


def check_sizes(cfg, world_size, bn_splits):
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: not divisible by the {world_size} processes")
    if cfg.moco_k % cfg.batch_size:
        raise UserError(f"--moco-k {cfg.moco_k}: the queue size must be a multiple of --batch-size {cfg.batch_size}")
    if (cfg.batch_size // world_size) % bn_splits:
        raise UserError(f"--bn-splits {bn_splits}: does not divide the per-process batch {cfg.batch_size // world_size}")
    if cfg.aug_backend not in ("cpu", "gpu"):
        raise UserError(f"--aug-backend {cfg.aug_backend}: expected cpu or gpu")
    if cfg.arch not in torchvision.models.list_models(torchvision.models) or not cfg.arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise UserError(f"--arch {cfg.arch}: expected a torchvision ResNet (resnet18 ... resnet152, resnext*, wide_resnet*)")


def autocast_dtype(cfg, device):
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise UserError(f"--precision {cfg.precision}: expected auto, bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else None


def learning_rate(cfg, epoch):
    """The official per-epoch schedule: half-cosine, or x0.1 at each epoch in ``schedule``."""
    if cfg.cos:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * 0.1 ** sum(epoch >= milestone for milestone in cfg.schedule)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, model, optimizer, cfg, step, steps_per_epoch, lr):
    """The official layout (``module.`` prefix also on one process) plus what an exact resume needs."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    atomic_torch_save({
        "epoch": step // steps_per_epoch,
        "step": step,
        "arch": cfg.arch,
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "lr": lr,
        "config": dataclasses.asdict(cfg),
        "rng": rng,
    }, path)


def load_checkpoint(path, model, optimizer, steps_per_epoch):
    """Restore a checkpoint (ours or the official code's) into model and optimizer; returns the next global step."""
    ckpt = fileio.load_tensors(path, "--resume")
    state = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", {}).items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # shape mismatch
        missing, unexpected = [], ["(tensor shapes differ)"]
    missing = [k for k in missing if k != "queue_ids"]  # official checkpoints do not track view ids
    if missing or unexpected:
        raise UserError(f"--resume {path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "check --arch / --moco-dim / --moco-k / --mlp")
    optimizer.load_state_dict(ckpt["optimizer"])
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt.get("step", ckpt["epoch"] * steps_per_epoch)


# ----------------------------------------------------------------------------- logs


class CsvLog:
    """Appends rows to a CSV; on resume, first drops the rows past the resumed step (written after that checkpoint)."""

    def __init__(self, path, columns, resume_step=None):
        self.path, self.columns = Path(path), columns
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write(rows, "w")

    def _write(self, rows, mode):
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def append(self, *rows):
        self._write(rows, "a")


# ----------------------------------------------------------------------------- monitors


@torch.no_grad()
def dictionary_consistency(model, dataset, local_batch, global_batch, device, max_keys=1024):
    """Cosine between queued keys and the same views re-encoded by today's key encoder, by key age.

    Samples whole training batches of the queue (evenly over ages) and re-encodes each in chunks of
    the per-process batch, so BatchNorm sees batches like the ones that made the keys (training
    mode; the running statistics are restored afterwards). With split BN the keys were made in
    randomly shuffled BN groups, so even the newest keys score a little below 1 (less so the larger
    the groups). Returns (age in steps, cosine) per key.
    """
    num_batches = model.K // global_batch
    ages = torch.linspace(0, num_batches - 1, min(num_batches, max(1, max_keys // global_batch))).round().long()
    newest = (int(model.queue_ptr) - global_batch) % model.K  # first slot of the last enqueued batch
    encoder = model.encoder_k
    buffers = {name: b.clone() for name, b in encoder.named_buffers()}
    all_ages, cosines = [], []
    for age in ages.tolist():
        start = (newest - age * global_batch) % model.K
        slots = torch.arange(start, start + global_batch, device=model.queue.device)
        ids = model.queue_ids[slots]
        if (ids < 0).any():  # slots still holding the random initial keys
            continue
        images = torch.stack([dataset.key_view(int(i)) for i in ids])
        keys = torch.cat([F.normalize(encoder(x.to(device)).float(), dim=1) for x in images.split(local_batch)])
        cosines.append((keys * model.queue[:, slots].T).sum(1).cpu())
        all_ages.append(torch.full((global_batch,), age))
    for name, b in encoder.named_buffers():
        b.copy_(buffers[name])
    if not cosines:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    return torch.cat(all_ages), torch.cat(cosines)


def plot_consistency(csv_path, png_path):
    """One curve per monitored epoch: mean cosine of queued vs re-encoded keys, against key age."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for epoch, rows in table.groupby("epoch"):
        curve = rows.groupby("age_steps")["cosine"].mean()
        ax.plot(curve.index, curve.values, marker=".", label=f"epoch {epoch}")
    ax.set_xlabel("key age in the queue (steps)")
    ax.set_ylabel("cos(queued key, key re-encoded now)")
    ax.set_title("MoCo dictionary consistency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def knn_loaders(train_dir, val_dir, cfg, batch):
    """Deterministic subsets (at most knn_max_images) of train (the bank) and val (the queries)."""
    loaders = []
    for root in (train_dir, val_dir):
        images = ImageFolder(root, eval_transform(cfg.image_size), skipped=Path(cfg.output) / SKIPPED)
        n = min(len(images), cfg.knn_max_images)
        subset = torch.utils.data.Subset(images, torch.linspace(0, len(images) - 1, n).round().long().tolist())
        loaders.append(torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=cfg.workers,
                                                   generator=torch.Generator()))
    return loaders, len(ImageFolder(train_dir).classes)


# ----------------------------------------------------------------------------- training


def two_crop_loader(cfg, proc, dataset, start_step):
    """Batches (im_q, im_k, view_ids) of this process from ``start_step`` on, from either backend:
    cpu: PIL augmentation in DataLoader workers; gpu: JPEG bytes decoded and augmented on the device."""
    local_batch = cfg.batch_size // proc.world_size
    sampler = ViewSampler(len(dataset), cfg.batch_size, proc.rank, proc.world_size, cfg.seed, cfg.epochs, start_step)
    if cfg.aug_backend == "gpu":
        from transfer.pretrain import jpeg_data
        from transfer.pretrain.gpu_augment import GPUAugment

        return jpeg_data.GPUTwoCropLoader(
            jpeg_data.JpegFolder(dataset.images.root, skipped=dataset.images.skipped),
            GPUAugment.from_transform(dataset.transform), local_batch,
            sampler=sampler, workers=cfg.workers, device=proc.device, seed=cfg.seed, channels_last=cfg.channels_last)
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg.workers,
        pin_memory=proc.device.type == "cuda", persistent_workers=cfg.workers > 0,
        generator=torch.Generator(),  # keeps the loader off the global RNG that the key shuffle uses
    )


class RunLogs:
    """What the main process writes while training: CSV logs, TensorBoard, the progress bar."""

    def __init__(self, output, start_step, last_step, resumed, desc):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        resume_step = start_step if resumed else None
        self.output = output
        self.train = CsvLog(output / "log.csv", ["step", "epoch", "lr", "loss", "acc1", "images_per_s", "skipped_images"],
                            resume_step)
        self.monitor = CsvLog(output / "monitor.csv", ["step", "epoch", "knn_top1", "dict_consistency"], resume_step)
        self.consistency = CsvLog(output / "dictionary_consistency.csv", ["step", "epoch", "age_steps", "cosine"], resume_step)
        self.tensorboard = SummaryWriter(output / "tb", purge_step=start_step)
        self.bar = tqdm(total=last_step, initial=start_step, unit="step", dynamic_ncols=True, desc=desc)

    def close(self):
        self.bar.close()
        self.tensorboard.close()


def pretrain(cfg: PretrainConfig) -> Path:
    """Train MoCo as configured; returns the path of the last checkpoint (OUTPUT/checkpoint_last.pth.tar)."""
    proc = init_process(cfg.device)
    bn_splits = cfg.bn_splits if cfg.bn_splits is not None else (8 if proc.world_size == 1 else 1)
    check_sizes(cfg, proc.world_size, bn_splits)
    amp_dtype = autocast_dtype(cfg, proc.device)
    output = Path(cfg.output)
    checkpoint = output / CHECKPOINT
    if checkpoint.exists() and cfg.resume is None:
        raise UserError(f"--output {output}: holds a checkpoint already; pass --resume {checkpoint} to continue "
                        "or choose another --output")
    train_dir, val_dir = data_dirs(cfg.data)

    torch.manual_seed(cfg.seed)  # same initial weights and queue on every rank
    model = MoCo(torchvision.models.get_model_builder(cfg.arch), cfg.moco_dim, cfg.moco_k, cfg.moco_m,
                 cfg.moco_t, cfg.mlp, bn_splits).to(proc.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # As the official code: SGD over all parameters (the key encoder's have no gradient and are skipped).
    optimizer = torch.optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)

    dataset = TwoCropDataset(train_dir, moco_augmentation(cfg.image_size, cfg.aug_plus), seed=cfg.seed,
                             skipped=output / SKIPPED)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--data {train_dir}: {len(dataset)} images, fewer than one batch of --batch-size {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps or total_steps)

    step = load_checkpoint(cfg.resume, model, optimizer, steps_per_epoch) if cfg.resume else 0
    if proc.device.type == "cuda" and cfg.compile:
        model.encoder_q.compile()  # in place: parameter names (and checkpoints) unchanged
        model.encoder_k.compile()
    net = model
    if proc.world_size > 1:
        # Buffers are not broadcast at every step: the queue is identical on every rank by
        # construction, and each rank keeps its own BN running statistics (rank 0's are saved).
        # (torch >= 2.14 calls the flag deprecated in favour of forward_sync_buffers, which older
        # releases lack; its meaning is unchanged.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None, broadcast_buffers=False)

    loader = two_crop_loader(cfg, proc, dataset, step)

    logs = knn_data = None
    if proc.main:
        output.mkdir(parents=True, exist_ok=True)
        resolved = dataclasses.asdict(cfg) | {"bn_splits": bn_splits}
        (output / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        logs = RunLogs(output, step, last_step, cfg.resume is not None, f"MoCo {cfg.arch}")
        if val_dir and cfg.monitor_every:
            knn_data = knn_loaders(train_dir, val_dir, cfg, cfg.batch_size // proc.world_size)

    stop = {"signal": None}  # SIGTERM (SLURM pre-emption): checkpoint after the current step, then exit
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    try:
        run = Run(cfg, proc, model, net, optimizer, dataset, amp_dtype, steps_per_epoch, logs, knn_data)
        run.train(loader, step, last_step, stop, checkpoint)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if logs:
            logs.close()
    if proc.world_size > 1:
        dist.barrier()
    skipped = read_skipped(output / SKIPPED)
    if proc.main and skipped:
        print(f"{len(skipped)} image(s) could not be decoded and were replaced by the next image of "
              f"their folder (listed in {output / SKIPPED})", file=sys.stderr)
    return checkpoint


@dataclasses.dataclass
class Run:
    cfg: PretrainConfig
    proc: Process
    model: MoCo
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    dataset: TwoCropDataset  # the CPU augmentation, also rebuilds queued views for the consistency monitor
    amp_dtype: Optional[torch.dtype]
    steps_per_epoch: int
    logs: Optional[RunLogs]  # main process only
    knn_data: Optional[tuple]  # ((bank loader, query loader), num classes) on the main process

    def autocast(self):
        dtype = self.amp_dtype
        return torch.autocast(self.proc.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def batch_to_device(self, batch):
        im_q, im_k, ids = (x.to(self.proc.device, non_blocking=True) for x in batch)  # no-op for the gpu backend
        if self.cfg.channels_last:
            im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
        return im_q, im_k, ids

    def train(self, loader, step, last_step, stop, checkpoint):
        cfg, proc = self.cfg, self.proc
        total_steps = cfg.epochs * self.steps_per_epoch
        self.model.train()
        loss_sum = torch.zeros((), device=proc.device)
        acc_sum = torch.zeros((), device=proc.device)
        n, busy, tic = 0, 0.0, time.perf_counter()  # images/s counts loading + steps, not monitors/checkpoints
        for batch in loader:
            if step >= last_step:
                break
            epoch = step // self.steps_per_epoch
            lr = learning_rate(cfg, epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            im_q, im_k, ids = self.batch_to_device(batch)
            with self.autocast():
                logits, labels = self.net(im_q, im_k, ids)
            loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            step += 1

            loss_sum += loss.detach()
            acc_sum += (logits.argmax(1) == labels).float().mean() * 100
            n += 1
            busy += time.perf_counter() - tic
            if self.logs and (step % cfg.print_freq == 0 or step == last_step):
                self.log_step(step, epoch, lr, loss_sum.item() / n, acc_sum.item() / n, n * cfg.batch_size / busy)
                loss_sum.zero_(), acc_sum.zero_()
                n, busy = 0, 0.0
            if self.logs:
                self.logs.bar.update(1)

            done_epochs = step // self.steps_per_epoch
            end_of_epoch = step % self.steps_per_epoch == 0
            if end_of_epoch and cfg.monitor_every and (done_epochs % cfg.monitor_every == 0 or step == total_steps):
                if self.logs:
                    self.monitor(step, done_epochs)
                if proc.world_size > 1:
                    dist.barrier()
            if (end_of_epoch or step == last_step or stop["signal"]) and proc.main:
                save_checkpoint(checkpoint, self.model, self.optimizer, cfg, step, self.steps_per_epoch, lr)
            if stop["signal"]:
                break
            tic = time.perf_counter()

    def log_step(self, step, epoch, lr, loss, acc1, images_per_s):
        # undecodable images so far; past the limit the run stops here, with its last checkpoint kept
        skipped = check_skipped(self.logs.output / SKIPPED, len(self.dataset))
        row = {"step": step, "epoch": epoch, "lr": lr, "loss": loss, "acc1": acc1, "images_per_s": images_per_s,
               "skipped_images": skipped}
        self.logs.train.append(row)
        for key in ("loss", "acc1", "lr", "images_per_s"):
            self.logs.tensorboard.add_scalar(f"train/{key}", row[key], step)
        self.logs.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc1:.1f}", img_s=f"{images_per_s:.0f}")

    def monitor(self, step, epoch):
        """k-NN top-1 on the held-out split and the dictionary-consistency figure (main process)."""
        row = {"step": step, "epoch": epoch, "knn_top1": "", "dict_consistency": ""}
        if self.knn_data:
            (bank, queries), num_classes = self.knn_data
            row["knn_top1"] = knn.knn_top1(knn.backbone(self.model.encoder_q), bank, queries, num_classes,
                                           self.proc.device, self.cfg.knn_k, self.cfg.knn_t, self.amp_dtype)
            self.logs.tensorboard.add_scalar("monitor/knn_top1", row["knn_top1"], step)
        if self.cfg.aug_backend == "cpu":  # the exact key crops are rebuilt by the CPU augmentation
            with self.autocast():
                age, cosine = dictionary_consistency(self.model, self.dataset, self.cfg.batch_size // self.proc.world_size,
                                                     self.cfg.batch_size, self.proc.device, self.cfg.consistency_keys)
            self.logs.consistency.append(*({"step": step, "epoch": epoch, "age_steps": a, "cosine": c}
                                           for a, c in zip(age.tolist(), cosine.tolist())))
            if len(cosine):
                row["dict_consistency"] = cosine.mean().item()
                self.logs.tensorboard.add_scalar("monitor/dict_consistency", row["dict_consistency"], step)
                plot_consistency(self.logs.consistency.path, self.logs.output / "dictionary_consistency.png")
        self.logs.monitor.append(row)
        knn_text = f"{row['knn_top1']:.2f}%" if row["knn_top1"] != "" else "-"
        consistency_text = f"{row['dict_consistency']:.4f}" if row["dict_consistency"] != "" else "-"
        self.logs.bar.write(f"epoch {epoch}: k-NN top-1 {knn_text}, dictionary consistency {consistency_text}")
