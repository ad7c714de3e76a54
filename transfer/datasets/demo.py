"""Built-in demo datasets, written in the REAL on-disk layouts of ImageNet, VOC, COCO, LVIS and Cityscapes.

Nothing can be downloaded on the machines this project is tested on, so ``generate(root)`` draws
small synthetic datasets that detectron2's own loaders and evaluators read exactly like the real
ones. The scenes are transfer/datasets/demo_scenes.py's (every class a distinct (shape, colour)
pair on a textured background, at varied positions and scales, so a few hundred fine-tuning
iterations give clearly non-zero AP / mIoU); this module writes them in each dataset's format.
``synthetic_coco`` writes COCO training data with COCO's image size and instance count, for
timing (tools/bench_finetune.py).

Layout written under ``root`` (the same as detectron2's ``$DETECTRON2_DATASETS``)::

    imagenet/{train,val}/<class>/*.jpg                  ImageFolder (pre-training, k-NN / linear eval)
    VOC2007/{Annotations,ImageSets/Main,JPEGImages}     trainval / test (+ train / val)
    VOC2012/{Annotations,ImageSets/Main,JPEGImages,SegmentationClass,ImageSets/Segmentation}
    coco/annotations/{instances,person_keypoints}_{train,val}2017.json, coco/{train,val}2017/*.jpg
    lvis/lvis_v1_{train,val}.json                       over the coco images (coco_url file names)
    cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_{polygons.json,labelIds,instanceIds,labelTrainIds,color}.png

Generation is deterministic for a given seed and idempotent: a marker file records what was
written, so a second call returns at once; an interrupted run is redone.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from transfer import REPO
from transfer.datasets.demo_scenes import (
    CITYSCAPES_THINGS,
    COCO_LOOKS,
    IMAGENET_LOOKS,
    KEYPOINT_NAMES,
    VOC_LOOKS,
    Cycle,
    background,
    cityscapes_stuff,
    render_scene,
    to_uint8,
)
from transfer.errors import UserError
from transfer.fileio import atomic_write_json

DEMO_VERSION = 2  # bump when the generated data changes, so stale demo folders are regenerated
MARKER = ".moco_transfer_demo.json"
DATASET_DIRS = ("imagenet", "VOC2007", "VOC2012", "coco", "lvis", "cityscapes")
# The detectron2 dataset names (transfer.datasets.catalog) that the demo data provides.
DATASET_NAMES = (
    "voc_2007_trainval", "voc_2007_train", "voc_2007_val", "voc_2007_test",
    "voc_2012_trainval", "voc_2012_train", "voc_2012_val",
    "coco_2017_train", "coco_2017_val", "keypoints_coco_2017_train", "keypoints_coco_2017_val",
    "lvis_v1_train", "lvis_v1_val",
    "cityscapes_fine_instance_seg_train", "cityscapes_fine_instance_seg_val",
    "cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val",
    "voc_2012_sem_seg_train", "voc_2012_sem_seg_val",
)
DEFAULT_ROOT = Path(os.environ.get("MOCO_TRANSFER_DEMO") or REPO / "datasets" / "demo")

# How much of each dataset to draw: small enough for CPU tests, big enough to learn from.
SIZES = {
    "imagenet": {"image": 64, "train_per_class": 30, "val_per_class": 10},
    "VOC2007": {"image": (160, 120), "trainval": 80, "test": 40},
    "VOC2012": {"image": (160, 120), "trainval": 60, "seg_train": 40},
    "coco": {"image": (160, 128), "train2017": 64, "val2017": 24},
    "cityscapes": {"image": (256, 128), "train": {"aachen": 12, "bremen": 12}, "val": {"frankfurt": 8}},
}

# The LVIS v1 category each COCO class of the demo is labelled with in the LVIS files: frequent,
# common and rare ones, so APr/APc/APf exist.
COCO_TO_LVIS = {
    "person": "person", "car": "car_(automobile)", "kite": "kite", "clock": "clock",
    "stop sign": "stop_sign", "bottle": "bottle", "tie": "pennant", "book": "cube",
}
# COCO's person skeleton: pairs of KEYPOINT_NAMES (1-based), as in person_keypoints_*.json.
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                 [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]


def _save_jpeg(path, array, quality=92):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=quality)


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------
def write_imagenet(root: Path, rng) -> None:
    spec = SIZES["imagenet"]
    size = spec["image"]
    for split in ("train", "val"):
        for name in IMAGENET_LOOKS:
            for i in range(spec[f"{split}_per_class"]):
                image, _ = render_scene(rng, size, size, [name], IMAGENET_LOOKS, size_range=(0.35, 0.75))
                _save_jpeg(root / "imagenet" / split / name / f"{name}_{split}_{i:04d}.jpg", image)


def _voc_xml(folder, filename, width, height, objects, segmented):
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    source = ET.SubElement(ann, "source")
    ET.SubElement(source, "database").text = "moco-transfer demo"
    size = ET.SubElement(ann, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(ann, "segmented").text = str(int(segmented))
    for obj in objects:
        node = ET.SubElement(ann, "object")
        ET.SubElement(node, "name").text = obj.label
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = obj.box_xyxy()
        # VOC boxes are 1-based inclusive pixel indices.
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode") + "\n"


def voc_palette():
    """PASCAL VOC's colour map (class index -> RGB), flat, as PIL palettes want it."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _voc_segmentation(objects, width, height, class_names):
    """Class-index map with VOC's 255 'void' band along every object outline."""
    seg = np.zeros((height, width), dtype=np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for obj in objects:
        seg[obj.mask] = class_names.index(obj.label) + 1
    for obj in objects:
        edge = cv2.morphologyEx(obj.mask.astype(np.uint8), cv2.MORPH_GRADIENT, kernel).astype(bool)
        seg[edge] = 255
    img = Image.fromarray(seg, mode="P")
    img.putpalette(voc_palette())
    return img


def _write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines))


