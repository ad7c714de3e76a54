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

Registered names: ``voc_2012_sem_seg_train`` (train_aug when SegmentationClassAug and its list are
present, otherwise the 1,464-image ``train`` split with a warning) and ``voc_2012_sem_seg_val``
(1,449 images). Which training split was used is the metadata field ``split``
(:func:`training_split`), recorded in each run's metrics.json as ``dataset_split``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transfer import d2compat  # noqa: F401  (must precede detectron2 imports)

from detectron2.data import DatasetCatalog, MetadataCatalog

from transfer.errors import UserError

logger = logging.getLogger(__name__)

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
IGNORE_LABEL = 255  # the boundary / "difficult" band around objects
TRAIN = "voc_2012_sem_seg_train"
VAL = "voc_2012_sem_seg_val"
AUG_FOLDER = "SegmentationClassAug"
AUG_LISTS = ("ImageSets/SegmentationAug/train_aug.txt", "ImageSets/Segmentation/train_aug.txt")
TRAIN_ONLY_WARNING = (
    "VOC semantic segmentation trains on the 1,464-image 'train' split because {voc}/"
    + AUG_FOLDER
    + " is absent; the paper trains on the SBD-augmented 'train_aug' (10,582 images), so the"
    " mIoU is not comparable with published numbers. Add SegmentationClassAug and its train_aug.txt"
    " list (README, 'Semantic segmentation') to train on train_aug."
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


def training_split(datasets_root) -> str:
    """'train_aug' when the SBD-augmented set is present under the root, else 'train'."""
    return "train_aug" if _aug_list(Path(datasets_root) / "VOC2012") else "train"


def check(datasets_root) -> None:
    """Raise UserError naming the first missing path of the VOC 2012 segmentation layout."""
    voc = Path(datasets_root) / "VOC2012"
    for path in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets/Segmentation/val.txt"):
        if not path.exists():
            raise UserError(f"{path}: missing; expected VOC2012/{{JPEGImages,SegmentationClass,ImageSets/Segmentation/{{train,val}}.txt}} (README, 'Semantic segmentation')")
    if _aug_list(voc) is None and not (voc / "ImageSets/Segmentation/train.txt").is_file():
        raise UserError(f"{voc / 'ImageSets/Segmentation/train.txt'}: missing (and no {AUG_FOLDER} with its train_aug list)")


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
            raise UserError(f"{list_file}: lists {len(leaked)} val images (e.g. {sorted(leaked)[0]}); train_aug must exclude VOC 2012 val")
    else:
        list_file, label_dir = voc / f"ImageSets/Segmentation/{split}.txt", voc / "SegmentationClass"
        if not list_file.is_file():
            raise UserError(f"{list_file}: missing")
        ids = _read_ids(list_file)
        if split == "train":
            logger.warning(TRAIN_ONLY_WARNING.format(voc=voc))
    dicts = [{"file_name": str(voc / "JPEGImages" / f"{i}.jpg"), "sem_seg_file_name": str(label_dir / f"{i}.png")} for i in ids]
    for d in dicts:
        for key in ("file_name", "sem_seg_file_name"):
            if not Path(d[key]).is_file():
                raise UserError(f"{d[key]}: missing (listed in {list_file})")
    return dicts


def register(datasets_root) -> str:
    """(Re-)register ``voc_2012_sem_seg_{train,val}`` under the root; return the training split used.

    Never raises on a bad layout (registration happens for every task); :func:`check` and the
    loaders name the problem when a VOC segmentation task actually runs.
    """
    try:
        split = training_split(datasets_root)
    except UserError:  # SegmentationClassAug without its list: load() reports it
        split = "train_aug"
    for name, name_split in ((TRAIN, split), (VAL, "val")):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda s=name_split: load(datasets_root, s))
        MetadataCatalog.get(name).set(
            stuff_classes=list(CLASSES),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            split=name_split,
            dirname=str(Path(datasets_root) / "VOC2012"),
        )
    return split
