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
from transfer.pretrain.precision import PRECISIONS, autocast, autocast_dtype
from transfer.pretrain.settings import setting


@dataclasses.dataclass
class SupervisedConfig:
    """Every setting of the baseline; the fields are tools/train_supervised.py's flags (settings.add_arguments)."""
    data: Optional[str] = setting("root with train/<class>/ (val/ is evaluated when present); "
                                  "default: the built-in demo images", None)
    output: str = setting("folder for supervised_<arch>.pth and metrics.json", "output/supervised")
    arch: str = setting("torchvision classification model", "resnet50", flags=("-a", "--arch"))
    epochs: int = setting("training epochs", 90)
    batch_size: int = setting("batch size", 256, flags=("-b", "--batch-size"))
    lr: Optional[float] = setting("learning rate; default 0.1 * batch size / 256", None)
    lr_step: int = setting("epochs between lr x0.1 decays", 30)
    momentum: float = setting("SGD momentum", 0.9)
    wd: float = setting("weight decay", 1e-4, flags=("--wd", "--weight-decay"))
    workers: int = setting("data loading processes", 8, flags=("-j", "--workers"))
    image_size: int = setting("crop size", 224)
    seed: int = setting("seed of the weights and the data order", 0)
    precision: str = setting("auto: bf16 autocast on CUDA, fp32 on CPU", "auto", choices=PRECISIONS)


def train_supervised(cfg: SupervisedConfig) -> Path:
    """Train; returns OUTPUT/supervised_<arch>.pth (plain state dict). Writes OUTPUT/metrics.json too."""
    from transfer.datasets import demo

    root = demo.images() if cfg.data is None else Path(cfg.data)
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
