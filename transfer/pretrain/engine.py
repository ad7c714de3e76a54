"""The pre-training loop: data, LR schedule, precision, checkpoint + resume, logs, monitors.

One process per device. Under torchrun every process trains on its slice of each global batch
(DistributedDataParallel; shuffle-BN across ranks); alone, the process uses split BatchNorm.
A run is a sequence of global steps; every random draw is either seeded per view (the data) or
part of the saved RNG state (the key shuffle, the memory bank's negatives), so ``--resume``
continues the same loss sequence. The mechanism (``--mechanism``, ``mechanisms.py``) decides where
keys and negatives come from; the loop is the same for all.
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

from transfer import fileio
from transfer.errors import UserError
from transfer.fileio import atomic_torch_save
from transfer.image_folder import SKIPPED, check_skipped, read_skipped
from transfer.pretrain import knn, mechanisms, monitors
from transfer.pretrain.augment import TwoCropDataset, ViewSampler, moco_augmentation
from transfer.pretrain.config import PretrainConfig
from transfer.pretrain.precision import autocast, autocast_dtype

CHECKPOINT = "checkpoint_last.pth.tar"


class Diverged(UserError):
    """The loss became NaN or infinite; the last checkpoint (before it) is kept."""


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

        data = demo.images()
    root = Path(data)
    train, val = root / "train", root / "val"
    if not train.is_dir():
        raise UserError(f"--data {root}: expected an ImageFolder root with train/<class>/*.jpg "
                        f"(and val/<class>/ for the k-NN monitor); {train} does not exist")
    return train, (val if val.is_dir() else None)


def bn_groups(cfg, world_size):
    """BatchNorm groups per process: --bn-splits, else 8 on one process with shuffle-BN (as if on 8
    GPUs), else 1 (plain BatchNorm, as the official code on one GPU)."""
    if cfg.bn_splits is not None:
        return cfg.bn_splits
    return 8 if world_size == 1 and cfg.shuffle_bn else 1


def check_sizes(cfg, world_size, bn_splits):
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size}: not divisible by the {world_size} processes")
    if cfg.mechanism == "moco" and cfg.moco_k % cfg.batch_size:
        raise UserError(f"--moco-k {cfg.moco_k}: the queue size must be a multiple of --batch-size {cfg.batch_size}")
    if (cfg.batch_size // world_size) % bn_splits:
        raise UserError(f"--bn-splits {bn_splits}: does not divide the per-process batch "
                        f"{cfg.batch_size // world_size}")
    resnets = ("resnet", "resnext", "wide_resnet")
    if cfg.arch not in torchvision.models.list_models(torchvision.models) or not cfg.arch.startswith(resnets):
        raise UserError(f"--arch {cfg.arch}: expected a torchvision ResNet (resnet18 ... resnet152, resnext*, "
                        "wide_resnet*)")


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
        raise UserError(f"--resume {path}: does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); check --mechanism / --arch / --moco-dim / --moco-k / --mlp / "
                        "--small-stem")
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



class RunLogs:
    """What the main process writes while training: CSV logs, TensorBoard, the progress bar."""

    def __init__(self, output, start_step, last_step, resumed, desc):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        resume_step = start_step if resumed else None
        self.output = output
        self.train = CsvLog(output / "log.csv",
                            ["step", "epoch", "lr", "loss", "acc1", "images_per_s", "skipped_images"], resume_step)
        self.monitor = CsvLog(output / "monitor.csv", ["step", "epoch", "knn_top1", *monitors.SUMMARY], resume_step)
        self.consistency = CsvLog(output / "dictionary_consistency.csv",
                                  ["step", "epoch", "age_steps", "cosine", "margin", "retrieved"], resume_step)
        self.tensorboard = SummaryWriter(output / "tb", purge_step=start_step)
        self.bar = tqdm(total=last_step, initial=start_step, unit="step", dynamic_ncols=True, desc=desc)

    def close(self):
        self.bar.close()
        self.tensorboard.close()


# ----------------------------------------------------------------------------- training


def build_model(cfg, bn_splits, num_images, device, channels_last):
    """(the mechanism with its seeded initial weights, the same on every rank; its SGD optimizer)."""
    torch.manual_seed(cfg.seed)
    model = mechanisms.build(cfg, bn_splits, num_images).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # As the official code: SGD over all parameters (the key encoder's have no gradient and are skipped).
    optimizer = torch.optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    return model, optimizer


def compile_encoders(model):
    """torch.compile each encoder in place: parameter names (and checkpoints) unchanged."""
    for encoder in model.children():
        encoder.compile()


def train_step(net, optimizer, im_q, im_k, ids, amp_dtype):
    """One SGD step of the InfoNCE loss; returns (loss, logits, labels) without waiting for the device."""
    with autocast(im_q.device, amp_dtype):
        logits, labels = net(im_q, im_k, ids)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits, labels


def batch_to_device(batch, device, channels_last):
    """A batch (im_q, im_k, view_ids) on ``device`` (a no-op for the gpu backend), the images in
    channels_last memory format when asked."""
    im_q, im_k, ids = (x.to(device, non_blocking=True) for x in batch)
    if channels_last:
        im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
    return im_q, im_k, ids


def two_crop_loader(cfg, proc, dataset, start_step, channels_last):
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
            sampler=sampler, workers=cfg.workers, device=proc.device, seed=cfg.seed, channels_last=channels_last)
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg.workers,
        pin_memory=proc.device.type == "cuda", persistent_workers=cfg.workers > 0,
        generator=torch.Generator(),  # keeps the loader off the global RNG that the key shuffle uses
    )


def pretrain(cfg: PretrainConfig) -> Path:
    """Pre-train as configured; returns the path of the last checkpoint (OUTPUT/checkpoint_last.pth.tar)."""
    proc = init_process(cfg.device)
    bn_splits = bn_groups(cfg, proc.world_size)
    check_sizes(cfg, proc.world_size, bn_splits)
    amp_dtype = autocast_dtype(cfg.precision, proc.device)
    channels_last = cfg.channels_last and proc.device.type == "cuda"  # on a CPU it slows the step down
    output = Path(cfg.output)
    checkpoint = output / CHECKPOINT
    if checkpoint.exists() and cfg.resume is None:
        raise UserError(f"--output {output}: holds a checkpoint already; pass --resume {checkpoint} to continue "
                        "or choose another --output")
    train_dir, val_dir = data_dirs(cfg.data)
    dataset = TwoCropDataset(train_dir, moco_augmentation(cfg.image_size, cfg.aug_plus), seed=cfg.seed,
                             skipped=output / SKIPPED)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--data {train_dir}: {len(dataset)} images, fewer than one batch of "
                        f"--batch-size {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps or total_steps)

    model, optimizer = build_model(cfg, bn_splits, len(dataset), proc.device, channels_last)
    step = load_checkpoint(cfg.resume, model, optimizer, steps_per_epoch) if cfg.resume else 0
    if proc.device.type == "cuda" and cfg.compile:
        compile_encoders(model)
    net = model
    if proc.world_size > 1:
        # Buffers are not broadcast at every step: the queue (the bank) is identical on every rank by
        # construction, and each rank keeps its own BN running statistics (rank 0's are saved).
        # (torch >= 2.14 calls the flag deprecated in favour of forward_sync_buffers, which older
        # releases lack; its meaning is unchanged.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None, broadcast_buffers=False)

    loader = two_crop_loader(cfg, proc, dataset, step, channels_last)

    logs = knn_data = None
    if proc.main:
        output.mkdir(parents=True, exist_ok=True)
        resolved = dataclasses.asdict(cfg) | {"bn_splits": bn_splits}
        (output / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        logs = RunLogs(output, step, last_step, cfg.resume is not None, f"{cfg.mechanism} {cfg.arch}")
        if val_dir and cfg.monitor_every:
            *knn_data, line = monitors.knn_loaders(train_dir, val_dir, cfg, cfg.batch_size // proc.world_size)
            logs.bar.write(line)

    stop = {"signal": None}  # SIGTERM (SLURM pre-emption): checkpoint after the current step, then exit
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    try:
        trainer = Trainer(cfg, proc, model, net, optimizer, dataset, amp_dtype, channels_last, bn_splits,
                          steps_per_epoch, logs, knn_data)
        trainer.train(loader, step, last_step, stop, checkpoint)
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
class Trainer:
    """The training loop of one process, and the monitors it runs between epochs."""

    cfg: PretrainConfig
    proc: Process
    model: torch.nn.Module  # the mechanism (mechanisms.py)
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    dataset: TwoCropDataset  # the CPU augmentation, also rebuilds stored keys' views for the monitors
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    bn_splits: int
    steps_per_epoch: int
    logs: Optional[RunLogs]  # main process only
    knn_data: Optional[list]  # [(bank loader, query loader), num classes] on the main process

    def autocast(self):
        return autocast(self.proc.device, self.amp_dtype)

    def train(self, loader, step, last_step, stop, checkpoint):
        cfg, proc = self.cfg, self.proc
        total_steps = cfg.epochs * self.steps_per_epoch
        self.model.train()
        if step == 0 and cfg.monitor_every:
            self.monitor(0, 0)  # the random-init reference every later row is compared with
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
            im_q, im_k, ids = batch_to_device(batch, self.proc.device, self.channels_last)
            loss, logits, labels = train_step(self.net, self.optimizer, im_q, im_k, ids, self.amp_dtype)
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
                self.monitor(step, done_epochs)
            if (end_of_epoch or step == last_step or stop["signal"]) and proc.main:
                if not torch.isfinite(loss_sum):  # not since the last log row, which was checked
                    raise Diverged(f"step {step}: the loss is {loss_sum.item()}: the run diverged; "
                                   f"{checkpoint} is kept from before")
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
        if not math.isfinite(loss):
            raise Diverged(f"step {step}: the loss is {loss}: the run diverged (lower --lr?); "
                           f"the last checkpoint is kept from before")

    def monitor(self, step, epoch):
        """Every process: the one-batch similarity matrix (MoCo's key shuffle is collective). The main
        process: k-NN top-1 on the held-out split, the dictionary consistency, their figures."""
        cpu_views = self.cfg.aug_backend == "cpu"  # the exact crops are rebuilt by the CPU augmentation
        local_batch = self.cfg.batch_size // self.proc.world_size
        similarity = consistency = None
        with monitors.untouched(self.model, self.proc.device), self.autocast():
            if cpu_views:
                n = min(local_batch, 64) // self.bn_splits * self.bn_splits
                similarity = monitors.batch_similarity(self.model, self.dataset, n, self.proc.device)
            if self.logs and cpu_views:
                consistency = monitors.dictionary_consistency(self.model, self.dataset, local_batch,
                                                              self.cfg.batch_size, self.proc.device,
                                                              self.cfg.consistency_keys)
        if self.logs:
            self.report(step, epoch, similarity, consistency)
        if self.proc.world_size > 1:
            dist.barrier()

    def report(self, step, epoch, similarity, consistency):
        """The main process's monitor row, figures and log line (with the k-NN top-1 computed here)."""
        row = {"step": step, "epoch": epoch, "knn_top1": ""} | dict.fromkeys(monitors.SUMMARY, "")
        if self.knn_data:
            (bank, queries), num_classes = self.knn_data
            row["knn_top1"] = knn.knn_top1(knn.backbone(self.model.encoder_q), bank, queries, num_classes,
                                           self.proc.device, self.cfg.knn_k, self.cfg.knn_t, self.amp_dtype)
        output, what = self.logs.output, f"{self.cfg.mechanism}, epoch {epoch}"
        if consistency:
            ages, scores, spread = consistency
            per_key = zip(ages.tolist(), scores["cosine"].tolist(), scores["margin"].tolist(),
                          scores["retrieved"].int().tolist())
            self.logs.consistency.append(*({"step": step, "epoch": epoch, "age_steps": a, "cosine": c, "margin": m,
                                            "retrieved": r} for a, c, m, r in per_key))
            row |= monitors.summary(scores, spread)
            monitors.plot_consistency(self.logs.consistency.path, output / "dictionary_consistency.png",
                                      f"Dictionary consistency ({self.cfg.mechanism})")
        if similarity is not None:
            monitors.plot_similarity(similarity, output / "similarity_matrix.png",
                                     f"One batch, {what}: cos(query, key)")
        for key, value in row.items():
            if key not in ("step", "epoch") and value != "":
                self.logs.tensorboard.add_scalar(f"monitor/{key}", value, step)
        self.logs.monitor.append(row)
        self.logs.bar.write(describe(row))


def describe(row):
    """The monitor row as one line of the log."""
    when = "step 0 (random init)" if row["step"] == 0 else f"epoch {row['epoch']}"
    knn_text = f"{row['knn_top1']:.2f}%" if row["knn_top1"] != "" else "-"
    line = f"{when}: k-NN top-1 {knn_text}"
    if row["dict_consistency"] != "":
        line += (f", dictionary consistency {row['dict_consistency']:.4f} (raw cosine {row['dict_cosine']:.4f}, "
                 f"retrieval {row['dict_retrieval']:.1f}%, feature spread {row['feature_spread']:.4f})")
    return line
