"""detectron2's builtin dataset names, registered under a datasets root of our choosing, and layout checks.

detectron2 registers its builtin names (``voc_2007_trainval``, ``coco_2017_train``, ...) at import
time under ``$DETECTRON2_DATASETS`` (default ``./datasets``). ``register_all(root)`` re-registers
the names our tasks use under ``root`` with detectron2's own loaders and metadata, so the demo
data and a user's real datasets go through the same code. ``check(names, root)`` looks for each
dataset's files BEFORE training starts and raises a one-line ``UserError`` naming the missing or
malformed path and the layout that was expected.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_lvis_json, load_voc_instances  # noqa: E501
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES

from transfer import d2compat
from transfer.d2 import densepose
from transfer.datasets import voc_semseg
from transfer.errors import UserError

logger = logging.getLogger(__name__)

# name -> (devkit folder, split, year), as in detectron2's builtin.py
VOC = {
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2007_train": ("VOC2007", "train", 2007),
    "voc_2007_val": ("VOC2007", "val", 2007),
    "voc_2007_test": ("VOC2007", "test", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
    "voc_2012_train": ("VOC2012", "train", 2012),
    "voc_2012_val": ("VOC2012", "val", 2012),
}
# name -> (image folder, json file, builtin metadata key)
COCO = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json", "coco"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json", "coco"),
    "keypoints_coco_2017_train": ("coco/train2017", "coco/annotations/person_keypoints_train2017.json", "coco_person"),
    "keypoints_coco_2017_val": ("coco/val2017", "coco/annotations/person_keypoints_val2017.json", "coco_person"),
}
# name -> (image root holding train2017/ val2017/, json file, metadata key); LVIS images are COCO's
LVIS = {
    "lvis_v1_train": ("coco/", "lvis/lvis_v1_train.json", "lvis_v1"),
    "lvis_v1_val": ("coco/", "lvis/lvis_v1_val.json", "lvis_v1"),
    "lvis_v0.5_train": ("coco/", "lvis/lvis_v0.5_train.json", "lvis_v0.5"),
    "lvis_v0.5_val": ("coco/", "lvis/lvis_v0.5_val.json", "lvis_v0.5"),
}
# name -> (image folder, ground-truth folder)
CITYSCAPES = {
    f"cityscapes_fine_{task}_{split}": (f"cityscapes/leftImg8bit/{split}/", f"cityscapes/gtFine/{split}/")
    for task in ("instance_seg", "sem_seg")
    for split in ("train", "val")
}
VOC_SEMSEG = tuple(voc_semseg.SPLITS)  # train_aug, train, val

LAYOUT_HINTS = {
    "voc": ("<root>/{folder}/{{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/{split}.txt}} "
            "(PASCAL VOC devkit layout)"),
    "coco": "<root>/coco/{annotations/<file>.json, train2017/, val2017/} (COCO 2017 layout)",
    "lvis": ("<root>/lvis/lvis_v1_{train,val}.json and the COCO images in <root>/coco/{train2017,val2017}/ "
             "(LVIS layout)"),
    "cityscapes": "<root>/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/ with *_leftImg8bit.png and "
                  "*_gtFine_{instanceIds,labelIds,labelTrainIds}.png, *_gtFine_polygons.json (Cityscapes layout)",
}


def default_root() -> Path:
    """detectron2's own convention: ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def known_names() -> list[str]:
    return [*VOC, *COCO, *LVIS, *CITYSCAPES, *VOC_SEMSEG]


def _guarded(path, layout, loader):
    """Run a detectron2 loader; a malformed file becomes a one-line UserError naming it."""

    @functools.wraps(loader)
    def load():
        try:
            return loader()
        except UserError:
            raise
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e}); expected {layout}") from e
        except (AssertionError, KeyError, ValueError, IndexError, OSError, TypeError) as e:
            raise UserError(f"{path}: could not be read as expected ({type(e).__name__}: {e}); "
                            f"expected {layout}") from e

    return load


def unregister(name) -> None:
    """Forget a dataset name in detectron2's catalogs, so that it can be registered again (under another root)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_dataset(name, loader, **metadata):
    """(Re-)register ``name``: its loader (called lazily) and its metadata."""
    unregister(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def _cityscapes_instance_loader(image_dir, gt_dir):
    # detectron2's builtin reads the polygons json, which needs shapely; without it the same
    # loader reads the *_instanceIds.png files instead (its from_json=False route).
    if importlib.util.find_spec("shapely") is not None:
        return functools.partial(load_cityscapes_instances, image_dir, gt_dir, from_json=True, to_polygons=True)
    return functools.partial(load_cityscapes_instances, image_dir, gt_dir, from_json=False, to_polygons=True)


def register_all(root=None) -> Path:
    """(Re-)register detectron2's builtin names our tasks use under ``root``; returns the root."""
    root = Path(root) if root is not None else default_root()
    for name, (folder, split, year) in VOC.items():
        dirname = str(root / folder)
        layout = LAYOUT_HINTS["voc"].format(folder=folder, split=split)
        loader = _guarded(root / folder, layout, functools.partial(load_voc_instances, dirname, split, VOC_CLASSES))
        register_dataset(name, loader, thing_classes=list(VOC_CLASSES), dirname=dirname, year=year, split=split,
                  evaluator_type="pascal_voc")
    for name, (image_dir, json_file, meta_key) in COCO.items():
        json_file, image_dir = str(root / json_file), str(root / image_dir)
        loader = _guarded(json_file, LAYOUT_HINTS["coco"],
                          functools.partial(load_coco_json, json_file, image_dir, name))
        register_dataset(name, loader, json_file=json_file, image_root=image_dir, evaluator_type="coco",
                  **d2compat.builtin_metadata(meta_key))
    for name, (image_root, json_file, meta_key) in LVIS.items():
        # load_lvis_json joins image_root + split folder as strings: keep the trailing slash
        json_file, image_root = str(root / json_file), str(root / image_root) + os.sep
        loader = _guarded(json_file, LAYOUT_HINTS["lvis"],
                          functools.partial(load_lvis_json, json_file, image_root, name))
        register_dataset(name, loader, json_file=json_file, image_root=image_root, evaluator_type="lvis",
                  **get_lvis_instances_meta(meta_key))
    meta = d2compat.builtin_metadata("cityscapes")
    for name, (image_dir, gt_dir) in CITYSCAPES.items():
        image_dir, gt_dir = str(root / image_dir), str(root / gt_dir)
        if "instance_seg" in name:
            loader = _cityscapes_instance_loader(image_dir, gt_dir)
            extra = {"evaluator_type": "cityscapes_instance"}
        else:
            loader = functools.partial(load_cityscapes_semantic, image_dir, gt_dir)
            extra = {"evaluator_type": "cityscapes_sem_seg", "ignore_label": 255}
        register_dataset(name, _guarded(gt_dir, LAYOUT_HINTS["cityscapes"], loader), image_dir=image_dir, gt_dir=gt_dir,
                  **extra, **meta)
    voc_semseg.register(root)
    densepose.register_datasets(root)  # COCO DensePose, when the optional DensePose project is installed
    return root