def write_voc(root: Path, year: int, rng) -> None:
    spec = SIZES[f"VOC{year}"]
    width, height = spec["image"]
    names = list(VOC_LOOKS)
    base = root / f"VOC{year}"
    cycle = Cycle(names, rng)
    if year == 2007:
        ids = [f"{i + 1:06d}" for i in range(spec["trainval"] + spec["test"])]
        order = rng.permutation(len(ids))  # real VOC interleaves trainval and test ids
        splits = {"trainval": sorted(ids[i] for i in order[: spec["trainval"]]),
                  "test": sorted(ids[i] for i in order[spec["trainval"]:])}
        segmented = set()
    else:
        ids = [f"2012_{i + 1:06d}" for i in range(spec["trainval"])]
        splits = {"trainval": ids}
        segmented = set(ids)
    splits["train"] = splits["trainval"][0::2]
    splits["val"] = splits["trainval"][1::2]
    for image_id in ids:
        labels = cycle.take(int(rng.integers(1, 4)))
        image, objects = render_scene(rng, width, height, labels, VOC_LOOKS, size_range=(0.3, 0.6))
        _save_jpeg(base / "JPEGImages" / f"{image_id}.jpg", image)
        xml = _voc_xml(f"VOC{year}", f"{image_id}.jpg", width, height, objects, image_id in segmented)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image_id}.xml").write_text(xml)
        if image_id in segmented:
            (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            _voc_segmentation(objects, width, height, names).save(base / "SegmentationClass" / f"{image_id}.png")
    for split, split_ids in splits.items():
        _write_lines(base / "ImageSets" / "Main" / f"{split}.txt", split_ids)
    if segmented:
        seg_ids = sorted(segmented)
        seg_train = seg_ids[: spec["seg_train"]]
        seg_val = seg_ids[spec["seg_train"]:]
        for split, split_ids in (("train", seg_train), ("val", seg_val), ("trainval", seg_ids)):
            _write_lines(base / "ImageSets" / "Segmentation" / f"{split}.txt", split_ids)


def coco_categories():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [{"supercategory": "demo", "id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def _coco_annotation(obj, annotation_id: int, image_id: int, category_id: int) -> dict:
    """A drawn object as a COCO instance annotation: its outline polygons, mask area and box."""
    x0, y0, x1, y1 = obj.box_xyxy()
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "segmentation": obj.polygons(),
            "area": float(obj.mask.sum()), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "iscrowd": 0}


def write_coco_and_lvis(root: Path, rng) -> None:
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    spec = SIZES["coco"]
    width, height = spec["image"]
    categories = coco_categories()
    coco_id = {c["name"]: c["id"] for c in categories}
    lvis_id = {c["name"]: c["id"] for c in LVIS_CATEGORIES}
    others = Cycle([n for n in COCO_LOOKS if n != "person"], rng)
    first_id = {"train2017": 1, "val2017": 500001}
    scenes = {}
    for split in ("train2017", "val2017"):
        images, anns, kp_anns, lvis_images, lvis_anns = [], [], [], [], []
        for i in range(spec[split]):
            image_id = first_id[split] + i
            file_name = f"{image_id:012d}.jpg"
            # Persons in most images (keypoint R-CNN needs them), plus other classes round-robin.
            labels = (["person"] if rng.random() < 0.75 else []) + others.take(int(rng.integers(1, 3)))
            image, objects = render_scene(rng, width, height, labels, COCO_LOOKS, size_range=(0.35, 0.8))
            _save_jpeg(root / "coco" / split / file_name, image)
            url = f"http://images.cocodataset.org/{split}/{file_name}"
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                           "license": 1, "coco_url": url, "flickr_url": url,
                           "date_captured": "2026-11-22 00:00:00"})
            present = set()
            for obj in objects:
                ann = _coco_annotation(obj, len(anns) + first_id[split] * 10, image_id, coco_id[obj.label])
                anns.append(ann)
                if obj.keypoints is not None:
                    flat = [v for x, y in obj.keypoints for v in (x, y, 2)]
                    kp_anns.append({**ann, "keypoints": flat, "num_keypoints": len(obj.keypoints)})
                lvis_cat = lvis_id[COCO_TO_LVIS[obj.label]]
                present.add(lvis_cat)
                lvis_anns.append({"id": ann["id"], "image_id": image_id, "category_id": lvis_cat,
                                  "segmentation": ann["segmentation"], "area": ann["area"], "bbox": ann["bbox"]})
            absent = sorted({lvis_id[COCO_TO_LVIS[n]] for n in COCO_LOOKS} - present)
            lvis_images.append({"id": image_id, "coco_url": url, "flickr_url": url, "width": width,
                                "height": height, "license": 1, "date_captured": "2026-11-22 00:00:00",
                                "neg_category_ids": absent, "not_exhaustive_category_ids": []})
        info = {"description": "moco-transfer demo data in COCO 2017 layout", "version": str(DEMO_VERSION)}
        licenses = [{"id": 1, "name": "CC0", "url": ""}]
        _write_json(root / "coco" / "annotations" / f"instances_{split}.json",
                    {"info": info, "licenses": licenses, "images": images, "annotations": anns,
                     "categories": categories})
        person = {"supercategory": "person", "id": 1, "name": "person",
                  "keypoints": list(KEYPOINT_NAMES), "skeleton": COCO_SKELETON}
        _write_json(root / "coco" / "annotations" / f"person_keypoints_{split}.json",
                    {"info": info, "licenses": licenses, "images": images, "annotations": kp_anns,
                     "categories": [person]})
        scenes[split] = (info, licenses, lvis_images, lvis_anns)

    # LVIS v1 lists all 1203 categories; image/instance counts come from the train split, as in LVIS.
    train_anns = scenes["train2017"][3]
    instance_count = {c["id"]: 0 for c in LVIS_CATEGORIES}
    images_with = {c["id"]: set() for c in LVIS_CATEGORIES}
    for ann in train_anns:
        instance_count[ann["category_id"]] += 1
        images_with[ann["category_id"]].add(ann["image_id"])
    lvis_categories = [{**c, "image_count": len(images_with[c["id"]]), "instance_count": instance_count[c["id"]]}
                       for c in LVIS_CATEGORIES]
    for split, lvis_split in (("train2017", "train"), ("val2017", "val")):
        info, licenses, lvis_images, lvis_anns = scenes[split]
        _write_json(root / "lvis" / f"lvis_v1_{lvis_split}.json",
                    {"info": info, "licenses": licenses, "images": lvis_images, "annotations": lvis_anns,
                     "categories": lvis_categories})


