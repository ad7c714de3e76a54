#!/usr/bin/env python
"""Supervised pre-training of a torchvision ResNet on an ImageFolder: the baseline MoCo is compared with.

    python tools/train_supervised.py --data datasets/demo/imagenet --arch resnet50 --epochs 2 --output runs/sup

Writes OUTPUT/supervised_<arch>.pth, a plain torchvision state dict (tools/convert_to_d2.py reads it).
"""
import argparse

from transfer.errors import cli
from transfer.pretrain import settings
from transfer.pretrain.supervised import SupervisedConfig, train_supervised


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_arguments(p, SupervisedConfig)  # one flag per field, with its default and help
    return p.parse_args(argv)


@cli
def main(argv=None):
    print(f"weights: {train_supervised(SupervisedConfig(**vars(parse_args(argv))))}")


if __name__ == "__main__":
    main()
