"""A user's own dataset as a task: the YAML that transfer/datasets/custom.py reads, nothing else.

    python tools/finetune.py --task my_shapes.yaml --weights moco.pkl --output runs/shapes

The dataset's YAML picks the model family (C4 or FPN: configs/detection/custom_R_50_*.yaml), masks
on or off, the image size and the schedule (``demo`` / ``quick`` / ``full``, or its own ``{max_iter,
steps, base_lr, ims_per_batch, warmup_iters, precise_bn_iters}``, then named ``custom``), which is
the task's default; the class count comes from the data. A schedule of its own that sets
``max_iter`` alone gets LR steps, warm-up and precise BN fitted to that length
(``transfer.finetune.apply_schedule``). It is evaluated with detectron2's COCOEvaluator.
"""
from __future__ import annotations

from transfer import REPO
from transfer.tasks import DEMO, Schedule, Task, standard_schedules

CONFIGS = {"C4": "configs/detection/custom_R_50_C4.yaml", "FPN": "configs/detection/custom_R_50_FPN.yaml"}


def yaml_schedule(yaml_path) -> str | None:
    """The schedule a dataset YAML names ('custom' for a mapping of its own), None if it names none."""
    from transfer import fileio

    value = fileio.read_yaml_mapping(yaml_path, "a custom dataset").get("schedule")
    return "custom" if isinstance(value, dict) else value


def image_size_settings(cfg, size: int) -> dict:
    """INPUT keys for a shorter image side of ``size`` at test time; the training scales and the
    longer-side limits keep their proportions to it (480-800 for 800, at most 1333)."""
    factor = size / cfg.INPUT.MIN_SIZE_TEST
    return {"INPUT.MIN_SIZE_TRAIN": tuple(sorted({round(s * factor) for s in cfg.INPUT.MIN_SIZE_TRAIN})),
            "INPUT.MAX_SIZE_TRAIN": round(cfg.INPUT.MAX_SIZE_TRAIN * factor),
            "INPUT.MIN_SIZE_TEST": size, "INPUT.MAX_SIZE_TEST": round(cfg.INPUT.MAX_SIZE_TEST * factor)}


def _custom_schedule(schedule: dict, yaml_path: str) -> Schedule:
    from transfer.datasets.custom import SCHEDULE_KEYS

    settings = {SCHEDULE_KEYS[k]: tuple(v) if k == "steps" else v for k, v in schedule.items()}
    if settings.get("TEST.PRECISE_BN.NUM_ITER") == 0:  # 0: no precise BN at all
        del settings["TEST.PRECISE_BN.NUM_ITER"]
        settings["TEST.PRECISE_BN.ENABLED"] = False
    return Schedule(settings=settings, description=f"from {yaml_path}")


def task_from_yaml(yaml_path) -> Task:
    """The task of the dataset the YAML describes, once the YAML and its data are checked; the
    dataset is not registered (``transfer.datasets.custom.register_custom`` does that)."""
    from transfer.d2.config import get_cfg, merge_config_file
    from transfer.datasets.custom import read_custom

    dataset = read_custom(yaml_path)
    schedules = standard_schedules(DEMO[dataset.model])
    default = dataset.schedule
    if isinstance(dataset.schedule, dict):
        schedules["custom"] = _custom_schedule(dataset.schedule, dataset.yaml_path)
        default = "custom"
    overrides = {"MODEL.ROI_HEADS.NUM_CLASSES": dataset.num_classes, "MODEL.MASK_ON": dataset.masks,
                 "INPUT.MASK_FORMAT": dataset.mask_format}
    if dataset.image_size:
        cfg = get_cfg()
        merge_config_file(cfg, REPO / CONFIGS[dataset.model])
        overrides.update(image_size_settings(cfg, dataset.image_size))
    masks = ("APmk", "APmk50", "APmk75") if dataset.masks else ()
    return Task(
        name=str(dataset.yaml_path), config=CONFIGS[dataset.model],
        train=(dataset.train_dataset,), test=(dataset.test_dataset,), evaluator=dataset.evaluator_type,
        metrics=("APbb", "APbb50", "APbb75", *masks), schedules=schedules,
        description=f"custom {dataset.format} dataset {dataset.name} ({dataset.num_classes} classes), "
                    f"R50-{dataset.model}",
        overrides=overrides, default_schedule=default, notes=tuple(dataset.notes),
    )
