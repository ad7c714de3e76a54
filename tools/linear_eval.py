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


def parse_args(argv=None):
    d = LinearEvalConfig(pretrained="", data="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="MoCo checkpoint or torchvision state dict")
    p.add_argument("--data", required=True, help="root with train/<class>/ and val/<class>/")
    p.add_argument("--output", default=d.output)
    p.add_argument("-a", "--arch", help="torchvision ResNet (default: the checkpoint's, else resnet50)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--schedule", type=int, nargs="+", default=list(d.schedule), help="epochs at which lr *= 0.1")
    p.add_argument("--lr", "--learning-rate", type=float, default=d.lr)
    p.add_argument("-b", "--batch-size", type=int, default=d.batch_size)
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
    args["schedule"] = tuple(args["schedule"])
    result = linear_eval(LinearEvalConfig(**args))
    print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  (best top-1 {result['best_top1']:.2f} "
          f"at epoch {result['best_epoch']}) -> {args['output']}/linear_eval.json")


if __name__ == "__main__":
    main()
