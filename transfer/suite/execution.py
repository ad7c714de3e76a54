"""Running one run: a tools/finetune.py subprocess under the run's lock, or the result of the run it repeats.

The subprocess inherits the lock (``transfer.runs.RunLock``), so the run stays locked as long as
either of them lives; it runs in its own process group and ends with the suite (``die_with_suite``).
A run that ends without writing its record gets one that says why (the signal that killed it, the
tool's own error line). Where even that record cannot be written (a full disk, a read-only
folder), the ``DiskError`` goes up to the suite, which stops: every earlier result stays as it is.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transfer import REPO, errors, fileio, regimes, runs
from transfer.runs import Run, RunBusy, RunLock, read_metrics, state

FINETUNE = REPO / "tools" / "finetune.py"
LOG = "finetune.log"  # the subprocess's output, in the run folder
SUITE_PID = "MOCO_TRANSFER_SUITE_PID"  # set for a fine-tuning child: the suite it belongs to


@dataclass
class Outcome:
    run: Run
    status: str                  # ok | failed | busy (another process holds it)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def outcome_of(run: Run, record: dict, seconds: float = 0.0) -> Outcome:
    return Outcome(run, "ok" if record.get("status") == "ok" else "failed", record.get("metrics") or {},
                   record.get("error"), seconds)


def finetune_command(run: Run, num_gpus: int, datasets=None, opts=()) -> list[str]:
    command = [sys.executable, str(FINETUNE), "--task", run.task_spec or run.task,
               "--weights", str(run.weights.path), "--schedule", run.schedule, "--seed", str(run.seed),
               "--output", str(run.dir), "--num-gpus", str(num_gpus)]
    if (run.fraction, run.backbone) != (regimes.FULL, regimes.FINETUNE):
        command += ["--fraction", repr(run.fraction), "--backbone", run.backbone]
    if datasets is not None:
        command += ["--datasets", str(datasets)]
    return command + [str(o) for o in opts]


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


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(process: subprocess.Popen) -> tuple[int, float | None]:
    """The process's exit code (-N: signal N) and peak memory in MiB: wait4 reports that child's
    own resource use, where getrusage would give the largest of all children so far."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    return process.returncode, peak or None


def _exit_reason(code: int, peak_mb: float | None, log_tail: str = "") -> str:
    """Why tools/finetune.py ended without writing metrics.json, in one line."""
    if code == -signal.SIGKILL:  # what the kernel's OOM killer sends (and `kill -9`)
        peak = f" at a peak memory of {peak_mb:.0f} MiB" if peak_mb else ""
        return f"killed (out of memory?): tools/finetune.py got SIGKILL (killed by signal 9){peak}"
    if code < 0:
        name = f" ({signal.Signals(-code).name})" if -code in signal.valid_signals() else ""
        return f"tools/finetune.py was killed by signal {-code}{name}"
    # A tool's one-line error (transfer.errors.cli): e.g. the record itself did not fit on the disk.
    return errors.said(log_tail) or f"tools/finetune.py exited with code {code} without writing metrics.json"


def _open_log(path: Path):
    with fileio.disk_errors(path):
        return open(path, "w")


def execute(run: Run, num_gpus: int = 1, datasets=None, opts=(), wait: bool = False) -> Outcome:
    """Run one run in a tools/finetune.py subprocess under the run's lock; skip it if it is done.

    With ``wait`` False a run locked by another process returns status ``busy``; with ``wait``
    True the call waits for that process and runs the run only if it did not finish it.
    """
    start = time.time()
    try:
        with RunLock(run, wait=wait) as lock:
            runs.end_unfinished_attempt(run)
            if state(run) == "done":
                return outcome_of(run, read_metrics(run))
            runs.start_attempt(run)
            log = run.dir / LOG
            with _open_log(log) as out:
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
                    runs.note_attempt(run, "interrupted")
                    raise
            runs.note_attempt(run, f"exit code {code}")
            record = read_metrics(run)
            if record is None:
                tail = _log_tail(log)
                runs.record_failure(run, _exit_reason(code, peak_mb, tail), tail)
                record = read_metrics(run)
    except RunBusy as busy:
        return Outcome(run, "busy", error=f"running in {busy}")
    return outcome_of(run, record, time.time() - start)


def reuse(run: Run, original: Run) -> Outcome:
    """Give ``run`` the result of ``original``, the run it repeats, once that one has finished."""
    from transfer.d2.evaluation import headline_metrics
    from transfer.tasks import get_task

    with RunLock(run, wait=True):
        if state(run) == "done":
            return outcome_of(run, read_metrics(run))
        if state(original) not in ("done", "failed"):
            return Outcome(run, "busy", error=f"it repeats {original.name}, which has not finished")
        record = dict(read_metrics(original), task=run.task_spec or run.task, seed=run.seed,
                      same_run_as=original.name)
        if record["status"] == "ok":
            task = get_task(run.task_spec or run.task)
            record["metrics"] = headline_metrics(task.evaluator, record.get("all_metrics") or {}, task.metrics)
        else:
            record["error"] = f"it repeats {original.name}, which failed: {record.get('error')}"
        runs.write_record(run.dir, record)
    return outcome_of(run, record)