def synthetic_coco(root, num_images: int = 64, size=(640, 480), objects=(4, 11), seed: int = 0) -> Path:
    """``root/coco`` in the COCO 2017 train layout with COCO's load, for speed only: 640 x 480 JPEGs
    with 4-10 polygon instances each (COCO train averages 7.3). The built-in demo images are much
    smaller and emptier, which would under-count per-instance work such as mask targets. Idempotent
    (the annotations are written last)."""
    root = Path(root)
    annotations = root / "coco" / "annotations" / "instances_train2017.json"
    if annotations.exists():
        return root
    rng = np.random.default_rng(seed)
    names = list(COCO_LOOKS)
    categories = coco_categories()
    category = {c["name"]: c["id"] for c in categories}
    width, height = size
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        labels = list(rng.choice(names, int(rng.integers(*objects))))
        pixels, drawn = render_scene(rng, width, height, labels, COCO_LOOKS, size_range=(0.1, 0.45))
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(root / "coco" / "train2017" / file_name, pixels, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        anns.extend(_coco_annotation(obj, len(anns) + 1, image_id, category[obj.label]) for obj in drawn)
    _write_json(annotations, {"images": images, "annotations": anns, "categories": categories})
    return root


def write_cityscapes(root: Path, rng) -> None:
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import id2label
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    spec = SIZES["cityscapes"]
    width, height = spec["image"]
    cycle = Cycle(list(CITYSCAPES_THINGS), rng)
    for split in ("train", "val"):
        for city, count in spec[split].items():
            for frame in range(count):
                stem = f"{city}_{frame:06d}_000019"
                horizon, stuff = cityscapes_stuff(rng, width, height)
                labels = cycle.take(int(rng.integers(2, 5)))
                _, things = render_scene(rng, width, height, labels, CITYSCAPES_THINGS, size_range=(0.25, 0.5),
                                          region=(0, horizon + 8, width, height), canvas=np.zeros((height, width, 3)))
                objects = [{"label": label, "polygon": points} for label, points in stuff]
                for obj in things:
                    for poly in obj.polygons():
                        objects.append({"label": obj.label, "polygon": np.reshape(poly, (-1, 2)).tolist()})
                gt_dir = root / "cityscapes" / "gtFine" / split / city
                json_path = gt_dir / f"{stem}_gtFine_polygons.json"
                _write_json(json_path, {"imgHeight": height, "imgWidth": width, "objects": objects})
                # The label images are made by cityscapesscripts itself from the polygons, as for real data.
                annotation = Annotation()
                annotation.fromJsonFile(str(json_path))
                label_ids = createLabelImage(annotation, "ids")
                label_ids.save(gt_dir / f"{stem}_gtFine_labelIds.png")
                createLabelImage(annotation, "trainIds").save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
                createLabelImage(annotation, "color").save(gt_dir / f"{stem}_gtFine_color.png")
                instance_ids = createInstanceImage(annotation, "ids")
                instance_ids.save(gt_dir / f"{stem}_gtFine_instanceIds.png")
                # The photo: each stuff region / instance in its label colour, textured.
                canvas = background(rng, width, height) * 0.25
                ids = np.asarray(instance_ids, dtype=np.int64)
                for value in np.unique(ids):
                    label = id2label[int(value // 1000 if value >= 1000 else value)]
                    colour = CITYSCAPES_THINGS[label.name][1] if label.name in CITYSCAPES_THINGS else label.color
                    region = ids == value
                    canvas[region] += 0.75 * np.asarray(colour, dtype=np.float64) + rng.uniform(-12, 12)
                image_dir = root / "cityscapes" / "leftImg8bit" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(to_uint8(canvas)).save(image_dir / f"{stem}_leftImg8bit.png")


# ---------------------------------------------------------------------------------------------
@contextmanager
def _locked(root: Path):
    """Several processes (tests, the demo) may ask for the same root at once: one generates."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(root: Path):
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def generate(root, seed: int = 0) -> Path:
    """Write every demo dataset under ``root``; returns ``root``. A no-op when already there."""
    root = Path(root)
    wanted = {"version": DEMO_VERSION, "seed": seed, "complete": True}
    if _read_marker(root) == wanted:
        return root
    if _read_marker(root) is None and root.is_dir() and any(p.name != ".lock" for p in root.iterdir()):
        # never overwrite (or mix with) someone's real datasets
        raise UserError(f"{root}: not empty and not written by the demo generator; "
                        "generate the demo data into a new or empty folder")
    with _locked(root):
        if _read_marker(root) == wanted:  # another process finished it while we waited
            return root
        atomic_write_json(root / MARKER, {**wanted, "complete": False})
        for d in DATASET_DIRS:  # ours (the marker says so): start afresh
            shutil.rmtree(root / d, ignore_errors=True)
        writers = [write_imagenet, lambda r, g: write_voc(r, 2007, g), lambda r, g: write_voc(r, 2012, g),
                   write_coco_and_lvis, write_cityscapes]
        for index, writer in enumerate(writers):  # one random stream per dataset
            writer(root, np.random.default_rng([seed, index]))
        atomic_write_json(root / MARKER, wanted)
    return root


def ensure(root=None) -> Path:
    """The demo datasets root (``DEFAULT_ROOT`` unless given), generated on first use."""
    return generate(DEFAULT_ROOT if root is None else root)


def images() -> Path:
    """The built-in demo ImageFolder (train/<class>/, val/<class>/): what pre-training, the supervised
    baseline and linear evaluation read without --data."""
    return ensure() / "imagenet"
