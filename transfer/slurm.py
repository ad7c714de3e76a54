"""SLURM jobs through submitit, for every tool that launches runs (a suite's, a sweep's): the flags and the
executor they build, once.

One job per run: one node, one task, ``num_gpus`` GPUs and ``cpus_per_gpu`` cores per GPU (a CPU job, with
``num_gpus`` 0: ``cpus_per_gpu`` cores); the job's
files (submission script, logs, pickled result) go to ``<output>/slurm/<job id>/``. ``cluster`` is
submitit's: None picks SLURM where its commands (``srun``) are on PATH and is otherwise an error
(asked for SLURM, a tool must not quietly run everything on the login node); "local" or "debug" run
the same jobs on this machine (what the tests use).
"""
from pathlib import Path

from transfer.errors import UserError


def add_arguments(parser, what="run"):
    """The SLURM flags as a group of ``parser``: --partition, --time MINUTES, --cpus-per-gpu, --mem-gb;
    ``what``: what one job runs ("run", "setting"). ``options(args)`` reads them back."""
    group = parser.add_argument_group(f"SLURM (--launcher slurm): one job per {what}")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--time", type=int, default=24 * 60, metavar="MINUTES", help=f"time limit per {what}")
    group.add_argument("--cpus-per-gpu", type=int, default=8)
    group.add_argument("--mem-gb", type=int, help="memory per job")
    return group


def options(args):
    """The keyword arguments of ``executor`` from the flags of ``add_arguments``."""
    return dict(partition=args.partition, time_min=args.time, cpus_per_gpu=args.cpus_per_gpu, mem_gb=args.mem_gb)


def executor(output, num_gpus=1, partition=None, time_min=24 * 60, cpus_per_gpu=8, mem_gb=None, cluster=None,
             name="moco-transfer"):
    """A submitit AutoExecutor whose jobs keep their files under ``<output>/slurm/<job id>/``.

    Raises a UserError naming --launcher slurm when ``cluster`` is None and there is no SLURM here.
    """
    import submitit

    jobs = submitit.AutoExecutor(folder=Path(output) / "slurm" / "%j", cluster=cluster)
    if cluster is None and jobs.cluster != "slurm":
        raise UserError("--launcher slurm: no SLURM found on this machine (srun is not on PATH)")
    parameters = dict(name=name, nodes=1, tasks_per_node=1, timeout_min=time_min,
                      cpus_per_task=cpus_per_gpu * max(1, num_gpus), slurm_partition=partition)
    if jobs.cluster == "slurm":  # the local and debug executors have no GPU parameter
        parameters["gpus_per_node"] = num_gpus
    if mem_gb:
        parameters["mem_gb"] = mem_gb
    jobs.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return jobs
