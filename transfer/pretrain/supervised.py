"""Supervised ImageNet-style pre-training of a torchvision ResNet: the baseline MoCo is compared with.

torchvision's classic recipe: cross-entropy, SGD momentum 0.9, weight decay 1e-4, lr 0.1 per 256
images, x0.1 every 30 epochs, random resized crops and flips. Writes a plain torchvision state
dict, the format of torchvision's own ImageNet weights (the converter reads it as such).
"""
import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision

from transfer.errors import UserError
from transfer.fileio import atomic_torch_save, atomic_write_json
from transfer.image_folder import ImageFolder
from transfer.pretrain.augment import classification_transform, eval_transform
from transfer.pretrain.classification import evaluate
from transfer.pretrain.precision import autocast, autocast_dtype


@dataclasses.dataclass
class SupervisedConfig:
    data: str  # root with train/<class>/ (val/<class>/ is evaluated when present)
    output: str = "output/supervised"
    arch: str = "resnet50"
    epochs: int = 90
    batch_size: int = 256
    lr: Optional[float] = None  # default 0.1 * batch_size / 256
    lr_step: int = 30  # epochs between x0.1 decays
    momentum: float = 0.9
    wd: float = 1e-4
    workers: int = 8
    image_size: int = 224
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


def train_supervised(cfg: SupervisedConfig) -> Path:
    """Train; returns OUTPUT/supervised_<arch>.pth (plain state dict). Writes OUTPUT/metrics.json too."""
    root = Path(cfg.data)
    if not (root / "train").is_dir():
        raise UserError(f"--data {root}: expected an ImageFolder root with train/<class>/*.jpg; "
                        f"{root / 'train'} does not exist")
    if cfg.arch not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"--arch {cfg.arch}: not a torchvision classification model")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = autocast_dtype(cfg.precision, device)
    train_set = ImageFolder(root / "train", classification_transform(cfg.image_size))
    model = torchvision.models.get_model(cfg.arch, num_classes=len(train_set.classes)).to(device)
    lr = cfg.lr if cfg.lr is not None else 0.1 * cfg.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=len(train_set) > cfg.batch_size, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    val_loader = None
    if (root / "val").is_dir():
        val_loader = torch.utils.data.DataLoader(ImageFolder(root / "val", eval_transform(cfg.image_size)),
                                                 batch_size=cfg.batch_size, num_workers=cfg.workers)

    history = []
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.1 ** (epoch // cfg.lr_step)
        model.train()
        loss_sum, seen = 0.0, 0
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(target), seen + len(target)
        row = {"epoch": epoch + 1, "loss": loss_sum / seen}
        if val_loader is not None:
            row.update(evaluate(model, val_loader, device, amp_dtype))
        history.append(row)
        print(f"epoch {epoch + 1}/{cfg.epochs}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "epoch"))

    output = Path(cfg.output)
    weights = output / f"supervised_{cfg.arch}.pth"
    atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
    atomic_write_json(output / "metrics.json", {"arch": cfg.arch, "classes": train_set.classes, "history": history,
                                                "config": dataclasses.asdict(cfg)})
    return weights
