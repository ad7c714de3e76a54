"""What a suite runs: weights, tasks and trials -> runs, each checked before anything trains."""
from __future__ import annotations

import json
import re
from pathlib import Path

from transfer import REPO, fileio, regimes
from transfer.errors import UserError
from transfer.runs import BASELINE, Run, Weights, state

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# What tools/demo.py writes in its output folder (results/demo): label -> file.
DEMO_MOCO = "moco_v2"
DEMO_WEIGHTS = {DEMO_MOCO: "weights/moco_v2_demo.pkl", BASELINE: "weights/supervised_demo.pkl"}


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
    from transfer.tasks import ALL, FAMILIES, TASKS, family, is_custom_task

    choices = (f"tasks: {', '.join(TASKS)}; families: {', '.join([*FAMILIES, ALL])}; "
               "or a custom dataset .yaml")
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks: no task given ({choices})")
    specs = []
    for name in names:
        members = family(name)
        if members is None and name not in TASKS and not is_custom_task(name):
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
    from transfer.tasks import get_task, is_custom_task, task_that_runs
    from transfer.tasks.custom import yaml_schedule

    tasks = {}
    for one in expand_tasks(spec):
        custom = is_custom_task(one)
        task = get_task(one)
        if not custom:
            task, note = task_that_runs(task, datasets_root)
            if note and notes is not None:
                notes.append(note)
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
    there. Custom tasks (YAML) checked their own files when they were read.
    """
    from transfer.datasets import catalog
    from transfer.tasks import get_task, is_custom_task, require

    for spec in tasks.values():
        if not is_custom_task(spec):
            task = get_task(spec)
            require(task)  # an optional dependency (DensePose): how to install it, before its datasets
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
        fileio.atomic_write_json(path, wanted)


def plan(weights: list[Weights], tasks, schedule, trials: int, output, fractions=(regimes.FULL,),
         backbones=(regimes.FINETUNE,)) -> list[Run]:
    """Every (task, backbone mode, label fraction, trial, weights) run, in that order; ``tasks``:
    names, or {name: spec}; ``schedule``: one for every task, or {name: schedule}
    (``resolve_tasks``'s ``schedules``); ``fractions`` and ``backbones``: the regimes
    (transfer/regimes.py), every one for every task."""
    if trials < 1:
        raise UserError(f"--trials: must be at least 1, got {trials}")
    labels = [w.label for w in weights]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"--weights: the label {duplicates[0]} is used twice; name them with LABEL=PATH")
    output = Path(output).resolve()
    tasks = tasks if isinstance(tasks, dict) else {name: name for name in tasks}
    schedules = schedule if isinstance(schedule, dict) else {task: schedule for task in tasks}
    return [Run(w, task, schedules[task], seed, output, task_spec, fraction, backbone)
            for task, task_spec in tasks.items() for backbone in backbones for fraction in fractions
            for seed in range(trials) for w in weights]


def repeated_runs(runs: list[Run], num_gpus: int = 1, datasets=None, opts=()) -> dict[Run, Run]:
    """{run: the earlier run of the plan it repeats}: same weights, seed and resolved config.

    Such a run is not trained again: it gets the earlier run's result (``reuse``). A task whose
    config cannot be resolved here repeats nothing; its own run reports what is wrong.
    """
    from transfer.finetune import experiment_key
    from transfer.tasks import get_task

    tasks, keys, first, repeats = {}, {}, {}, {}  # tasks: a custom task's data is read once, not per spec
    for run in runs:
        spec = (run.task_spec or run.task, run.weights.path, run.schedule, run.fraction, run.backbone)
        if spec not in keys:
            try:
                task = tasks[spec[0]] = tasks.get(spec[0]) or get_task(spec[0])
                keys[spec] = experiment_key(task, *spec[1:3], datasets, num_gpus, opts, *spec[3:])
            except Exception:  # noqa: BLE001  (the run itself reports the error)
                keys[spec] = spec
        key = (keys[spec], run.weights, run.seed)
        if key in first:
            repeats[run] = first[key]
        else:
            first[key] = run
    return repeats


def describe(runs: list[Run]) -> str:
    """The plan as a table: per task (and regime) x weights, trials done / planned."""
    import pandas as pd

    table = pd.DataFrame({"task": [" ".join(filter(None, (r.task, regimes.regime_label(r.fraction, r.backbone))))
                                   for r in runs],
                          "weights": [r.weights.label for r in runs], "state": [state(r) for r in runs]})
    cells = (table.groupby(["task", "weights"], sort=False)["state"]
             .agg(lambda s: f"{(s == 'done').sum()}/{len(s)}").unstack("weights")
             .reindex(index=table["task"].unique(), columns=table["weights"].unique()))
    counts = table["state"].value_counts()
    states = ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "interrupted", "new") if s in counts)
    return f"Plan: {len(runs)} runs ({states}); trials done / planned:\n{cells.to_string()}"
