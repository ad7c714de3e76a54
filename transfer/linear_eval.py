"""Linear classification on frozen features: the MoCo paper's ImageNet protocol (official main_lincls.py).

The backbone of a pre-trained checkpoint is frozen and kept in eval mode (BatchNorm uses its
running statistics); only a new fc layer (weights ~ N(0, 0.01), bias 0) is trained with SGD:
lr 30, momentum 0.9, no weight decay, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80.
Reads MoCo v1/v2 checkpoints (official layout, ours too) and plain torchvision state dicts.
"""
import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from transfer import fileio
from transfer.errors import UserError
from transfer.fileio import atomic_torch_save, atomic_write_json
from transfer.image_folder import SKIPPED, ImageFolder, check_skipped, read_skipped
from transfer.pretrain.augment import classification_transform, eval_transform
from transfer.pretrain.classification import evaluate
from transfer.pretrain.contrastive import small_image_stem
from transfer.pretrain.knn import backbone
from transfer.pretrain.precision import PRECISIONS, autocast, autocast_dtype
from transfer.pretrain.settings import setting

MOCO_PREFIX = "module.encoder_q."


@dataclasses.dataclass
class LinearEvalConfig:
    """Every setting of linear evaluation; the fields are tools/linear_eval.py's flags (settings.add_arguments)."""
    pretrained: str = setting("MoCo checkpoint or torchvision state dict")
    data: str = setting("root with train/<class>/ and val/<class>/")
    output: str = setting("folder for linear_eval.json and linear_classifier.pth", "output/linear_eval")
    arch: Optional[str] = setting("torchvision ResNet (default: the checkpoint's, else resnet50)", None,
                                  flags=("-a", "--arch"))
    epochs: int = setting("training epochs", 100)
    schedule: tuple[int, ...] = setting("epochs at which lr *= 0.1", (60, 80))
    lr: float = setting("learning rate", 30.0, flags=("--lr", "--learning-rate"))
    batch_size: int = setting("batch size", 256, flags=("-b", "--batch-size"))
    momentum: float = setting("SGD momentum", 0.9)
    wd: float = setting("weight decay", 0.0, flags=("--wd", "--weight-decay"))
    workers: int = setting("data loading processes", 8, flags=("-j", "--workers"))
    image_size: int = setting("crop size", 224)
    seed: int = setting("seed of the fc's initialisation and the data order", 0)
    precision: str = setting("auto: bf16 autocast on CUDA, fp32 on CPU", "auto", choices=PRECISIONS)


def load_backbone(path, arch=None):
    """(torchvision model with the checkpoint's backbone, arch). The fc is left for the caller.

    A MoCo checkpoint's ``module.encoder_q.*`` (fc/MLP head dropped), or a plain torchvision state dict;
    a 3x3 conv1 is the small-image stem (``--small-stem``).
    """
    ckpt = fileio.load_tensors(path, "--pretrained")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    if any(k.startswith(MOCO_PREFIX) for k in state):
        state = {k[len(MOCO_PREFIX):]: v for k, v in state.items() if k.startswith(MOCO_PREFIX)}
    elif "conv1.weight" not in state:
        raise UserError(f"--pretrained {path}: neither a MoCo checkpoint (module.encoder_q.*) "
                        "nor a torchvision ResNet state dict")
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    arch = arch or (ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None) or "resnet50"
    model = torchvision.models.get_model(arch)
    if "conv1.weight" in backbone and backbone["conv1.weight"].shape[-1] == 3:
        small_image_stem(model)  # pre-trained with --small-stem
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError:  # shape mismatch
        missing, unexpected = [], ["(tensor shapes differ)"]
    if set(missing) != {"fc.weight", "fc.bias"} or unexpected:
        raise UserError(f"--pretrained {path}: does not fit --arch {arch} "
                        f"(missing {sorted(set(missing) - {'fc.weight', 'fc.bias'})[:3]}, unexpected {unexpected[:3]})")
    return model, arch


def image_folders(data, image_size, skipped=None):
    """(train, val) ImageFolders; undecodable images are replaced and listed in ``skipped``."""
    root = Path(data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"--data {root}: expected an ImageFolder root with train/<class>/ and val/<class>/; "
                            f"{root / split} does not exist")
    return (ImageFolder(root / "train", classification_transform(image_size), skipped=skipped),
            ImageFolder(root / "val", eval_transform(image_size), skipped=skipped))


def linear_eval(cfg: LinearEvalConfig) -> dict:
    """Train the linear classifier; writes OUTPUT/linear_eval.json (returned) and the trained
    torchvision model OUTPUT/linear_classifier.pth ({"arch", "state_dict", "top1"})."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = autocast_dtype(cfg.precision, device)
    output = Path(cfg.output)
    train_set, val_set = image_folders(cfg.data, cfg.image_size, skipped=output / SKIPPED)
    model, arch = load_backbone(cfg.pretrained, cfg.arch)
    model.fc = nn.Linear(model.fc.in_features, len(train_set.classes))
    nn.init.normal_(model.fc.weight, std=0.01)
    nn.init.zeros_(model.fc.bias)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("fc.")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    model = model.to(device)
    features = backbone(model)  # the frozen part (shares the modules)

    optimizer = torch.optim.SGD(model.fc.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=False, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, **loader_args)

    history, best = [], None
    for epoch in range(cfg.epochs):
        lr = cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.eval()  # frozen BatchNorm: the protocol trains the fc only
        tic, loss_sum, seen = time.perf_counter(), 0.0, 0
        for images, target in train_loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.no_grad(), autocast(device, amp_dtype):
                f = features(images)
            loss = F.cross_entropy(model.fc(f.float()), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(target), seen + len(target)
        metrics = evaluate(model, val_loader, device, amp_dtype)
        row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / seen, **metrics,
               "images_per_s": seen / (time.perf_counter() - tic),
               "skipped_images": check_skipped(output / SKIPPED, len(train_set) + len(val_set))}
        history.append(row)
        best = row if best is None or row["top1"] > best["top1"] else best
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.3f}  val top-1 {row['top1']:.2f}  "
              f"top-5 {row['top5']:.2f}")

    # The official sanity check: nothing but fc may have changed.
    state = model.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(state[k].cpu(), v)]
    if changed:
        raise RuntimeError(f"linear evaluation changed frozen backbone tensors: {changed[:3]}")
    result = {"pretrained": str(cfg.pretrained), "arch": arch, "top1": history[-1]["top1"], "top5": history[-1]["top5"],
              "best_top1": best["top1"], "best_epoch": best["epoch"], "history": history,
              "skipped_images": read_skipped(output / SKIPPED),
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}}
    atomic_torch_save({"arch": arch, "state_dict": {k: v.cpu() for k, v in state.items()}, "top1": result["top1"]},
                      output / "linear_classifier.pth")
    atomic_write_json(output / "linear_eval.json", result)
    return result
