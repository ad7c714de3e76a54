#!/usr/bin/env python
"""MoCo v1 / v2 pre-training, with the official main_moco.py flag names.

    python tools/pretrain_moco.py --preset v2 --data /datasets/imagenet --output runs/moco_v2
    torchrun --nproc_per_node 8 tools/pretrain_moco.py --preset v2 --data ... --output ...

A preset (configs/pretrain/<name>.yaml) gives every setting; each flag overrides one. Without
--data the built-in demo images are used. With neither --preset nor --data: the demo preset on
a machine without a GPU (a CPU run of a minute or two), an error on one with a GPU. Writes
OUTPUT/checkpoint_last.pth.tar (official layout).
"""
import argparse
import os
from pathlib import Path

import torch.distributed

from transfer import image_folder
from transfer.errors import UserError, cli
from transfer.pretrain.engine import data_dirs, load_config, pretrain

FLAG = argparse.BooleanOptionalAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="v1, v2, demo, or a YAML file (default: v2 with --data; without "
                                     "--data, demo on a machine without a GPU)")
    p.add_argument("--data", help="root with train/<class>/*.jpg (val/ for the k-NN monitor); default: demo images")
    p.add_argument("--output", default="output/pretrain", help="run folder (checkpoint, logs, figures)")
    p.add_argument("--resume", help="checkpoint to continue from (ours or the official code's)")
    p.add_argument("--max-steps", type=int, help="stop at this global step with a checkpoint (time-limited jobs)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default auto: the GPU LOCAL_RANK if CUDA is available")
    p.add_argument("--check-data", action="store_true", default=None,  # None: not a preset setting to override
                   help="decode every training image first; list the ones that fail (more than 1%%: stop)")
    # The preset's settings; default None keeps the preset's value.
    p.add_argument("-a", "--arch", help="torchvision ResNet, e.g. resnet50")
    p.add_argument("--moco-dim", type=int, help="feature dimension")
    p.add_argument("--moco-k", type=int, help="queue size; a multiple of --batch-size")
    p.add_argument("--moco-m", type=float, help="key-encoder momentum")
    p.add_argument("--moco-t", type=float, help="softmax temperature")
    p.add_argument("--mlp", action=FLAG, help="MLP projection head (v2)")
    p.add_argument("--aug-plus", action=FLAG, help="v2 augmentation (blur, stronger jitter)")
    p.add_argument("--cos", action=FLAG, help="cosine learning-rate schedule")
    p.add_argument("--bn-splits", type=int, help="BatchNorm groups per process (shuffle-BN on one device)")
    p.add_argument("--lr", "--learning-rate", type=float, help="learning rate for the global batch")
    p.add_argument("--schedule", type=int, nargs="+", help="epochs at which lr *= 0.1 (without --cos)")
    p.add_argument("--epochs", type=int)
    p.add_argument("-b", "--batch-size", type=int, help="global batch size over all processes")
    p.add_argument("--wd", "--weight-decay", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("-j", "--workers", type=int, help="data loading processes per training process")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int, help="crop size (224 for ImageNet)")
    p.add_argument("--aug-backend", choices=["cpu", "gpu"], help="where the two crops are augmented")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action=FLAG)
    p.add_argument("--compile", action=FLAG, help="torch.compile the encoders (CUDA)")
    p.add_argument("-p", "--print-freq", type=int, help="steps per log row")
    p.add_argument("--monitor-every", type=int, help="epochs between k-NN / dictionary-consistency checks (0: never)")
    p.add_argument("--knn-k", type=int)
    p.add_argument("--knn-t", type=float)
    p.add_argument("--knn-max-images", type=int)
    p.add_argument("--consistency-keys", type=int, help="queued keys re-encoded for the dictionary-consistency figure")
    return p.parse_args(argv)


def choose_preset(preset, data, device, gpu: bool) -> tuple[str, str | None]:
    """The preset a run uses and, when it was not asked for, the line that says why.

    The v2 preset on the demo images would run for hours on a CPU: with neither --preset nor
    --data, a CPU gets the demo preset and a GPU gets an error naming what to pass.
    """
    if preset is not None:
        return preset, None
    if data is not None:
        return "v2", None
    if gpu and device != "cpu":
        raise UserError("no --data: pass --data DIR (an ImageFolder root with train/<class>/*.jpg) "
                        "with --preset v1 or v2, or --preset demo for the built-in demo images")
    return "demo", ("no GPU and no --preset/--data: running the demo preset on the built-in demo "
                    "images (pass --preset v2 --data DIR for ImageNet settings)")


@cli
def main(argv=None):
    args = vars(parse_args(argv))
    args["preset"], note = choose_preset(args["preset"], args["data"], args["device"], torch.cuda.is_available())
    if note:
        print(note, flush=True)
    check_data = args.pop("check_data")
    cfg = load_config(**args)
    if check_data and int(os.environ.get("RANK", 0)) == 0:
        image_folder.scan(data_dirs(cfg.data)[0], Path(cfg.output) / image_folder.SKIPPED)
    checkpoint = pretrain(cfg)
    if torch.distributed.is_initialized():  # under torchrun: one line from rank 0, then a clean exit
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank:
            return
    print(f"checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
