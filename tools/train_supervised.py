#!/usr/bin/env python
"""Supervised pre-training of a torchvision ResNet on an ImageFolder: the baseline MoCo is compared with.

    python tools/train_supervised.py --data datasets/demo/imagenet --arch resnet50 --epochs 2 --output runs/sup

Writes OUTPUT/supervised_<arch>.pth, a plain torchvision state dict (tools/convert_to_d2.py reads it).
"""
import argparse

from transfer.errors import cli
from transfer.pretrain.supervised import SupervisedConfig, train_supervised


def parse_args(argv=None):
    d = SupervisedConfig(data="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="root with train/<class>/ (val/ is evaluated when present); default: demo images")
    p.add_argument("--output", default=d.output)
    p.add_argument("-a", "--arch", default=d.arch)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("-b", "--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, help="default 0.1 * batch size / 256")
    p.add_argument("--lr-step", type=int, default=d.lr_step, help="epochs between lr x0.1 decays")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--wd", "--weight-decay", type=float, default=d.wd)
    p.add_argument("-j", "--workers", type=int, default=d.workers)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = vars(parse_args(argv))
    if args["data"] is None:
        from transfer.datasets import demo

        args["data"] = str(demo.ensure() / "imagenet")
    print(f"weights: {train_supervised(SupervisedConfig(**args))}")


if __name__ == "__main__":
    main()