# ----------------------------------------------------------------------------------------------
def _missing(path: Path, layout: str):
    return UserError(f"{path}: missing; expected {layout}")


def _check_json(path: Path, layout: str) -> None:
    """Existence plus a cheap completeness test (a truncated copy is the usual culprit).

    The full parse happens in the loader, whose errors are turned into the same kind of message.
    """
    if not path.is_file():
        raise _missing(path, layout)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
        f.seek(max(0, size - 64))
        tail = f.read().rstrip()
    if not (head.startswith(b"{") and tail.endswith(b"}")):
        raise UserError(f"{path}: not a complete JSON object (empty or truncated file?); expected {layout}")


def _check_voc(root: Path, name: str) -> None:
    folder, split, _ = VOC[name]
    layout = LAYOUT_HINTS["voc"].format(folder=folder, split=split)
    base = root / folder
    for path in (base, base / "Annotations", base / "JPEGImages", base / "ImageSets" / "Main" / f"{split}.txt"):
        if not path.exists():
            raise _missing(path, layout)
    ids = (base / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    if not ids:
        raise UserError(f"{base / 'ImageSets' / 'Main' / f'{split}.txt'}: lists no images; expected {layout}")
    for image_id in (ids[0], ids[-1]):  # a spot check; the loader reads every file
        for path in (base / "Annotations" / f"{image_id}.xml", base / "JPEGImages" / f"{image_id}.jpg"):
            if not path.is_file():
                raise _missing(path, layout)


def _check_coco(root: Path, name: str) -> None:
    image_dir, json_file, _ = COCO[name]
    if not (root / image_dir).is_dir():
        raise _missing(root / image_dir, LAYOUT_HINTS["coco"])
    _check_json(root / json_file, LAYOUT_HINTS["coco"])


def _check_lvis(root: Path, name: str) -> None:
    image_root, json_file, _ = LVIS[name]
    for split_dir in ("train2017", "val2017"):  # LVIS v1 val draws images from both
        if not (root / image_root / split_dir).is_dir():
            raise _missing(root / image_root / split_dir, LAYOUT_HINTS["lvis"])
    _check_json(root / json_file, LAYOUT_HINTS["lvis"])


def _check_cityscapes(root: Path, name: str) -> None:
    image_dir, gt_dir = (root / p for p in CITYSCAPES[name])
    layout = LAYOUT_HINTS["cityscapes"]
    for path in (image_dir, gt_dir):
        if not path.is_dir():
            raise _missing(path, layout)
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise UserError(f"{image_dir}: holds no <city>/*_leftImg8bit.png images; expected {layout}")
    suffixes = ["gtFine_instanceIds.png", "gtFine_labelIds.png", "gtFine_polygons.json"]
    if "sem_seg" in name:
        suffixes.append("gtFine_labelTrainIds.png")
    stem = images[0].name[: -len("leftImg8bit.png")]
    for suffix in suffixes:
        path = gt_dir / images[0].parent.name / (stem + suffix)
        if not path.is_file():
            make_it = " (make it with cityscapesscripts/preparation/createTrainIdLabelImgs.py)"
            hint = make_it if "TrainIds" in suffix else ""
            raise UserError(f"{path}: missing{hint}; expected {layout}")


def check(dataset_names, root=None) -> None:
    """Raise UserError on the first dataset whose files are missing or malformed under ``root``.

    Names this module does not know (e.g. custom datasets) must already be registered; they are
    checked when they are registered.
    """
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise UserError(f"{root}: datasets root missing; expected a folder laid out as detectron2's "
                        "$DETECTRON2_DATASETS (README, 'Datasets')")
    for name in dataset_names:
        if name in VOC:
            _check_voc(root, name)
        elif name in COCO:
            _check_coco(root, name)
        elif name in LVIS:
            _check_lvis(root, name)
        elif name in CITYSCAPES:
            _check_cityscapes(root, name)
        elif name in VOC_SEMSEG:
            voc_semseg.check(root, name)
        elif name in densepose.DATASETS:
            densepose.check([name], root)
        elif name not in DatasetCatalog.list():
            raise UserError(f"{name}: unknown dataset; known: {', '.join(known_names())} "
                            "or a registered custom dataset")
