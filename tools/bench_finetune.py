#!/usr/bin/env python
"""Fine-tuning speed per task, precision and heads: s/iter, data s/iter, images/s, peak GPU memory,
operators and GPU read-backs per step.

    # one GPU: batch 16, random init, BN, full-size inputs on synthetic
    # COCO-format data with COCO's image size and instance count (written once under /tmp/coco_synth);
    # detectron2's RPN / ROI heads against our sync-free ones
    python tools/bench_finetune.py --tasks coco_fpn_1x,coco_c4_1x --schedule full --batch 16 \\
        --precision fp32,amp --heads detectron2,sync_free --synthetic /tmp/coco_synth \\
        MODEL.RESNETS.NORM BN MODEL.FPN.NORM BN
    # a CPU smoke run on the built-in demo data
    python tools/bench_finetune.py --tasks voc07 --precision fp32 --iters 2 --warmup 1

Without --datasets, the built-in demo data is used (generated if missing). Trailing KEY VALUE
pairs override every config, as in tools/finetune.py.
"""
import argparse
import tempfile

from transfer.errors import UserError, cli


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="coco_fpn_1x,coco_c4_1x", help="comma-separated task names")
    p.add_argument("--weights", help="detectron2 weights .pkl (default: a random-init ResNet-50)")
    p.add_argument("--precision", default="fp32,amp", help="comma-separated: fp32, amp (GPU only)")
    p.add_argument("--schedule", default="demo", help="whose input sizes and batch to use: full | quick | demo")
    p.add_argument("--heads", default="detectron2",
                   help="comma-separated: detectron2 (its RPN and ROI heads), sync_free (ours, transfer/d2/)")
    p.add_argument("--batch", type=int, help="SOLVER.IMS_PER_BATCH (default: the schedule's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--datasets", help="datasets root (default: the built-in demo data)")
    p.add_argument("--synthetic", metavar="ROOT",
                   help="use (and first write) synthetic COCO train data with COCO's load under ROOT")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="detectron2 config KEY VALUE pairs")
    args = p.parse_args(argv)

    import torch

    from transfer import finetune_bench
    from transfer.d2.sync_free import HEADS
    from transfer.datasets import demo

    precisions = args.precision.split(",")
    if "amp" in precisions and not torch.cuda.is_available():
        raise UserError("--precision amp: mixed precision needs a GPU (use --precision fp32)")
    unknown = sorted(set(args.heads.split(",")) - set(HEADS))
    if unknown:
        raise UserError(f"--heads {args.heads}: {', '.join(unknown)} is not one of {', '.join(HEADS)}")
    if args.synthetic and args.datasets:
        raise UserError("--synthetic and --datasets: give one of them")
    root = demo.synthetic_coco(args.synthetic) if args.synthetic else args.datasets or demo.ensure()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or finetune_bench.random_init_weights(tmp)
        for task in args.tasks.split(","):
            for precision in precisions:
                for heads in args.heads.split(","):
                    rows.append(finetune_bench.time_steps(task, weights, precision, args.schedule, args.batch,
                                                          args.warmup, args.iters, root, args.opts, heads))
                    print(finetune_bench.markdown(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(finetune_bench.markdown(rows))


if __name__ == "__main__":
    main()
