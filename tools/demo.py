#!/usr/bin/env python
"""The whole pipeline on the built-in demo data, on a CPU (what `make demo` runs):

  1. generate the demo datasets (real on-disk layouts)            transfer.datasets.demo
  2. pre-train a tiny MoCo v2 ResNet-50 on the demo ImageFolder   tools/pretrain_moco.py
  3. train a tiny supervised ResNet-50 on the same images         tools/train_supervised.py
  4. convert both into detectron2 weights + config overlays       tools/convert_to_d2.py
  5. fine-tune both on the tasks' demo schedules, then report     tools/run_suite.py
     (cityscapes_sem with 3 trials, so the report shows intervals and tests)
  6. the transfer regimes on voc07 and coco_fpn_1x: 10% of the     tools/run_suite.py --fractions 0.1
     labels, fine-tuned and with the backbone frozen (the report's    --backbone finetune,frozen
     label-efficiency section and label_efficiency.png)

Each step is a command a user could type; it is printed before it runs. Running the demo again
resumes: steps whose results exist are skipped, and the suite skips finished runs. The numbers
come from a few minutes of CPU training on synthetic images: they show that the pipeline works,
not how MoCo compares with supervised pre-training (that needs the real datasets).

The suite step starts --jobs copies of the same run_suite.py command on the same output folder,
each with cores / jobs threads: the runs' locks share the runs out between them (a run another
copy holds is skipped, then waited for), and each copy writes the same reports at the end. The
demo's models are small, so on a few cores two one-thread runs at a time get more done than one
run with every core (1.4x on 2 cores).
"""
import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from transfer import REPO
from transfer.errors import UserError, cli

# Sizes for a CPU: configs/pretrain/demo.yaml for MoCo v2, and a supervised run of the same
# length, image size and batch on the same images.
ARCH = "resnet50"
SUPERVISED = ["--epochs", 2, "--image-size", 64, "--batch-size", 32, "--workers", 2]
# Every task (configs/schedules/, configs/semseg/demo_*.yaml); a 2x task's demo schedule is its 1x
# task's, which the suite runs once for both.
DEMO_TASKS = "all"
# One task gets enough trials for the report's confidence intervals and t-tests (3 is the fewest
# the report tests); the others run --trials times.
STATS_TASK, STATS_TRIALS = "cityscapes_sem", 3
# The regimes (transfer/regimes.py) on one C4 and one FPN task, at one extra fraction: 10% of the
# labels trains a tenth of the demo schedule (8 / 6 iterations), fine-tuned and frozen: 8 short
# runs; 100% fine-tuned is step 5's run.
REGIMES_TASKS, REGIMES = "voc07,coco_fpn_1x", ["--fractions", "0.1", "--backbone", "finetune,frozen"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def step(title: str, command: list, timings: dict, jobs: int = 1, threads: int | None = None,
         logs: Path | None = None) -> None:
    """Run ``command``, or ``jobs`` copies of it at once: the first one's output on the terminal,
    the others' in ``logs``/<title>.<n>.log; ``threads`` sets OMP_NUM_THREADS / MKL_NUM_THREADS."""
    command = [str(c) for c in command]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                              if threads else {}))
    shown = (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(command)
    outputs = [None] + [logs / f"{title.replace(' ', '_')}.{n}.log" for n in range(2, jobs + 1)]
    print(f"\n==> {title}" + (f": {jobs} copies at once" if jobs > 1 else ""), flush=True)
    for output in outputs:
        print(f"$ {shown}" + (f" > {output}" if output else ""), flush=True)
    start = time.time()
    processes = []
    try:
        for output in outputs:
            out = None
            if output:
                output.parent.mkdir(parents=True, exist_ok=True)
                out = open(output, "w")
            processes.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                               stderr=subprocess.STDOUT if out else None), out, output))
        codes = [process.wait() for process, _, _ in processes]
    except BaseException:  # Ctrl-C: stop every copy (the suite keeps finished runs)
        for process, _, _ in processes:
            process.terminate()
        for process, _, _ in processes:
            process.wait()
        raise
    finally:
        for _, out, _ in processes:
            if out:
                out.close()
    timings[title] = time.time() - start
    for code, (_, _, output) in zip(codes, processes):
        if code != 0:
            where = f"see {output}" if output else "its output is above"
            raise UserError(f"demo step '{title}' failed (exit code {code}); {where}")


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
    p.add_argument("--jobs", type=int, default=min(2, cores()),
                   help="fine-tuning runs at a time, each with cores / jobs threads (default: %(default)s)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    python, out, timings = sys.executable, args.output.resolve(), {}
    started = time.time()

    from transfer import suite
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

    weights = {label: out / path for label, path in suite.DEMO_WEIGHTS.items()}
    for (name, pkl), source in zip(weights.items(), (moco_ckpt, supervised_ckpt)):
        title = f"convert {name}"
        if pkl.exists() and pkl.stat().st_mtime >= source.stat().st_mtime:
            skip(title, pkl, timings)
        else:
            step(title, [python, "tools/convert_to_d2.py", source, "--output", pkl], timings)

    suite_dir = out / "suite"
    run_suite = [python, "tools/run_suite.py", "--weights", f"{suite.DEMO_MOCO}={weights[suite.DEMO_MOCO]}",
                 "--baseline", weights[suite.BASELINE], "--schedule", "demo", "--datasets", root,
                 "--output", suite_dir]
    parallel = dict(jobs=args.jobs, threads=max(1, cores() // args.jobs), logs=suite_dir)
    step("transfer suite", [*run_suite, "--tasks", args.tasks, "--trials", args.trials], timings, **parallel)
    if args.trials < STATS_TRIALS:  # the same output folder: the reports cover both steps' runs
        step(f"{STATS_TASK}: {STATS_TRIALS} trials", [*run_suite, "--tasks", STATS_TASK, "--trials", STATS_TRIALS],
             timings, **parallel)
    regime_tasks = [t for t in REGIMES_TASKS.split(",") if args.tasks == DEMO_TASKS or t in args.tasks.split(",")]
    if regime_tasks:
        step("10% labels, frozen backbone", [*run_suite, "--tasks", ",".join(regime_tasks), "--trials", args.trials,
                                             *REGIMES], timings, **parallel)

    print("\n==> time per step")
    for title, seconds in timings.items():
        print(f"    {title:<28} {seconds / 60:6.1f} min")
    print(f"    {'total':<28} {(time.time() - started) / 60:6.1f} min")
    print(f"\nReports: {suite_dir}/summary.md, summary.csv, runs.csv, per_class.csv, deltas.png"
          + (", label_efficiency.png" if regime_tasks else ""))


def _finished_pretraining(checkpoint: Path) -> bool:
    """True when the checkpoint exists and reached the last epoch it was configured for."""
    if not checkpoint.exists():
        return False
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return ckpt.get("epoch", 0) >= ckpt.get("config", {}).get("epochs", float("inf"))


if __name__ == "__main__":
    main()
