"""A suite's runs on disk: each run's folder, state, record, lock and attempts log, in one place.

A run is identified by (weights, task, schedule, label fraction, backbone mode, seed) and owns one
folder of its suite's output,

    <output>/<weights label>/<task>/<schedule>[@<regime>]/seed<seed>/

where a regime other than the paper's (all labels, backbone fine-tuned) names itself after the
schedule (transfer/regimes.py: ``demo@labels0.1``, ``full@frozen``, ``full@labels0.01-frozen``),
so the paper's runs keep the folder they always had.
        metrics.json   the run's record, written atomically when it ends (also when it fails)
        .lock          flock'ed by the process running the run and by its fine-tuning child
        attempts.log   one line per attempt: when, by which process, how it ended
        ...            the fine-tuning's own files (finetune.log, log.txt, checkpoints, inference/)

Its state is read from that folder alone: ``done`` (its record says ok and holds its metrics),
``failed``, ``interrupted`` (a folder without a record) or ``new``. While a process runs it, the
run is locked (``locked_by`` names that process); a run whose resolved config repeats another's
holds that run's result and names it (``same_run_as`` in its record).

A record stands for a finished run only when it is a mapping that says ``status: ok`` and holds
its metrics. Anything else on disk (a half-copied file, ``[]``, ``{"status": "ok"}`` with no
metrics) is an unreadable run: the suite runs it again and the reports count it as failed.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from transfer import fileio, regimes
from transfer.errors import UserError

BASELINE = "supervised"  # the weights label every other weights file is compared with
RECORD = "metrics.json"
LOCK = fileio.LOCK
ATTEMPTS = "attempts.log"
PREVIOUS_RECORD = "metrics.previous.json"  # a failed attempt's record, set aside while the run runs again


# ---------------------------------------------------------------------------------------------
# Identity and folder

@dataclass(frozen=True)
class Weights:
    label: str   # the name reports use; BASELINE marks the baseline
    path: Path   # detectron2 weights (.pkl), with its config overlay beside it when converted
    sha256: str


@dataclass(frozen=True)
class RunKey:
    """What a run's folder says about it: ``<weights label>/<task>/<schedule>[@<regime>]/seed<N>``."""

    weights: str
    task: str
    schedule: str
    seed: int
    fraction: float = regimes.FULL  # of the training images with labels
    backbone: str = regimes.FINETUNE  # finetune | frozen

    @property
    def schedule_dir(self) -> str:
        regime = regimes.regime_label(self.fraction, self.backbone)
        return self.schedule if regime is None else f"{self.schedule}@{regime}"

    @property
    def name(self) -> str:
        return f"{self.weights}/{self.task}/{self.schedule_dir}/seed{self.seed}"

    def dir(self, output) -> Path:
        return Path(output) / self.weights / self.task / self.schedule_dir / f"seed{self.seed}"

    @classmethod
    def of_dir(cls, output, folder) -> RunKey | None:
        """The key of a run folder under ``output``; None for a folder that is not one."""
        parts = Path(folder).relative_to(output).parts
        if len(parts) != 4 or not (parts[3].startswith("seed") and parts[3][4:].isdigit()):
            return None
        schedule, _, regime = parts[2].partition("@")
        try:
            fraction, backbone = regimes.parse_regime_label(regime or None)
        except ValueError:
            return None
        return cls(parts[0], parts[1], schedule, int(parts[3][4:]), fraction, backbone)


@dataclass(frozen=True)
class Run:
    weights: Weights
    task: str  # a registered task's name, or the name inside a custom dataset YAML
    schedule: str
    seed: int
    output: Path
    task_spec: str = ""  # what tools/finetune.py --task gets: the name, or the custom YAML's path
    fraction: float = regimes.FULL
    backbone: str = regimes.FINETUNE

    @property
    def key(self) -> RunKey:
        return RunKey(self.weights.label, self.task, self.schedule, self.seed, self.fraction, self.backbone)

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def dir(self) -> Path:
        return self.key.dir(self.output)

    @property
    def metrics_path(self) -> Path:
        return self.dir / RECORD


# ---------------------------------------------------------------------------------------------
# The record (metrics.json): one writer, one reader

def write_record(folder, record: dict) -> None:
    """A run's record, atomically: a reader sees the old record or the whole new one, never part.
    A full disk or a read-only folder is a DiskError naming the path and the free space."""
    fileio.atomic_write_json(Path(folder) / RECORD, record)


