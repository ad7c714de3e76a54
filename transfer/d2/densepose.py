"""detectron2's DensePose project, an optional dependency, as the ``coco_densepose`` task needs it.

The project is not on PyPI (it lives in detectron2's repository, ``projects/DensePose``): a user
with GitHub access installs it with ``INSTALL``; without it the task stops with one line saying
so (``require``). With it, this module gives the task what the DensePose project defines and our
trainer does not: its config keys, its datasets under our datasets root, its data loaders (which
map the COCO DensePose categories and read the dp_* annotations) and its evaluator (bbox AP and
DensePose AP under the GPS, GPSm and IoU measures). Nothing here is imported before the task runs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from transfer.errors import UserError

MODULE = "densepose"
# detectron2 0.6's DensePose, without pip following its setup.py's dependency on detectron2's
# GitHub head (which would replace the installed detectron2); its own dependencies first.
INSTALL = ("pip install av opencv-python-headless && pip install --no-deps "
           "'git+https://github.com/facebookresearch/detectron2@v0.6#subdirectory=projects/DensePose'")
# name -> (image folder, annotation json) under the datasets root, as the DensePose project lays them out
DATASETS = {
    "densepose_coco_2014_train": ("coco/train2014", "coco/annotations/densepose_train2014.json"),
    "densepose_coco_2014_valminusminival": ("coco/val2014", "coco/annotations/densepose_valminusminival2014.json"),
    "densepose_coco_2014_minival": ("coco/val2014", "coco/annotations/densepose_minival2014.json"),
}
LAYOUT = ("<root>/coco/{train2014,val2014}/ and <root>/coco/annotations/densepose_{train2014,"
          "valminusminival2014,minival2014}.json (the DensePose project's COCO DensePose layout)")


def available() -> bool:
    return importlib.util.find_spec(MODULE) is not None


def require(task: str = "coco_densepose") -> None:
    """One line saying how to install the DensePose project, when it is not importable."""
    if not available():
        raise UserError(f"task {task} needs detectron2's DensePose project, which is not on PyPI and not "
                        f"installed: {INSTALL} (needs GitHub access; README, 'DensePose')")


def add_config(cfg):
    """The task's ``extend_config``: the DensePose project's config keys."""
    require()
    from densepose import add_densepose_config

    add_densepose_config(cfg)
    return cfg


def register_datasets(root) -> None:
    """(Re-)register the COCO DensePose datasets under ``root`` (the project registers them under
    ./datasets when imported); nothing without the project."""
    if not available():
        return
    from densepose.data.datasets.coco import DATASETS as INFOS
    from densepose.data.datasets.coco import register_datasets as register

    from transfer.datasets.catalog import unregister  # catalog registers these through this module

    infos = [info for info in INFOS if info.name in DATASETS]
    for info in infos:
        unregister(info.name)
    register(infos, str(root))


def check(names, root) -> None:
    """The COCO DensePose files of ``names`` under ``root``, or one line naming the missing one."""
    for name in names:
        for part in DATASETS[name]:
            path = Path(root) / part
            if not path.exists():
                raise UserError(f"{path}: missing; expected {LAYOUT}")


def is_densepose(cfg) -> bool:
    return bool(cfg.MODEL.get("DENSEPOSE_ON", False))


def train_loader(cfg):
    from densepose.data import DatasetMapper, build_detection_train_loader

    return build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, True))


def test_loader(cfg, dataset_name):
    from densepose.data import DatasetMapper, build_detection_test_loader

    return build_detection_test_loader(cfg, dataset_name, mapper=DatasetMapper(cfg, False))


def build_evaluator(cfg, dataset_name: str, output_dir: str):
    """The DensePose project's evaluators: its COCO adapter (bbox) and DensePose AP."""
    from densepose.evaluation.d2_evaluator_adapter import Detectron2COCOEvaluatorAdapter
    from densepose.evaluation.evaluator import DensePoseCOCOEvaluator, build_densepose_evaluator_storage
    from detectron2.evaluation import DatasetEvaluators

    evaluation = cfg.DENSEPOSE_EVALUATION
    distributed = evaluation.DISTRIBUTED_INFERENCE
    return DatasetEvaluators([
        Detectron2COCOEvaluatorAdapter(dataset_name, output_dir=output_dir, distributed=distributed),
        DensePoseCOCOEvaluator(dataset_name, distributed, output_dir, evaluator_type=evaluation.TYPE,
                               min_iou_threshold=evaluation.MIN_IOU_THRESHOLD,
                               storage=build_densepose_evaluator_storage(cfg, output_dir)),
    ])
