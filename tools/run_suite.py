#!/usr/bin/env python
"""Fine-tune weights on transfer tasks, next to a supervised baseline, and report the numbers.

    python tools/run_suite.py --tasks voc07+12,coco_fpn_1x --weights moco.pkl \\
        --baseline R-50.pkl --trials 5 --schedule full --output results/moco [--num-gpus 8]
    python tools/run_suite.py --tasks voc,coco --schedule demo    # the demo's weights, demo data

--tasks takes task names and families (voc, coco, lvis, cityscapes, semseg, all). A task whose
data is missing while its fallback's is there (LVIS v1 -> v0.5, voc_sem -> voc_sem_train) runs
the fallback, in a folder of that name, and the plan says so. Without --weights, the newest
weights of a demo or pre-training run under results/ (or output/pretrain/) are used, and with
the demo's, its supervised weights as --baseline; --output defaults to results/<label>-<schedule>.
Without --schedule each task runs its own: full, or the one a custom dataset YAML names; a
--schedule other than a YAML's overrides it, and the plan says so.

--fractions 0.01,0.1,1 trains each task on those fractions of its training images (a labelled
subset that depends on the dataset, the fraction and a subset seed only, the same for every
weights file and trial; the schedule shrinks with it, to at least a tenth); --backbone
finetune,frozen adds the frozen-backbone variant (FREEZE_AT 5, FrozenBN: only FPN and heads
train). summary.md then has a label-efficiency section and label_efficiency.png (README,
"Transfer regimes").

Every (weights, task, regime, trial) is one run with its own folder under --output; running the same
command again skips finished runs and re-runs failed or interrupted ones; a run whose resolved
config equals another's (the 1x and 2x tasks' demo schedules) reuses that run's result. The
reports (runs.csv, summary.csv, summary.md, per_class.csv, deltas.png) are rewritten at the end;
tools/make_report.py rewrites them at any time. With --schedule demo and no --datasets, the
built-in demo datasets are used. A full disk fails the run in progress with a line naming the
path and the free space; where not even that can be recorded, the suite stops after writing the
reports it can, and the same command resumes once there is room.
"""
import argparse
import signal
import sys
from pathlib import Path

from transfer import REPO, regimes, report, slurm, suite
from transfer.errors import UserError, cli
from transfer.fileio import DiskError
from transfer.tasks import ALL, FAMILIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True,
                   help=f"comma-separated task names, families ({', '.join([*FAMILIES, ALL])}) "
                        "or custom dataset YAML files")
    p.add_argument("--weights", nargs="+", metavar="[LABEL=]FILE",
                   help="weights to evaluate: detectron2 .pkl, or a checkpoint to convert "
                        "(MoCo, torchvision); labelled by file name unless LABEL= is given "
                        "(default: the newest demo / pre-training weights under results/)")
    p.add_argument("--baseline", metavar="FILE",
                   help=f"supervised ImageNet weights (torchvision .pth or detectron2 / MSRA .pkl), "
                        f"labelled '{suite.BASELINE}' and compared against")
    p.add_argument("--trials", type=int, default=1, help="runs per weights and task, seeds 0..N-1 "
                                                         "(the paper averages 5)")
    p.add_argument("--fractions", default="1", type=regimes.parse_fractions, metavar="F[,F...]",
                   help="fractions of each task's training images to fine-tune on, e.g. 0.01,0.1,1 "
                        "(default: 1, all of them)")
    p.add_argument("--backbone", default="finetune", type=regimes.parse_backbones, metavar="MODE[,MODE...]",
                   help="finetune (the paper's: the whole backbone trains) and / or frozen (FREEZE_AT 5, "
                        "FrozenBN; only FPN and heads train) (default: finetune)")
    p.add_argument("--schedule",
                   help="full (the paper's), quick (1/8 of it) or demo (built-in demo data, CPU); "
                        "a custom dataset YAML with its own schedule adds 'custom' (default: each "
                        "task's own: full, or the schedule a custom dataset YAML names)")
    p.add_argument("--output", type=Path,
                   help="suite folder (default: results/<label of the first weights>-<schedule>)")
    p.add_argument("--datasets", type=Path,
                   help="datasets root (default: $DETECTRON2_DATASETS; the demo data for --schedule demo)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per run")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"])
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="detectron2 config overrides for every run, after all flags (e.g. "
                        "SOLVER.IMS_PER_BATCH 8); an output folder keeps the overrides it was started with")
    slurm.add_arguments(p, "run")
    return p.parse_args(argv)


