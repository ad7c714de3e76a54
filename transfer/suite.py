"""A transfer suite: plan every (weights, task, trial) run, run the missing ones, resume after a stop.

A run is identified by (weights file hash, task, schedule, seed) and owns one folder,

    <output>/<weights label>/<task>/<schedule>/seed<seed>/

in which ``tools/finetune.py`` writes ``metrics.json`` atomically when the run ends (also when it
fails). The suite decides what to run from those files alone: a run whose metrics.json says "ok"
is done; a failed run, or one that was interrupted (no metrics.json), runs again. A Ctrl-C or a
crash therefore loses at most the runs in progress.

Each run executes in its own ``tools/finetune.py`` subprocess (a crash, a leak or a CUDA error
cannot take the suite down) while the suite holds an exclusive ``flock`` on the run's ``.lock``
file; the subprocess inherits the lock, so it stays held as long as either of them lives.
Concurrent invocations on the same output therefore never run the same run twice: a run locked by
another invocation is waited for at the end and only re-run if that invocation did not finish it.
A run whose resolved config equals an earlier run's of the plan (``repeated_runs``: the demo
schedules of a 1x and a 2x task) is not trained: it gets that run's result (``reuse``).

Launchers: ``local`` runs one run at a time on this machine, each on ``num_gpus`` GPUs through
detectron2's launch (inside tools/finetune.py); ``slurm`` submits each run as a job through
submitit, and the job takes the same lock on the shared file system.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transfer.errors import UserError
from transfer import fileio
from transfer.fileio import atomic_write_json
from transfer.runs import read_record

REPO = Path(__file__).resolve().parent.parent
FINETUNE = REPO / "tools" / "finetune.py"
BASELINE = "supervised"
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# What tools/demo.py writes in its output folder (results/demo): label -> file.
DEMO_MOCO = "moco_v2"
DEMO_WEIGHTS = {DEMO_MOCO: "weights/moco_v2_demo.pkl", BASELINE: "weights/supervised_demo.pkl"}


# ---------------------------------------------------------------------------------------------
# What to run

@dataclass(frozen=True)
class Weights:
    label: str   # the name reports use; "supervised" marks the baseline
    path: Path   # detectron2 weights (.pkl), with its config overlay beside it when converted
    sha256: str


@dataclass(frozen=True)
class Run:
    weights: Weights
    task: str  # a registered task's name, or the name inside a custom dataset YAML
    schedule: str
    seed: int
    output: Path
    task_spec: str = ""  # what tools/finetune.py --task gets: the name, or the custom YAML's path

    @property
    def name(self) -> str:
        return f"{self.weights.label}/{self.task}/{self.schedule}/seed{self.seed}"

    @property
    def dir(self) -> Path:
        return self.output / self.weights.label / self.task / self.schedule / f"seed{self.seed}"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"


def weights_label(spec: str) -> str:
    """The label of ``[LABEL=]PATH``: LABEL, else the file name up to its first dot."""
    label, sep, path = spec.partition("=")
    return label if sep and label else Path(path or spec).name.split(".")[0]


def prepare_weights(spec: str, workdir, label: str | None = None) -> Weights:
    """``[LABEL=]PATH`` -> detectron2 weights; other checkpoint layouts are converted into workdir.

    A ``.pkl`` is used as it is (ours, or detectron2's MSRA R-50.pkl); anything else (a MoCo
    checkpoint, a torchvision state dict) goes through transfer.convert once, into
    ``<workdir>/weights/<label>.pkl`` with its overlay, and is reused while it is newer than the source.
    """
    _, sep, path = spec.partition("=")
    path = Path(path if sep else spec).expanduser()
    label = label or weights_label(spec)
    if not LABEL.match(label):
        raise UserError(f"{spec}: label '{label}' must be letters, digits and ._+- (name it with LABEL=PATH)")
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix != ".pkl":
        converted = Path(workdir) / "weights" / f"{label}.pkl"
        if not converted.is_file() or converted.stat().st_mtime < path.stat().st_mtime:
            from transfer.convert import convert

            convert(path, output=converted)
        path = converted
    return Weights(label, path.resolve(), fileio.sha256_of(path))


def find_default_weights(root=REPO) -> tuple[str, Path | None] | None:
    """The newest weights a demo or pre-training run left under ``root`` (the repository).

    Returns (``LABEL=PATH``, the demo's supervised weights beside them or None), or None when
    there are none. Looked for: tools/demo.py's MoCo weights (results/*/weights/), and the last
    checkpoint of tools/pretrain_moco.py runs (results/*/pretrain/ and its default --output).
    """
    from transfer.pretrain.engine import CHECKPOINT, PretrainConfig

    root = Path(root)
    demo = set(root.glob(f"results/*/{DEMO_WEIGHTS[DEMO_MOCO]}"))
    # path -> label: the demo's own label; a checkpoint is named after its run (results/<run>/pretrain)
    labels = {path: DEMO_MOCO for path in demo}
    labels |= {path: path.parents[1].name for path in root.glob(f"results/*/pretrain/{CHECKPOINT}")}
    labels |= {path: path.parent.name for path in root.glob(f"{PretrainConfig.output}/{CHECKPOINT}")}
    found = [path for path in labels if path.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda path: path.stat().st_mtime)
    baseline = newest.parents[1] / DEMO_WEIGHTS[BASELINE]
    return f"{labels[newest]}={newest}", (baseline if newest in demo and baseline.is_file() else None)


def expand_tasks(spec: str) -> list[str]:
    """Comma-separated task names, families (voc, coco, ..., all) and custom dataset YAML files
    -> task names and YAML paths, each once, in the order given."""
    from transfer.tasks import ALL, FAMILIES, TASKS, family

    choices = (f"tasks: {', '.join(TASKS)}; families: {', '.join([*FAMILIES, ALL])}; "
               "or a custom dataset .yaml")
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks: no task given ({choices})")
    specs = []
    for name in names:
        members = family(name)
        if members is None and name not in TASKS and not name.endswith((".yaml", ".yml")):
            raise UserError(f"--tasks {name}: unknown task or family ({choices})")
        specs += [one for one in members or (name,) if one not in specs]
    return specs


def resolve_tasks(spec: str, schedule: str | None, datasets_root=None, notes: list | None = None,
                  schedules: dict | None = None) -> dict[str, str]:
    """Task names, families and custom dataset YAML files (``expand_tasks``) -> {folder name: spec}.

    A task whose datasets are missing under ``datasets_root`` (default: $DETECTRON2_DATASETS,
    else ./datasets) while its fallback's are there becomes the fallback, so its runs are filed
    and reported under the task that trains; ``notes`` gets one line saying so. A custom task's
    folder is its YAML's stem. ``schedules`` gets {folder name: the schedule its runs use}:
    ``schedule``, or with None each task's default (a custom YAML's own); a named schedule other
    than the one a YAML names gets a line in ``notes``.
    """
    from transfer.tasks import fallback_note, get_task, resolve_fallback
    from transfer.tasks.custom import yaml_schedule

    tasks = {}
    for one in expand_tasks(spec):
        custom = one.endswith((".yaml", ".yml"))
        task = get_task(one)
        if not custom:
            asked, task = task, resolve_fallback(task, datasets_root)
            if task is not asked and notes is not None:
                notes.append(fallback_note(asked, task, datasets_root))
        name = Path(one).stem if custom else task.name
        if schedule is not None and schedule not in task.schedules:
            raise UserError(f"--schedule: task {name} has no '{schedule}' schedule "
                            f"(it has: {', '.join(task.schedules)})")
        own = yaml_schedule(one) if custom else None
        if schedule is not None and own not in (None, schedule) and notes is not None:
            notes.append(f"{name}: --schedule {schedule} overrides the schedule its YAML names ({own}: "
                         f"{task.schedules[own].description or own}); leave --schedule out to run that one")
        if schedules is not None:
            schedules[name] = schedule or task.default_schedule
        value = str(Path(one).resolve()) if custom else task.name
        if not LABEL.match(name) or tasks.get(name, value) != value:
            raise UserError(f"--tasks {one}: the task folder name '{name}' is not usable or not unique")
        tasks[name] = value
    return tasks


def check_datasets(tasks: dict[str, str], root=None) -> None:
    """Fail before any training when a registered task's datasets are not on disk (one clear line).

    ``tasks`` comes from ``resolve_tasks``, which already ran a fallback where only its data is
    there. Custom tasks (YAML) checked their own files when they were registered.
    """
    from transfer.datasets import catalog
    from transfer.tasks import get_task

    for spec in tasks.values():
        if not spec.endswith((".yaml", ".yml")):
            task = get_task(spec)
            catalog.check(task.train + task.test, root)


def check_settings(output, opts=()) -> None:
    """Config overrides apply to every run of an output folder: refuse to mix results of different ones.

    The first invocation records them in ``<output>/suite.json``; a later one with other overrides
    must use another output folder (each run's metrics.json also holds its resolved config).
    """
    path = Path(output) / "suite.json"
    wanted = {"opts": [str(o) for o in opts]}
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("opts", []) != wanted["opts"]:
            raise UserError(f"{path}: this output's runs used the config overrides "
                            f"{recorded.get('opts') or 'none'}, not {wanted['opts'] or 'none'}; "
                            "use another --output")
    else:
        atomic_write_json(path, wanted)


def plan(weights: list[Weights], tasks, schedule, trials: int, output) -> list[Run]:
    """Every (task, trial, weights) run, in that order; ``tasks``: names, or {name: spec};
    ``schedule``: one for every task, or {name: schedule} (``resolve_tasks``'s ``schedules``)."""
    if trials < 1:
        raise UserError(f"--trials: must be at least 1, got {trials}")
    labels = [w.label for w in weights]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"--weights: the label {duplicates[0]} is used twice; name them with LABEL=PATH")
    output = Path(output).resolve()
    tasks = tasks if isinstance(tasks, dict) else {name: name for name in tasks}
    schedules = schedule if isinstance(schedule, dict) else {task: schedule for task in tasks}
    return [Run(w, task, schedules[task], seed, output, task_spec)
            for task, task_spec in tasks.items() for seed in range(trials) for w in weights]


def repeated_runs(runs: list[Run], num_gpus: int = 1, datasets=None, opts=()) -> dict[Run, Run]:
    """{run: the earlier run of the plan it repeats}: same weights, seed and resolved config.

    Such a run is not trained again: it gets the earlier run's result (``reuse``). A task whose
    config cannot be resolved here repeats nothing; its own run reports what is wrong.
    """
    from transfer.finetune import experiment_key

    keys, first, repeats = {}, {}, {}
    for run in runs:
        spec = (run.task_spec or run.task, run.weights.path, run.schedule)
        if spec not in keys:
            try:
                keys[spec] = experiment_key(*spec, datasets, num_gpus, opts)
            except Exception:  # noqa: BLE001  (the run itself reports the error)
                keys[spec] = spec
        key = (keys[spec], run.weights, run.seed)
        if key in first:
            repeats[run] = first[key]
        else:
            first[key] = run
    return repeats


# ---------------------------------------------------------------------------------------------
# The state of a run, read from its folder

def read_metrics(run: Run) -> dict | None:
    return read_record(run.metrics_path)


def state(run: Run) -> str:
    """``done`` (metrics.json says ok), ``failed``, ``interrupted`` (started, no result) or ``new``."""
    record = read_metrics(run)
    if record is None:
        return "interrupted" if run.dir.is_dir() else "new"
    if record.get("weights_sha256") not in (None, run.weights.sha256):
        raise UserError(f"{run.dir}: holds results of another weights file labelled "
                        f"'{run.weights.label}' (sha256 {record['weights_sha256'][:12]}..., now "
                        f"{run.weights.sha256[:12]}...); give this one another label or --output")
    return "done" if record.get("status") == "ok" else "failed"


class RunBusy(Exception):
    """Another process holds the run's lock."""


class RunLock:
    """An exclusive, non-blocking (or waiting) flock on ``<run dir>/.lock``.

    flock locks belong to the open file, so a subprocess that inherits the descriptor keeps the run
    locked even if the suite itself is killed; the kernel drops the lock when the last holder exits.
    """

    def __init__(self, run: Run, wait: bool = False):
        self.path = run.dir / ".lock"
        self.wait = wait
        self.fd = -1

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            raise RunBusy(self.holder()) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def locked_by(run: Run) -> str | None:
    """Who holds the run's lock right now, or None."""
    if not (run.dir / ".lock").exists():
        return None
    try:
        with RunLock(run):
            return None
    except RunBusy as busy:
        return str(busy)


# ---------------------------------------------------------------------------------------------
# Executing one run

@dataclass
class Outcome:
    run: Run
    status: str                  # ok | failed | busy (another process holds it)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def finetune_command(run: Run, num_gpus: int, datasets=None, opts=()) -> list[str]:
    command = [sys.executable, str(FINETUNE), "--task", run.task_spec or run.task,
               "--weights", str(run.weights.path), "--schedule", run.schedule, "--seed", str(run.seed),
               "--output", str(run.dir), "--num-gpus", str(num_gpus)]
    if datasets is not None:
        command += ["--datasets", str(datasets)]
    return command + [str(o) for o in opts]


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


SUITE_PID = "MOCO_TRANSFER_SUITE_PID"  # set for a fine-tuning child: the suite it belongs to


def die_with_suite() -> None:
    """In tools/finetune.py started by a suite: end when the suite ends, even by kill -9, so that
    no orphan keeps training and holding the run's lock. Linux's parent-death signal; elsewhere
    a no-op (the suite's own SIGTERM / Ctrl-C handling still stops its child)."""
    suite_pid = os.environ.get(SUITE_PID)
    if not suite_pid or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(suite_pid):  # the suite died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _note_attempt(run: Run, what: str) -> None:
    """One line per attempt in <run dir>/attempts.log: when, where, how it ended."""
    with open(run.dir / "attempts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}: {what}\n")


def _record_failure(run: Run, error: str, log_tail: str = "") -> None:
    """A metrics.json for a run that died without writing one (killed, out of memory, ...)."""
    record = {"status": "failed", "error": error, "task": run.task, "schedule": run.schedule,
              "seed": run.seed, "weights": str(run.weights.path), "weights_sha256": run.weights.sha256,
              "metrics": {}}
    if log_tail:  # beside the error, which reports show as its one line
        record["log_tail"] = log_tail
    atomic_write_json(run.metrics_path, record)


def _wait(process: subprocess.Popen) -> tuple[int, float | None]:
    """The process's exit code (-N: signal N) and peak memory in MiB: wait4 reports that child's
    own resource use, where getrusage would give the largest of all children so far."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    return process.returncode, peak or None


def _exit_reason(code: int, peak_mb: float | None) -> str:
    """Why tools/finetune.py ended without writing metrics.json, in one line."""
    if code == -signal.SIGKILL:  # what the kernel's OOM killer sends (and `kill -9`)
        peak = f" at a peak memory of {peak_mb:.0f} MiB" if peak_mb else ""
        return f"killed (out of memory?): tools/finetune.py got SIGKILL (killed by signal 9){peak}"
    if code < 0:
        name = f" ({signal.Signals(-code).name})" if -code in signal.valid_signals() else ""
        return f"tools/finetune.py was killed by signal {-code}{name}"
    return f"tools/finetune.py exited with code {code} without writing metrics.json"


def execute(run: Run, num_gpus: int = 1, datasets=None, opts=(), wait: bool = False) -> Outcome:
    """Run one run in a tools/finetune.py subprocess under the run's lock; skip it if it is done.

    With ``wait`` False a run locked by another process returns status ``busy``; with ``wait``
    True the call waits for that process and runs the run only if it did not finish it.
    """
    start = time.time()
    try:
        with RunLock(run, wait=wait) as lock:
            if state(run) == "done":
                return Outcome(run, "ok", read_metrics(run).get("metrics") or {})
            # A failed attempt's record must not stand for this attempt while it runs.
            if run.metrics_path.exists():
                os.replace(run.metrics_path, run.dir / "metrics.previous.json")
            log = run.dir / "finetune.log"
            _note_attempt(run, "started")
            with open(log, "w") as out:
                # Its own process group (with whatever it starts), ended with the suite: see die_with_suite.
                process = subprocess.Popen(finetune_command(run, num_gpus, datasets, opts), cwd=REPO,
                                           stdout=out, stderr=subprocess.STDOUT, pass_fds=(lock.fd,),
                                           start_new_session=True, env={**os.environ, SUITE_PID: str(os.getpid())})
                try:
                    code, peak_mb = _wait(process)
                except BaseException:  # Ctrl-C / SIGTERM: stop the run, leave it "interrupted"
                    os.killpg(process.pid, signal.SIGTERM)
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                    _note_attempt(run, "interrupted")
                    raise
            _note_attempt(run, f"exit code {code}")
            record = read_metrics(run)
            if record is None:
                _record_failure(run, _exit_reason(code, peak_mb), _log_tail(log))
                record = read_metrics(run)
    except RunBusy as busy:
        return Outcome(run, "busy", error=f"running in {busy}")
    status = "ok" if record.get("status") == "ok" else "failed"
    return Outcome(run, status, record.get("metrics") or {}, record.get("error"), time.time() - start)


def reuse(run: Run, original: Run) -> Outcome:
    """Give ``run`` the result of ``original``, the run it repeats, once that one has finished."""
    from transfer.d2.evaluation import headline_metrics
    from transfer.tasks import get_task

    with RunLock(run, wait=True):
        if state(run) == "done":
            return Outcome(run, "ok", read_metrics(run).get("metrics") or {})
        if state(original) not in ("done", "failed"):
            return Outcome(run, "busy", error=f"it repeats {original.name}, which has not finished")
        record = dict(read_metrics(original), task=run.task_spec or run.task, seed=run.seed,
                      same_run_as=original.name)
        if record["status"] == "ok":
            task = get_task(run.task_spec or run.task)
            record["metrics"] = headline_metrics(task.evaluator, record.get("all_metrics") or {}, task.metrics)
        else:
            record["error"] = f"it repeats {original.name}, which failed: {record.get('error')}"
        atomic_write_json(run.metrics_path, record)
    return Outcome(run, "ok" if record["status"] == "ok" else "failed", record.get("metrics") or {},
                   record.get("error"))


# ---------------------------------------------------------------------------------------------
# Launchers

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

    ``cluster`` is submitit's: None picks SLURM when ``sbatch`` exists; "local" or "debug" run the
    same jobs on this machine (what the tests use).
    """

    def __init__(self, output, num_gpus: int = 1, datasets=None, opts=(), partition: str | None = None,
                 time_min: int = 24 * 60, cpus_per_gpu: int = 8, mem_gb: int | None = None,
                 cluster: str | None = None):
        import submitit

        self.num_gpus, self.datasets, self.opts = num_gpus, datasets, tuple(opts)
        self.executor = submitit.AutoExecutor(folder=Path(output) / "slurm" / "%j", cluster=cluster)
        if cluster is None and self.executor.cluster != "slurm":
            raise UserError("--launcher slurm: no SLURM found on this machine (sbatch is not on PATH)")
        parameters = dict(name="moco-transfer", nodes=1, tasks_per_node=1, timeout_min=time_min,
                          cpus_per_task=cpus_per_gpu * max(1, num_gpus), slurm_partition=partition)
        if self.executor.cluster == "slurm":
            parameters["gpus_per_node"] = num_gpus
        if mem_gb:
            parameters["mem_gb"] = mem_gb
        self.executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})

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
                    _record_failure(run, f"SLURM job {job.job_id} failed: {str(e).strip()[-2000:]}")
                record = read_metrics(run)
                outcome = Outcome(run, "ok" if record.get("status") == "ok" else "failed",
                                  record.get("metrics") or {}, record.get("error"))
            on_done(outcome)
            outcomes.append(outcome)
        return outcomes


