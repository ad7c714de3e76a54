#!/usr/bin/env python
"""The whole pipeline on the built-in demo data, on a CPU (what `make demo` runs):

  1. generate the demo datasets (real on-disk layouts)            transfer.datasets.demo
  2. pre-train a tiny MoCo v2 ResNet-50 on the demo ImageFolder   tools/pretrain_moco.py
  3. train a tiny supervised ResNet-50 on the same images         tools/train_supervised.py
  4. convert both into detectron2 weights + config overlays       tools/convert_to_d2.py
  5. fine-tune both on the tasks' demo schedules, then report     tools/run_suite.py

Each step is a command a user could type; it is printed before it runs. Running the demo again
resumes: steps whose results exist are skipped, and the suite skips finished runs. The numbers
come from a few minutes of CPU training on synthetic images: they show that the pipeline works,
not how MoCo compares with supervised pre-training (that needs the real datasets).
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from transfer.errors import UserError, cli

REPO = Path(__file__).resolve().parent.parent
# Sizes for a CPU: configs/pretrain/demo.yaml for MoCo v2, and a supervised run of the same
# length, image size and batch on the same images.
ARCH = "resnet50"
SUPERVISED = ["--epochs", 2, "--image-size", 64, "--batch-size", 32, "--workers", 2]
# One task per kind of model (C4 detection, FPN detection + masks, semantic segmentation): the
# default demo took 6 minutes on 2 idle CPU cores; `--tasks all` runs every task.
DEMO_TASKS = "voc07,coco_fpn_1x,cityscapes_sem"


def step(title: str, command: list, timings: dict) -> None:
    print(f"\n==> {title}\n$ {shlex.join(str(c) for c in command)}", flush=True)
    start = time.time()
    done = subprocess.run([str(c) for c in command], cwd=REPO)
    timings[title] = time.time() - start
    if done.returncode != 0:
        raise UserError(f"demo step '{title}' failed (exit code {done.returncode}); its output is above")


def skip(title: str, result: Path, timings: dict) -> None:
    print(f"\n==> {title}: done already ({result})", flush=True)
    timings[title] = 0.0


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "results" / "demo",
                   help="where checkpoints, weights and the suite's reports go")
    p.add_argument("--datasets", type=Path, help="demo datasets root (default: datasets/demo)")
    p.add_argument("--tasks", default=DEMO_TASKS, help=f"tasks for the suite, or all (default: {DEMO_TASKS})")
    p.add_argument("--trials", type=int, default=1)
    args = p.parse_args(argv)
    python, out, timings = sys.executable, args.output.resolve(), {}
    started = time.time()

    from transfer.datasets import demo

    print("==> demo datasets", flush=True)
    root = demo.ensure(args.datasets)
    print(f"    {root}")

    moco_ckpt = out / "pretrain" / "checkpoint_last.pth.tar"
    if _finished_pretraining(moco_ckpt):
        skip("MoCo v2 pre-training", moco_ckpt, timings)
    else:
        resume = ["--resume", moco_ckpt] if moco_ckpt.exists() else []
        step("MoCo v2 pre-training", [python, "tools/pretrain_moco.py", "--preset", "demo",
                                      "--arch", ARCH, "--data", root / "imagenet",
                                      "--output", moco_ckpt.parent, *resume], timings)

    supervised_ckpt = out / "supervised" / f"supervised_{ARCH}.pth"
    if supervised_ckpt.exists():
        skip("supervised pre-training", supervised_ckpt, timings)
    else:
        step("supervised pre-training", [python, "tools/train_supervised.py", "--data", root / "imagenet",
                                         "--arch", ARCH, *SUPERVISED, "--output", supervised_ckpt.parent],
             timings)

    weights = {"moco_v2": out / "weights" / "moco_v2_demo.pkl",
               "supervised": out / "weights" / "supervised_demo.pkl"}
    for (name, pkl), source in zip(weights.items(), (moco_ckpt, supervised_ckpt)):
        title = f"convert {name}"
        if pkl.exists() and pkl.stat().st_mtime >= source.stat().st_mtime:
            skip(title, pkl, timings)
        else:
            step(title, [python, "tools/convert_to_d2.py", source, "--output", pkl], timings)

    suite_dir = out / "suite"
    step("transfer suite", [python, "tools/run_suite.py", "--tasks", args.tasks,
                            "--weights", f"moco_v2={weights['moco_v2']}",
                            "--baseline", weights["supervised"], "--trials", args.trials,
                            "--schedule", "demo", "--datasets", root, "--output", suite_dir], timings)

    print("\n==> time per step")
    for title, seconds in timings.items():
        print(f"    {title:<28} {seconds / 60:6.1f} min")
    print(f"    {'total':<28} {(time.time() - started) / 60:6.1f} min")
    print(f"\nReports: {suite_dir}/summary.md, summary.csv, runs.csv, deltas.png")


def _finished_pretraining(checkpoint: Path) -> bool:
    """True when the checkpoint exists and reached the last epoch it was configured for."""
    if not checkpoint.exists():
        return False
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return ckpt.get("epoch", 0) >= ckpt.get("config", {}).get("epochs", float("inf"))


if __name__ == "__main__":
    main()
