"""Where a suite's pending runs run (this machine, or SLURM jobs), and the suite's loop around them.

A launcher is called with the runs to run and two callbacks, ``on_start(run, note="")`` and
``on_done(outcome)``, and returns the outcomes. ``local`` runs one run at a time on this machine,
each on ``num_gpus`` GPUs through detectron2's launch (inside tools/finetune.py); ``slurm``
submits each run as a job through submitit, and the job takes the same lock on the shared disk.
"""
from __future__ import annotations

import sys

from transfer import slurm
from transfer.runs import Run, locked_by, read_metrics, record_failure, state
from transfer.suite.execution import LOG, Outcome, execute, outcome_of, reuse
from transfer.suite.planning import describe


class LocalLauncher:
    """One run after the other on this machine; each run uses ``num_gpus`` GPUs (detectron2 launch)."""

    def __init__(self, num_gpus: int = 1, datasets=None, opts=()):
        self.num_gpus, self.datasets, self.opts = num_gpus, datasets, tuple(opts)

    def __call__(self, runs: list[Run], on_start, on_done) -> list[Outcome]:
        outcomes, busy = [], []
        for run in runs:
            on_start(run)
            outcome = execute(run, self.num_gpus, self.datasets, self.opts)
            if outcome.status == "busy":
                busy.append(outcome)
            else:
                on_done(outcome)
                outcomes.append(outcome)
        # Runs another invocation was running: wait for it, and finish them if it did not.
        for waiting in busy:
            on_start(waiting.run, f"waiting for {waiting.error}")
            outcome = execute(waiting.run, self.num_gpus, self.datasets, self.opts, wait=True)
            on_done(outcome)
            outcomes.append(outcome)
        return outcomes


class SlurmLauncher:
    """Each run as one SLURM job (submitit): one node, ``num_gpus`` GPUs, the same lock on shared disk.

    The job's resources and ``cluster`` (None: SLURM; "local" or "debug": this machine, what the tests
    use) are transfer/slurm.py's ``executor``'s.
    """

    def __init__(self, output, num_gpus: int = 1, datasets=None, opts=(), partition: str | None = None,
                 time_min: int = 24 * 60, cpus_per_gpu: int = 8, mem_gb: int | None = None,
                 cluster: str | None = None):
        self.num_gpus, self.datasets, self.opts = num_gpus, datasets, tuple(opts)
        self.executor = slurm.executor(output, num_gpus, partition, time_min, cpus_per_gpu, mem_gb, cluster)

    def __call__(self, runs: list[Run], on_start, on_done) -> list[Outcome]:
        import submitit

        jobs, outcomes = {}, []
        for run in runs:
            holder = locked_by(run)
            if holder:  # a job of an earlier invocation is running it
                outcome = Outcome(run, "busy", error=f"running in {holder}")
                on_done(outcome)
                outcomes.append(outcome)
                continue
            job = self.executor.submit(execute, run, self.num_gpus, self.datasets, self.opts)
            on_start(run, f"submitted as job {job.job_id}")
            jobs[job] = run
        for job in submitit.helpers.as_completed(list(jobs)):
            run = jobs[job]
            try:
                outcome = job.result()
            except Exception as e:  # the job itself died: pre-empted, time limit, node failure
                if state(run) in ("new", "interrupted"):
                    record_failure(run, f"SLURM job {job.job_id} failed: {str(e).strip()[-2000:]}")
                outcome = outcome_of(run, read_metrics(run))
            on_done(outcome)
            outcomes.append(outcome)
        return outcomes


def run_suite(runs: list[Run], launcher, stream=None, repeats: dict[Run, Run] | None = None,
              notes=()) -> list[Outcome]:
    """Show the plan, run every run that is not done (with a progress bar), return the outcomes.

    ``repeats`` (see ``repeated_runs``): runs that get the result of the run they repeat;
    ``notes``: lines shown with the plan (``resolve_tasks``'s fallbacks). ``stream``: default
    sys.stderr as it is at the call (a redirected one too). A run whose folder cannot be written
    (``fileio.DiskError``: not even its failure can be recorded) stops the suite with that error.
    """
    from tqdm import tqdm

    stream = stream or sys.stderr
    repeats = repeats or {}
    print(describe(runs), file=stream, flush=True)
    for note in notes:
        print(note, file=stream)
    for run, original in repeats.items():
        print(f"{run.name}: the same run as {original.name}, its result is reused", file=stream)
    pending = [r for r in runs if state(r) != "done"]
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), unit="run", file=stream,
               dynamic_ncols=True)

    def on_start(run, note=""):
        bar.set_description(run.name)
        if note:
            bar.write(f"{run.name}: {note}", file=stream)

    def on_done(outcome: Outcome):
        if outcome.status == "ok":
            shown = ", ".join(f"{k} {v:.1f}" for k, v in list(outcome.metrics.items())[:4]
                              if isinstance(v, (int, float)))
            bar.write(f"{outcome.run.name}: ok in {outcome.seconds:.0f} s  {shown}", file=stream)
            bar.update(1)
        elif outcome.status == "failed":
            error = (outcome.error or "").strip().splitlines()  # a traceback ends with the message
            bar.write(f"{outcome.run.name}: FAILED: {error[-1] if error else ''} "
                      f"(see {outcome.run.dir / LOG})", file=stream)
            bar.update(1)
        else:
            bar.write(f"{outcome.run.name}: {outcome.error}; run again to collect it", file=stream)

    try:
        outcomes = launcher([r for r in pending if r not in repeats], on_start, on_done)
        for run in pending:
            if run in repeats:
                outcome = reuse(run, repeats[run])
                on_done(outcome)
                outcomes.append(outcome)
        return outcomes
    finally:
        bar.close()