# ---------------------------------------------------------------------------------------------
# The suite

def describe(runs: list[Run]) -> str:
    """The plan as a table: per task x weights, trials done / planned."""
    import pandas as pd

    table = pd.DataFrame({"task": [r.task for r in runs], "weights": [r.weights.label for r in runs],
                          "state": [state(r) for r in runs]})
    cells = (table.groupby(["task", "weights"], sort=False)["state"]
             .agg(lambda s: f"{(s == 'done').sum()}/{len(s)}").unstack("weights")
             .reindex(index=table["task"].unique(), columns=table["weights"].unique()))
    counts = table["state"].value_counts()
    states = ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "interrupted", "new") if s in counts)
    return f"Plan: {len(runs)} runs ({states}); trials done / planned:\n{cells.to_string()}"


def run_suite(runs: list[Run], launcher, stream=None, repeats: dict[Run, Run] | None = None,
              notes=()) -> list[Outcome]:
    """Show the plan, run every run that is not done (with a progress bar), return the outcomes.

    ``repeats`` (see ``repeated_runs``): runs that get the result of the run they repeat;
    ``notes``: lines shown with the plan (``resolve_tasks``'s fallbacks). ``stream``: default
    sys.stderr as it is at the call (a redirected one too).
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
                      f"(see {outcome.run.dir / 'finetune.log'})", file=stream)
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
