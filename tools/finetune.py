#!/usr/bin/env python
"""Fine-tune detectron2 weights on one benchmark task; write <output>/metrics.json.

    python tools/finetune.py --task voc07+12 --weights moco.pkl --schedule full --seed 0 \\
        --output results/moco/voc07+12/full/seed0 [--datasets ROOT] [--num-gpus 8] [KEY VALUE ...]

--task is a registered task (--list shows them) or a custom dataset's YAML file. Trailing
KEY VALUE pairs override the resolved detectron2 config (e.g. SOLVER.BASE_LR 0.01).
Exit codes: 0 done, 1 the run failed (metrics.json says why), 2 bad input.
"""
import argparse
import sys

from transfer import regimes
from transfer.errors import cli


@cli
def main(argv=None):
    from transfer.suite import die_with_suite

    die_with_suite()  # started by a suite: end with it
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help="task name or custom dataset .yaml")
    p.add_argument("--weights", help="detectron2 weights .pkl (its overlay .yaml beside it)")
    p.add_argument("--schedule", help="full | quick | demo (default: full, or a custom dataset's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this fraction of the training images (a deterministic labelled subset, "
                        "schedule scaled with it; default: all)")
    p.add_argument("--backbone", default=regimes.FINETUNE, choices=regimes.BACKBONES,
                   help="frozen: FREEZE_AT 5 and FrozenBN, only FPN and heads train (default: finetune)")
    p.add_argument("--output", help="run folder (metrics.json, logs, checkpoints)")
    p.add_argument("--datasets", help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs; CPU processes without GPUs)")
    p.add_argument("--max-ims-per-gpu", type=int, help="images one GPU holds; fewer than the batch "
                   "needs halves batch and LR and doubles iterations, steps and warm-up (default: keep the batch)")
    p.add_argument("--allow-small-batch", action="store_true",
                   help="let --max-ims-per-gpu go below 8 images per BN group (runs.csv marks such runs)")
    p.add_argument("--amp", action="store_true", help="mixed precision (GPU)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --output has a checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep model_*.pth after a successful run")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="detectron2 config KEY VALUE pairs")
    args = p.parse_args(argv)

    if args.list:
        from transfer.tasks import TASKS

        for task in TASKS.values():
            print(f"{task.name:16s} {task.description}")
        return
    missing = [f"--{name}" for name in ("task", "weights", "output") if getattr(args, name) is None]
    if missing:
        p.error(f"required: {', '.join(missing)}")

    from transfer.finetune import RunFailed, finetune

    try:
        record = finetune(args.task, args.weights, args.schedule, args.seed, args.output, args.datasets,
                          args.num_gpus, args.opts, max_ims_per_gpu=args.max_ims_per_gpu, amp=args.amp,
                          resume=not args.no_resume, keep_checkpoints=args.keep_checkpoints,
                          allow_small_batch=args.allow_small_batch, fraction=args.fraction,
                          backbone=args.backbone)
    except RunFailed as e:
        print(f"error: run failed: {e} (record: {args.output}/metrics.json)", file=sys.stderr)
        sys.exit(1)
    print("  ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in record["metrics"].items()))


if __name__ == "__main__":
    main()
