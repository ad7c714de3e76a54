"""The benchmark tasks: each one a short declarative entry (data, not code).

A ``Task`` names its detectron2 config file, its datasets, the evaluator kind, the headline
metrics to keep, its schedules and the rows of results/published_results.csv it compares with.
Every module of this package registers its entries when imported (detection.py: VOC, COCO,
LVIS, Cityscapes; semantic.py: semantic segmentation); a custom dataset becomes a task from its
YAML file (custom.py), so ``get_task`` accepts a path to one too (``is_custom_task``). Looking a
task up registers no dataset: a process registers the datasets it is about to read
(``transfer.finetune.register_datasets``).

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

from transfer import REPO
from transfer.errors import UserError

QUICK_FRACTION = 1 / 8
# The MoCo paper's protocol: the whole backbone fine-tuned with its BN trained (SyncBN / naiveSyncBN).
DEFAULT_PROTOCOL = "fine-tune"
# Scaling the batch down for memory stops here: BN statistics over fewer images are not the paper's.
MIN_BN_GROUP = 8
# The demo schedule's overlays (configs/schedules/) of the detection model families.
DEMO = {"C4": "configs/schedules/demo_c4.yaml", "FPN": "configs/schedules/demo.yaml"}
CUSTOM_SUFFIXES = (".yaml", ".yml")  # a --task ending so is a custom dataset's YAML file


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
    # the fine-tuning protocol, as the "protocol" column of published_results.csv names it: a
    # published number is compared only with runs of the same protocol
    protocol: str = DEFAULT_PROTOCOL
    # "module:function()" that raises the one line saying how to install an optional dependency
    # when it is missing (DensePose); such a task runs only when named, never in ``all``
    requires: str | None = None

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


def call(spec: str, *args):
    """Call the function a task names as "module:function" (its ``extend_config``, ``requires``)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


def require(task: Task) -> None:
    """Fail with one line when the task needs an optional dependency that is not installed."""
    if task.requires:
        call(task.requires)


def installed(task: Task) -> bool:
    """Whether the task can run here: its optional dependency, if it has one, is installed."""
    try:
        require(task)
    except UserError:
        return False
    return True


def is_custom_task(name) -> bool:
    """Whether a task name is a custom dataset's YAML file rather than a registered task."""
    return str(name).endswith(CUSTOM_SUFFIXES)


def get_task(name) -> Task:
    """A registered task by name, or the custom task a dataset YAML file describes (its data is
    read and checked, not registered)."""
    if is_custom_task(name):
        from transfer.tasks.custom import task_from_yaml

        return task_from_yaml(name)
    if name not in TASKS:
        raise UserError(f"--task {name}: unknown task; known: {', '.join(TASKS)}, or a custom dataset .yaml")
    return TASKS[name]


# Task families: what ``--tasks voc,coco`` expands to. ``all`` is computed (``family``).
FAMILIES: dict[str, tuple[str, ...]] = {
    "voc": ("voc07+12", "voc07"),
    "coco": ("coco_c4_1x", "coco_c4_2x", "coco_fpn_1x", "coco_fpn_2x", "coco_kp_2x"),
    "lvis": ("lvis_1x", "lvis_2x"),
    "cityscapes": ("cityscapes_inst", "cityscapes_sem"),
    "semseg": ("cityscapes_sem", "voc_sem"),
}
ALL = "all"


def family(name: str) -> tuple[str, ...] | None:
    """The task names of family ``name`` (``all`` included), or None when it is not a family.

    ``all`` is every registered task of the paper's protocol except those other tasks fall back
    to: a fallback runs in place of its task when the task's data is missing, never beside it,
    and a protocol variant (frozen BN, ...) or a task with an optional dependency (DensePose) is
    run when named.
    """
    if name == ALL:
        fallbacks = {task.fallback for task in TASKS.values()}
        return tuple(name for name, task in TASKS.items()
                     if name not in fallbacks and task.protocol == DEFAULT_PROTOCOL and not task.requires)
    return FAMILIES.get(name)


def _missing(task: Task, datasets_root) -> str | None:
    """Why the task's datasets are not usable under the root (catalog.check's line), or None."""
    from transfer.datasets import catalog

    try:
        catalog.check([*task.train, *task.test], datasets_root)
    except UserError as e:
        return str(e)
    return None


def task_that_runs(task: Task, datasets_root) -> tuple[Task, str | None]:
    """The task that runs in place of ``task``, and the line saying why when that is not ``task``.

    Its ``fallback`` runs when only the fallback's datasets are on disk; with neither on disk the
    task itself runs, so that the datasets check names its files.
    """
    why = _missing(task, datasets_root) if task.fallback else None
    if why is None:
        return task, None
    fallback = get_task(task.fallback)
    if _missing(fallback, datasets_root) is not None:
        return task, None
    # Published numbers are kept per task: a fallback without its own cannot be compared.
    caveat = "" if fallback.reference else f"; not comparable with the paper's {task.name}"
    return fallback, f"{task.name}: {why.split(';')[0]}, so running {fallback.name} ({fallback.description}{caveat})"


# Every module of this package holds entries: importing it registers them.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _name, _members in FAMILIES.items():
    for _member in _members:
        if _member not in TASKS:
            raise ValueError(f"task family {_name!r} names {_member!r}, which is not registered")
