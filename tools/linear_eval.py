#!/usr/bin/env python
"""Linear classification on frozen features (the MoCo paper's protocol; official main_lincls.py flags).

    python tools/linear_eval.py --pretrained runs/moco_v2/checkpoint_last.pth.tar \\
        --data /datasets/imagenet --output runs/moco_v2/lincls

Defaults are the protocol: lr 30, batch 256, 100 epochs, lr x0.1 at 60 and 80, no weight decay,
backbone frozen in eval mode. Writes OUTPUT/linear_eval.json (final and best top-1 / top-5).
"""
import argparse

from transfer.errors import cli
from transfer.linear_eval import LinearEvalConfig, linear_eval
from transfer.pretrain import settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_arguments(p, LinearEvalConfig)  # one flag per field, with its default and help
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = vars(parse_args(argv))
    args["schedule"] = tuple(args["schedule"])
    result = linear_eval(LinearEvalConfig(**args))
    print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  (best top-1 {result['best_top1']:.2f} "
          f"at epoch {result['best_epoch']}) -> {args['output']}/linear_eval.json")


if __name__ == "__main__":
    main()
