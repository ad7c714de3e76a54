"""A transfer suite: plan every (weights, task, trial) run, run the missing ones, resume after a stop.

Each run owns one folder, ``<output>/<weights label>/<task>/<schedule>/seed<seed>/``, in which
``tools/finetune.py`` writes ``metrics.json`` atomically when the run ends (also when it fails);
transfer/runs.py is the one module that knows that folder (its path, state, record, lock and
attempts log). The suite decides what to run from those files alone: a run whose metrics.json says
"ok" is done; a failed run, or one that was interrupted (no metrics.json), runs again. A Ctrl-C, a
crash or a full disk therefore loses at most the runs in progress.

- ``planning``: weights, tasks and trials -> runs (``plan``), checked before anything trains; a
  run whose resolved config equals an earlier run's (``repeated_runs``: the demo schedules of a
  1x and a 2x task) is not trained, it gets that run's result.
- ``execution``: one run in its own ``tools/finetune.py`` subprocess (a crash, a leak or a CUDA
  error cannot take the suite down) under the run's lock, which the subprocess inherits, so
  concurrent invocations on the same output never run the same run twice.
- ``launchers``: ``local`` (one run at a time on this machine) or ``slurm`` (a job per run,
  through submitit), and ``run_suite``, the loop that shows the plan and the progress.
"""
from transfer.runs import BASELINE, Run, RunBusy, RunLock, Weights, locked_by, read_metrics, state
from transfer.suite.execution import SUITE_PID, Outcome, die_with_suite, execute, finetune_command, reuse
from transfer.suite.launchers import LocalLauncher, SlurmLauncher, run_suite
from transfer.suite.planning import (
    DEMO_MOCO,
    DEMO_WEIGHTS,
    LABEL,
    check_datasets,
    check_settings,
    describe,
    expand_tasks,
    find_default_weights,
    plan,
    prepare_weights,
    repeated_runs,
    resolve_tasks,
    weights_label,
)

__all__ = [
    "BASELINE", "DEMO_MOCO", "DEMO_WEIGHTS", "LABEL", "SUITE_PID", "LocalLauncher", "Outcome", "Run",
    "RunBusy", "RunLock", "SlurmLauncher", "Weights", "check_datasets", "check_settings", "describe",
    "die_with_suite", "execute", "expand_tasks", "finetune_command", "find_default_weights", "locked_by", "plan",
    "prepare_weights", "read_metrics", "repeated_runs", "resolve_tasks", "reuse", "run_suite", "state",
    "weights_label",
]