def read_record(folder) -> dict | None:
    """The record in a run folder; None when there is none; a failed record saying why when it
    cannot stand for a finished run."""
    path = Path(folder) / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return _unreadable(path, f"not JSON ({type(e).__name__})")
    if not isinstance(record, dict):
        return _unreadable(path, f"a JSON {type(record).__name__}, not a mapping")
    metrics = record.get("metrics")
    if record.get("status") == "ok" and not (isinstance(metrics, dict) and metrics):
        return {**record, **_unreadable(path, "says ok but holds no metrics")}
    return record


def _unreadable(path: Path, why: str) -> dict:
    return {"status": "failed", "error": f"{path}: unreadable metrics.json: {why}", "metrics": {}}


def read_metrics(run: Run) -> dict | None:
    return read_record(run.dir)


def record_failure(run: Run, error: str, log_tail: str = "") -> None:
    """The record of a run that ended without writing one (killed, out of memory, a lost job)."""
    record = {"status": "failed", "error": error, "task": run.task, "schedule": run.schedule,
              "fraction": run.fraction, "backbone": run.backbone, "seed": run.seed,
              "weights": str(run.weights.path), "weights_sha256": run.weights.sha256, "metrics": {}}
    if log_tail:  # beside the error, which reports show as its one line
        record["log_tail"] = log_tail
    write_record(run.dir, record)


def recorded_runs(output) -> list[tuple[RunKey, dict]]:
    """(key, record) of every run folder under ``output`` that holds a record, in path order."""
    output = Path(output)
    found = []
    for path in sorted(output.glob(f"*/*/*/seed*/{RECORD}")):
        key = RunKey.of_dir(output, path.parent)
        record = read_record(path.parent) if key else None
        if record is not None:  # None: removed since the glob
            found.append((key, record))
    return found


def state(run: Run) -> str:
    """``done`` (its record says ok), ``failed``, ``interrupted`` (started, no record) or ``new``."""
    record = read_metrics(run)
    if record is None:
        return "interrupted" if run.dir.is_dir() else "new"
    if record.get("weights_sha256") not in (None, run.weights.sha256):
        raise UserError(f"{run.dir}: holds results of another weights file labelled "
                        f"'{run.weights.label}' (sha256 {record['weights_sha256'][:12]}..., now "
                        f"{run.weights.sha256[:12]}...); give this one another label or --output")
    return "done" if record.get("status") == "ok" else "failed"


# ---------------------------------------------------------------------------------------------
# The lock

RunBusy = fileio.FolderBusy  # another process holds the run's lock


class RunLock(fileio.FolderLock):
    """The run's folder lock (``fileio.FolderLock``): the suite takes it, and the tools/finetune.py
    subprocess inherits it, so the run stays locked as long as either of them lives."""

    def __init__(self, run: Run, wait: bool = False):
        super().__init__(run.dir, wait)


def locked_by(run: Run) -> str | None:
    """Who holds the run's lock right now, or None (asked without taking it over)."""
    return fileio.locked_by(run.dir)


# ---------------------------------------------------------------------------------------------
# Attempts (under the run's lock)

_STARTED = re.compile(r"^(?P<when>\S+) pid (?P<pid>\d+) on (?P<host>\S+): started$")


def note_attempt(run: Run, what: str) -> None:
    """One line in <run dir>/attempts.log: when, which process, ``what`` (started, how it ended)."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}: {what}\n"
    with fileio.disk_errors(run.dir / ATTEMPTS), open(run.dir / ATTEMPTS, "a") as f:
        f.write(line)


def end_unfinished_attempt(run: Run) -> None:
    """Under the run's lock: an attempt whose start is the log's last line ended without an end
    line (its suite was killed with kill -9, its machine went down); the lock is ours, so that
    attempt is over: say so, with its pid."""
    try:
        lines = (run.dir / ATTEMPTS).read_text().splitlines()
    except FileNotFoundError:
        return
    unfinished = _STARTED.match(lines[-1]) if lines else None
    if unfinished:
        note_attempt(run, f"the attempt of pid {unfinished['pid']} on {unfinished['host']} (started "
                          f"{unfinished['when']}) ended without an end line: its process is gone (killed?)")


def start_attempt(run: Run) -> None:
    """Under the run's lock, before it runs again: a failed attempt's record is set aside (it must
    not stand for this attempt while it runs), and the start is noted."""
    if run.metrics_path.exists():
        with fileio.disk_errors(run.dir / PREVIOUS_RECORD):
            os.replace(run.metrics_path, run.dir / PREVIOUS_RECORD)
    note_attempt(run, "started")
