#!/usr/bin/env python
"""Sweep pre-training settings (the MoCo paper's ablations): one run per setting, a table and figures.

    # the demo plan (configs/pretrain/ablations/demo.yaml): momentum, mechanism, shuffle-BN on a CPU
    python tools/ablate_moco.py --plan demo --output results/ablation_demo
    # any settings of tools/pretrain_moco.py; several --sweep: their product
    python tools/ablate_moco.py --preset v1 --data /datasets/imagenet --sweep moco-m=0,0.9,0.99,0.999 \\
        --sweep mechanism=moco,memory_bank --nproc-per-node 8 --linear-eval 100 --output results/ablation

Each setting runs tools/pretrain_moco.py in its own folder under --output; a rerun of the same
command skips finished settings and resumes interrupted ones from their last checkpoint. Writes
OUTPUT/ablation.csv, ablation.md (printed) and knn.png, consistency.png, loss.png.

--launcher slurm submits each setting as one SLURM job (its files under OUTPUT/slurm/<job id>/) and
waits for them; --output must then be on a disk the nodes share.
"""
import argparse
import sys

from transfer import slurm
from transfer.errors import UserError, cli
from transfer.pretrain import ablation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", help="a plan (configs/pretrain/ablations/<name>.yaml or a YAML file): a preset and "
                                  "groups of sweeps; default: demo without --sweep")
    p.add_argument("--preset", help="pre-training preset (default: the plan's; v2 without a plan)")
    p.add_argument("--sweep", action="append", default=[], metavar="SETTING=V1,V2,...",
                   help="values of one setting (flag or field name: moco-m or moco_m); several --sweep: their "
                        "product, added to the plan's sweeps")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE", help="a setting of every run")
    p.add_argument("--data", help="ImageFolder root for every run (default: the built-in demo images)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="device of every run")
    p.add_argument("--output", default="results/ablation", help="one folder per setting, the table and figures")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: the runs on this machine, --jobs at a time; slurm: one SLURM job per setting")
    p.add_argument("--jobs", type=int, help="runs at once on this machine (--launcher local; default: one per CPU "
                                            "core when the runs are on the CPU, one thread each; else 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per run, through torchrun")
    p.add_argument("--linear-eval", type=int, metavar="EPOCHS",
                   help="also train a linear classifier on each checkpoint for EPOCHS epochs (tools/linear_eval.py)")
    p.add_argument("--dry-run", action="store_true", help="print the settings and their state; run nothing")
    slurm.add_arguments(p, "setting")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.plan is None and not args.sweep:
        args.plan = "demo"
        print("no --plan or --sweep: the demo plan (configs/pretrain/ablations/demo.yaml)", flush=True)
    plan = ablation.load_plan(args.plan) if args.plan else ablation.Plan("v2", [], {})
    if args.preset:
        plan.preset = args.preset
    sweep = dict(ablation.parse_assignment(text) for text in args.sweep)
    if sweep:
        plan.groups.append(sweep)
    for text in args.set:
        name, (value,) = ablation.parse_assignment(text, several=False)
        plan.fixed[name] = value
    plan.fixed |= {k: v for k, v in (("data", args.data), ("device", args.device)) if v is not None}
    runs = ablation.plan_runs(plan, args.output)
    print(f"{len(runs)} setting(s) of preset {plan.preset} in {args.output}:", flush=True)
    if args.dry_run:
        for run in runs:
            print(f"  {run.label}: {run.state}")
        return
    executor = None
    if args.launcher == "slurm":
        on_cpu = all(run.setting["device"] == "cpu" for run in runs)  # --device cpu: jobs that ask for no GPU
        executor = slurm.executor(args.output, 0 if on_cpu else args.nproc_per_node, **slurm.options(args),
                                  name="moco-ablation")
    ablation.run_all(runs, args.jobs, args.nproc_per_node, args.linear_eval, executor=executor)
    swept = list(dict.fromkeys(["mechanism", *(k for group in plan.groups for k in group)]))
    markdown = ablation.write_table(ablation.table(runs, swept), args.output)
    figures = ablation.figures(runs, args.output)
    print(f"\n{markdown}\n\ntable: {args.output}/ablation.csv, ablation.md; figures: "
          + ", ".join(str(f) for f in figures))
    failed = [r.label for r in runs if not r.result or r.result["status"] == "failed"]
    if failed:
        raise UserError(f"{len(failed)} setting(s) failed: {', '.join(failed)} (see their pretrain.log); "
                        "run the same command again to retry them")


if __name__ == "__main__":
    sys.exit(main())
