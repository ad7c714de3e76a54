"""PASCAL VOC 2012 semantic segmentation, registered in detectron2 (detectron2 has no such builtin).

Layout under the datasets root (detectron2's, ``$DETECTRON2_DATASETS``)::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png            palette PNGs: index = class id, 255 = ignore
    VOC2012/ImageSets/Segmentation/{train,val}.txt
    # optional, the SBD-augmented training set the paper used ("train_aug", 10,582 images):
    VOC2012/SegmentationClassAug/<id>.png         class-id PNGs (the widely shared conversion of SBD)
    VOC2012/ImageSets/SegmentationAug/train_aug.txt   (or ImageSets/Segmentation/train_aug.txt)

A list file holds one image per line, either ``<id>`` or ``/JPEGImages/<id>.jpg
/SegmentationClassAug/<id>.png`` (DeepLab's format); only the first entry's file stem is used.

Registered names: ``voc_2012_sem_seg_train_aug`` (the paper's training set),
``voc_2012_sem_seg_train`` (the 1,464 images of ``train``) and ``voc_2012_sem_seg_val`` (1,449
images). The ``voc_sem`` task trains on train_aug; when SegmentationClassAug is absent, the runner
falls back to the ``voc_sem_train`` task (``train``), says so, and records it in metrics.json
(``task_variant``, ``dataset_split``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from transfer.errors import UserError

logger = logging.getLogger(__name__)

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
IGNORE_LABEL = 255  # the boundary / "difficult" band around objects
TRAIN_AUG = "voc_2012_sem_seg_train_aug"
TRAIN = "voc_2012_sem_seg_train"
VAL = "voc_2012_sem_seg_val"
SPLITS = {TRAIN_AUG: "train_aug", TRAIN: "train", VAL: "val"}
AUG_FOLDER = "SegmentationClassAug"
AUG_LISTS = ("ImageSets/SegmentationAug/train_aug.txt", "ImageSets/Segmentation/train_aug.txt")
TRAIN_ONLY_WARNING = (
    "VOC semantic segmentation trains on the 1,464-image 'train' split: {voc}/" + AUG_FOLDER + " is"
    " absent. The paper trains on the SBD-augmented 'train_aug' (10,582 images), so this mIoU is not"
    " comparable with published numbers; add SegmentationClassAug and its train_aug.txt list"
    " (README, 'Semantic segmentation') to train on train_aug."
)


def _read_ids(list_file: Path) -> list[str]:
    ids = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"{list_file}: the list is empty")
    return ids


def _aug_list(voc: Path) -> Path | None:
    """The train_aug list file when the SBD-augmented labels are there; None when they are not."""
    if not (voc / AUG_FOLDER).is_dir():
        return None
    for name in AUG_LISTS:
        if (voc / name).is_file():
            return voc / name
    raise UserError(
        f"{voc / AUG_FOLDER}: found the SBD-augmented labels but not their list; "
        f"expected one of {', '.join(str(voc / n) for n in AUG_LISTS)}"
    )


def check(datasets_root, name: str = VAL) -> None:
    """Raise UserError naming the first missing path that dataset ``name`` needs."""
    voc = Path(datasets_root) / "VOC2012"
    layout = ("VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt} "
              "(README, 'Semantic segmentation')")
    if name == TRAIN_AUG:
        if _aug_list(voc) is None:
            raise UserError(f"{voc / AUG_FOLDER}: missing; "
                            "the SBD-augmented 'train_aug' labels (README, 'Semantic segmentation')")
        needed = (voc / "JPEGImages",)
    else:
        needed = (voc / "JPEGImages", voc / "SegmentationClass", voc / f"ImageSets/Segmentation/{SPLITS[name]}.txt")
    for path in needed:
        if not path.exists():
            raise UserError(f"{path}: missing; expected {layout}")


def load(datasets_root, split: str) -> list[dict]:
    """detectron2 dataset dicts (``file_name``, ``sem_seg_file_name``) of 'train_aug', 'train' or 'val'."""
    voc = Path(datasets_root) / "VOC2012"
    if split == "train_aug":
        list_file, label_dir = _aug_list(voc), voc / AUG_FOLDER
        if list_file is None:
            raise UserError(f"{voc / AUG_FOLDER}: missing; 'train_aug' needs the SBD-augmented labels")
        ids = _read_ids(list_file)
        leaked = set(ids) & set(_read_ids(voc / "ImageSets/Segmentation/val.txt"))
        if leaked:
            raise UserError(f"{list_file}: lists {len(leaked)} val images (e.g. {sorted(leaked)[0]}); "
                            "train_aug must exclude VOC 2012 val")
    else:
        list_file, label_dir = voc / f"ImageSets/Segmentation/{split}.txt", voc / "SegmentationClass"
        if not list_file.is_file():
            raise UserError(f"{list_file}: missing")
        ids = _read_ids(list_file)
        if split == "train" and not (voc / AUG_FOLDER).is_dir():
            logger.warning(TRAIN_ONLY_WARNING.format(voc=voc))
    dicts = [{"file_name": str(voc / "JPEGImages" / f"{i}.jpg"), "sem_seg_file_name": str(label_dir / f"{i}.png")}
             for i in ids]
    for d in dicts:
        for key in ("file_name", "sem_seg_file_name"):
            if not Path(d[key]).is_file():
                raise UserError(f"{d[key]}: missing (listed in {list_file})")
    return dicts


def register(datasets_root) -> None:
    """(Re-)register the three VOC 2012 segmentation names under the root (loading is lazy)."""
    from transfer.datasets.catalog import register_dataset  # catalog registers these through this module

    for name, split in SPLITS.items():
        register_dataset(
            name, lambda s=split: load(datasets_root, s),
            stuff_classes=list(CLASSES),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            split=split,
            dirname=str(Path(datasets_root) / "VOC2012"),
        )
