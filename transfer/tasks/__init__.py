"""The benchmark tasks: each one a short declarative entry (data, not code).

A ``Task`` names its detectron2 config file, its datasets, the evaluator kind, the headline
metrics to keep, its schedules and the rows of results/published_results.csv it compares with.
Every module of this package registers its entries when imported (detection.py: VOC, COCO,
LVIS, Cityscapes; semantic.py: semantic segmentation); a custom dataset becomes a task from its
YAML file (custom.py), so ``get_task`` accepts a path to one too.

Schedules: ``full`` is the paper's, as written in the config file; ``quick`` trains a fixed
fraction of it (iterations and LR steps scaled) for a sanity check on one GPU; ``demo`` lays a
YAML overlay (configs/schedules/) on it that trains on the built-in demo data on CPU in minutes.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transfer.errors import UserError

REPO = Path(__file__).resolve().parents[2]
QUICK_FRACTION = 1 / 8


@dataclass(frozen=True)
class Schedule:
    """How long a task trains, relative to the config file's (full) schedule."""

    fraction: float = 1.0  # of MAX_ITER, STEPS, EVAL_PERIOD and CHECKPOINT_PERIOD
    overlay: str | None = None  # a YAML (path from the repository root) merged after scaling
    settings: Mapping[str, Any] = field(default_factory=dict)  # config key -> value, applied last
    description: str = ""


def standard_schedules(demo_overlay: str) -> dict[str, Schedule]:
    return {
        "full": Schedule(description="the paper's schedule"),
        "quick": Schedule(fraction=QUICK_FRACTION, description="1/8 of full: a sanity check on one GPU"),
        "demo": Schedule(overlay=demo_overlay, description="built-in demo data, CPU, minutes"),
    }


@dataclass(frozen=True)
class Task:
    name: str
    config: str  # detectron2 YAML, path from the repository root (its _BASE_ may be zoo://...)
    train: tuple[str, ...]  # registered dataset names; they replace DATASETS.TRAIN / TEST
    test: tuple[str, ...]
    evaluator: str  # a kind of transfer.d2.evaluation.EVALUATORS
    metrics: tuple[str, ...]  # headline metrics, named as in results/published_results.csv
    schedules: Mapping[str, Schedule]
    reference: tuple[str, str] | None = None  # (task, schedule) rows of published_results.csv
    description: str = ""
    # config key -> value applied right after the config file (custom tasks: NUM_CLASSES, ...)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # "module:function(cfg)" declaring config keys the YAML uses beyond detectron2's defaults
    extend_config: str | None = None
    # if ``train`` / ``test`` are not on disk but this task's datasets are, run this task instead
    fallback: str | None = None
    default_schedule: str = "full"  # what a run uses when no schedule is named
    notes: tuple[str, ...] = ()  # how a custom dataset's quirks were handled (kept in metrics.json)

    @property
    def config_path(self) -> Path:
        return REPO / self.config


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    for name in ("full", "quick", "demo"):
        if name not in task.schedules:
            raise ValueError(f"task {task.name!r} has no {name!r} schedule")
    TASKS[task.name] = task
    return task


def get_task(name) -> Task:
    """A registered task by name, or the custom task a dataset YAML file describes."""
    if str(name).endswith((".yaml", ".yml")):
        from transfer.tasks.custom import task_from_yaml

        return task_from_yaml(name)
    if name not in TASKS:
        raise UserError(f"--task {name}: unknown task; known: {', '.join(TASKS)}, or a custom dataset .yaml")
    return TASKS[name]


# Every module of this package holds entries: importing it registers them.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
