#!/usr/bin/env python
"""Convert a MoCo / torchvision ResNet checkpoint into detectron2 weights plus their config overlay.

    python tools/convert_to_d2.py moco_v2_800ep.pth.tar             # -> moco_v2_800ep.pkl + .yaml
    python tools/convert_to_d2.py ckpt.pth --output w/r50.pkl --norm BN

The layout (MoCo v1/v2/v3, torchvision, already-converted detectron2) is detected from the content.
"""
import argparse

from transfer.convert import NORMS, convert
from transfer.errors import cli


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint file (.pth / .pth.tar / detectron2 .pkl)")
    parser.add_argument("--output", help="weights file to write, ending in .pkl (default: <checkpoint stem>.pkl "
                        "beside the checkpoint); the overlay YAML goes beside it")
    parser.add_argument("--norm", choices=NORMS, help="the kind of norm layer the overlay records (default: "
                        "SyncBN; GN for GroupNorm weights); fine-tuning uses the task's BN kind unless GN")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="convert weights that hold NaN / Inf values (refused by default)")
    args = parser.parse_args(argv)
    print(convert(args.checkpoint, output=args.output, norm=args.norm,
                  allow_non_finite=args.allow_non_finite).summary())


if __name__ == "__main__":
    main()