def datasets_root(args):
    if args.datasets is not None:
        if not args.datasets.is_dir():
            raise UserError(f"--datasets {args.datasets}: not a folder")
        return args.datasets.resolve()
    if args.schedule == "demo":
        from transfer.datasets import demo

        return demo.ensure()
    return None  # tools/finetune.py reads $DETECTRON2_DATASETS


def make_launcher(args, datasets):
    if args.num_gpus < 1:
        raise UserError(f"--num-gpus: must be at least 1, got {args.num_gpus}")
    if args.launcher == "slurm":
        return suite.SlurmLauncher(args.output, args.num_gpus, datasets, args.opts, **slurm.options(args))
    if args.num_gpus > 1:
        import torch

        if torch.cuda.device_count() < args.num_gpus:
            raise UserError(f"--num-gpus {args.num_gpus}: this machine has "
                            f"{torch.cuda.device_count()} GPU(s)")
    return suite.LocalLauncher(args.num_gpus, datasets, args.opts)


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, scancel) stops the run in progress like Ctrl-C


def default_weights(args, root) -> None:
    """Without --weights: the newest demo / pre-training weights under ``root``, said on the first line.

    With the demo's weights and no --baseline, the demo's supervised weights become the baseline.
    """
    found = suite.find_default_weights(root)
    if found is None:
        raise UserError(f"no --weights given, and no weights of a demo or pre-training run under "
                        f"{root}: pass --weights FILE (a detectron2 .pkl or a MoCo checkpoint)")
    spec, baseline = found
    args.weights = [spec]
    print(f"weights: {spec} (no --weights: the newest demo / pre-training weights)", file=sys.stderr)
    if args.baseline is None and baseline is not None:
        args.baseline = baseline
        print(f"baseline: {baseline} (no --baseline: the demo's supervised weights)", file=sys.stderr)


def default_output(args, root, schedule: str) -> None:
    args.output = Path(root) / "results" / f"{suite.weights_label(args.weights[0])}-{schedule}"
    print(f"output: {args.output} (no --output)", file=sys.stderr)


def reports_that_fit(output) -> None:
    """The reports of the runs recorded so far, or one line saying why they could not be written."""
    if report.load_runs(output).empty:
        return
    try:
        print(f"reports: {report.write_reports(output, baseline=suite.BASELINE)}", file=sys.stderr)
    except DiskError as e:
        print(f"reports not written: {e}", file=sys.stderr)


@cli
def main(argv=None, root=REPO):
    """``root``: where default weights are looked for and the default --output goes."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    suite.expand_tasks(args.tasks)  # a misspelt task fails before anything is looked for or generated
    from transfer.finetune import check_opts

    check_opts(args.opts)  # before any run, and before the output folder records them
    if not args.weights:
        default_weights(args, Path(root))
    if args.output is None and args.schedule:
        default_output(args, root, args.schedule)
    datasets = datasets_root(args)
    notes, schedules = [], {}
    tasks = suite.resolve_tasks(args.tasks, args.schedule, datasets, notes, schedules)
    if args.output is None:  # each task's own schedule: known once the tasks are
        default_output(args, root, "-".join(dict.fromkeys(schedules.values())))
    weights = [suite.prepare_weights(w, args.output) for w in args.weights]
    if any(w.label == suite.BASELINE for w in weights):
        raise UserError(f"--weights: the label '{suite.BASELINE}' is reserved for --baseline")
    if args.baseline:
        weights.insert(0, suite.prepare_weights(str(args.baseline), args.output, label=suite.BASELINE))
    launcher = make_launcher(args, datasets)
    suite.check_datasets(tasks, datasets)
    runs = suite.plan(weights, tasks, schedules, args.trials, args.output, args.fractions, args.backbone)
    suite.check_settings(args.output, args.opts)
    repeats = suite.repeated_runs(runs, args.num_gpus, datasets, args.opts)
    try:
        outcomes = suite.run_suite(runs, launcher, repeats=repeats, notes=notes)
    except KeyboardInterrupt:
        print("\nstopped: finished runs are kept; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    except DiskError as e:  # not even a run's failure could be recorded: stop, keeping every result
        print(f"error: {e}; stopped: finished runs are kept; run the same command again once it can be "
              "written", file=sys.stderr)
        reports_that_fit(args.output)
        sys.exit(2)

    written = report.write_reports(args.output, baseline=suite.BASELINE)
    print(written.summary_md.read_text())
    print(f"reports: {written}")
    unfinished = [o for o in outcomes if o.status != "ok"]
    if unfinished:
        print(f"{len(unfinished)} run(s) did not succeed: " + ", ".join(o.run.name for o in unfinished),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
