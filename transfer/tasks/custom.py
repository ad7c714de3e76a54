"""A user's own dataset as a task: the YAML that transfer/datasets/custom.py reads, nothing else.

    python tools/finetune.py --task my_shapes.yaml --weights moco.pkl --output runs/shapes

The dataset's YAML picks the model family (C4 or FPN: configs/detection/custom_R_50_*.yaml), masks
on or off and the schedule (``demo`` / ``quick`` / ``full``, or its own ``{max_iter, steps,
base_lr, ims_per_batch}``, then named ``custom``); the class count comes from the data. It is
evaluated with detectron2's COCOEvaluator.
"""
from __future__ import annotations

from transfer.tasks import Schedule, Task, standard_schedules

CONFIGS = {"C4": "configs/detection/custom_R_50_C4.yaml", "FPN": "configs/detection/custom_R_50_FPN.yaml"}
DEMO = {"C4": "configs/schedules/demo_c4.yaml", "FPN": "configs/schedules/demo.yaml"}
# the dataset YAML's schedule keys -> detectron2 config keys
SCHEDULE_KEYS = {"max_iter": "SOLVER.MAX_ITER", "steps": "SOLVER.STEPS", "base_lr": "SOLVER.BASE_LR",
                 "ims_per_batch": "SOLVER.IMS_PER_BATCH"}


def task_from_yaml(yaml_path) -> Task:
    """Register the dataset the YAML describes (checking it) and return its task."""
    from transfer.datasets.custom import register_custom

    dataset = register_custom(yaml_path)
    schedules = standard_schedules(DEMO[dataset.model])
    default = dataset.schedule
    if isinstance(dataset.schedule, dict):
        settings = {SCHEDULE_KEYS[k]: tuple(v) if k == "steps" else v for k, v in dataset.schedule.items()}
        settings.setdefault("SOLVER.STEPS", ())
        schedules["custom"] = Schedule(settings=settings, description=f"from {dataset.yaml_path}")
        default = "custom"
    masks = ("APmk", "APmk50", "APmk75") if dataset.masks else ()
    return Task(
        name=str(dataset.yaml_path), config=CONFIGS[dataset.model],
        train=(dataset.train_dataset,), test=(dataset.test_dataset,), evaluator=dataset.evaluator_type,
        metrics=("APbb", "APbb50", "APbb75", *masks), schedules=schedules,
        description=f"custom {dataset.format} dataset {dataset.name} ({dataset.num_classes} classes), R50-{dataset.model}",
        overrides={"MODEL.ROI_HEADS.NUM_CLASSES": dataset.num_classes, "MODEL.MASK_ON": dataset.masks,
                   "INPUT.MASK_FORMAT": dataset.mask_format},
        default_schedule=default, notes=tuple(dataset.notes),
    )
