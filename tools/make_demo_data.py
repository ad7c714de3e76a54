#!/usr/bin/env python
"""Write the built-in demo datasets (ImageNet-style folder, VOC, COCO, LVIS, Cityscapes) and check them.

    python tools/make_demo_data.py [--root datasets/demo] [--seed 0]

The layouts are the real ones (see README, 'Datasets'), so any tool that takes a datasets root
accepts the result, e.g. ``DETECTRON2_DATASETS=datasets/demo``. Running it again is a no-op.
"""
import argparse
from pathlib import Path

from transfer.datasets import demo
from transfer.errors import cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=demo.DEFAULT_ROOT,
                   help="datasets root to write (default: $MOCO_TRANSFER_DEMO or <repo>/datasets/demo)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    root = demo.generate(args.root, seed=args.seed)
    from transfer.datasets import catalog  # imports detectron2: only after the data is there

    catalog.check(demo.DATASET_NAMES, root)
    print(f"demo datasets ready under {root}")


if __name__ == "__main__":
    main()
