#!/usr/bin/env python
"""Mask R-CNN's polygon mask targets for one batch: detectron2's (pycocotools per proposal, on the
host) against ours (transfer/d2/mask_targets.py, on the device; several images per pass, as
training does, and one image at a time): ms per batch and read-backs.

    python tools/bench_mask_targets.py --device cuda      # a batch of 16 images, 128 foreground proposals each
    python tools/bench_mask_targets.py --device cpu --images 2 --rois 16

The objects are those of the synthetic COCO data of bench_finetune.py (written once under --synthetic).
"""
import argparse

from transfer.errors import UserError, cli


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--images", type=int, default=16, help="images per batch")
    p.add_argument("--rois", type=int, default=128, help="foreground proposals per image (detectron2: up to 128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--synthetic", default="/tmp/coco_synth", metavar="ROOT",
                   help="synthetic COCO data (written if missing)")
    args = p.parse_args(argv)

    import torch

    from transfer import finetune_bench
    from transfer.datasets import demo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU here (use --device cpu)")
    root = demo.synthetic_coco(args.synthetic)
    rows = finetune_bench.time_mask_targets(root, args.device, args.images, args.rois, repeats=args.repeats)
    print("| rasterizer | device | ROIs | ms/batch | read-backs/batch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.rasterizer} | {r.device} | {r.rois} | {r.ms_per_batch:.1f} | {r.readbacks} |")


if __name__ == "__main__":
    main()
