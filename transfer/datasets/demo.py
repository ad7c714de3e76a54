"""Built-in demo datasets, written in the REAL on-disk layouts of ImageNet, VOC, COCO, LVIS and Cityscapes.

Nothing can be downloaded on the machines this project is tested on, so ``generate(root)`` draws
small synthetic datasets that detectron2's own loaders and evaluators read exactly like the real
ones. Every class is a distinct (shape, colour) pair on a textured background, at varied positions
and scales, so a few hundred fine-tuning iterations give clearly non-zero AP / mIoU. "person"
objects are stick figures facing the camera with the 17 COCO keypoints at their joints.

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
import math
import os
import shutil
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

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
DEFAULT_ROOT = Path(
    os.environ.get("MOCO_TRANSFER_DEMO") or Path(__file__).resolve().parents[2] / "datasets" / "demo"
)

# How much of each dataset to draw: small enough for CPU tests, big enough to learn from.
SIZES = {
    "imagenet": {"image": 64, "train_per_class": 30, "val_per_class": 10},
    "VOC2007": {"image": (160, 120), "trainval": 80, "test": 40},
    "VOC2012": {"image": (160, 120), "trainval": 60, "seg_train": 40},
    "coco": {"image": (160, 128), "train2017": 64, "val2017": 24},
    "cityscapes": {"image": (256, 128), "train": {"aachen": 12, "bremen": 12}, "val": {"frankfurt": 8}},
}

# ---------------------------------------------------------------------------------------------
# What each class looks like: (shape, RGB colour, width / height).
COLOURS = {
    "white": (235, 235, 235), "black": (25, 25, 25), "red": (210, 30, 30), "green": (30, 170, 60),
    "blue": (40, 80, 220), "yellow": (235, 210, 30), "orange": (240, 130, 20),
    "purple": (140, 50, 180), "cyan": (40, 200, 220), "magenta": (230, 60, 170),
    "brown": (130, 80, 40),
}
VOC_LOOKS = {
    "aeroplane": ("cross", "white", 1.0), "bicycle": ("diamond", "cyan", 1.0),
    "bird": ("triangle", "yellow", 1.0), "boat": ("trapezoid", "brown", 1.6),
    "bottle": ("square", "green", 0.4), "bus": ("square", "orange", 2.0),
    "car": ("square", "red", 2.0), "cat": ("circle", "orange", 1.0),
    "chair": ("square", "brown", 1.0), "cow": ("hexagon", "black", 1.0),
    "diningtable": ("square", "brown", 2.0), "dog": ("circle", "brown", 1.0),
    "horse": ("arrow", "brown", 1.0), "motorbike": ("diamond", "purple", 1.0),
    "person": ("figure", "blue", 0.55), "pottedplant": ("star", "green", 1.0),
    "sheep": ("circle", "white", 1.0), "sofa": ("trapezoid", "magenta", 1.6),
    "train": ("square", "blue", 2.0), "tvmonitor": ("square", "black", 1.0),
}
# The COCO classes present in the demo (the json still lists all 80), and the LVIS v1 category
# each is labelled with in the LVIS files: frequent, common and rare ones, so APr/APc/APf exist.
COCO_LOOKS = {
    "person": ("figure", "blue", 0.55), "car": ("square", "red", 2.0),
    "kite": ("diamond", "cyan", 1.0), "clock": ("circle", "white", 1.0),
    "stop sign": ("octagon", "red", 1.0), "bottle": ("square", "green", 0.4),
    "tie": ("triangle", "purple", 1.0), "book": ("square", "yellow", 1.0),
}
COCO_TO_LVIS = {
    "person": "person", "car": "car_(automobile)", "kite": "kite", "clock": "clock",
    "stop sign": "stop_sign", "bottle": "bottle", "tie": "pennant", "book": "cube",
}
IMAGENET_LOOKS = {
    f"{colour}_{shape}": (shape, colour, aspect)
    for shape, colour, aspect in [
        ("circle", "red", 1.0), ("square", "green", 1.0), ("triangle", "blue", 1.0),
        ("diamond", "yellow", 1.0), ("hexagon", "magenta", 1.0), ("star", "orange", 1.0),
        ("cross", "cyan", 1.0), ("octagon", "purple", 1.0), ("square", "white", 0.4),
        ("arrow", "black", 1.0),
    ]
}
# Cityscapes: real label names (ids come from cityscapesscripts' label table).
CITYSCAPES_THINGS = {
    "person": ("figure", (220, 20, 60), 0.45), "rider": ("figure", (255, 200, 0), 0.45),
    "car": ("square", (0, 0, 142), 2.0), "bicycle": ("diamond", (0, 160, 160), 1.4),
}


def _regular(n, phase=0.0, radius=1.0):
    return [(radius * math.sin(phase + 2 * math.pi * k / n), -radius * math.cos(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points=5, inner=0.45):
    outer, inner_pts = _regular(points), _regular(points, math.pi / points, inner)
    return [p for pair in zip(outer, inner_pts) for p in pair]


# Outlines in a unit box [-1, 1]^2 (y down).
SHAPES = {
    "circle": _regular(32),
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "hexagon": _regular(6),
    "octagon": _regular(8, math.pi / 8),
    "star": _star(),
    "cross": [(-0.35, -1), (0.35, -1), (0.35, -0.35), (1, -0.35), (1, 0.35), (0.35, 0.35),
              (0.35, 1), (-0.35, 1), (-0.35, 0.35), (-1, 0.35), (-1, -0.35), (-0.35, -0.35)],
    "trapezoid": [(-0.55, -1), (0.55, -1), (1, 1), (-1, 1)],
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.9), (1, 0), (0.2, 0.9), (0.2, 0.3), (-1, 0.3)],
}

# COCO's 17 person keypoints, as fractions of the figure's height, relative to the top centre.
# The figure faces the camera, so the person's left side is on the image's right (+x).
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                 [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
_FIGURE_JOINTS = {
    "nose": (0.0, 0.10), "left_eye": (0.035, 0.08), "right_eye": (-0.035, 0.08),
    "left_ear": (0.075, 0.10), "right_ear": (-0.075, 0.10),
    "left_shoulder": (0.14, 0.25), "right_shoulder": (-0.14, 0.25),
    "left_elbow": (0.20, 0.41), "right_elbow": (-0.20, 0.41),
    "left_wrist": (0.23, 0.56), "right_wrist": (-0.23, 0.56),
    "left_hip": (0.08, 0.55), "right_hip": (-0.08, 0.55),
    "left_knee": (0.10, 0.75), "right_knee": (-0.10, 0.75),
    "left_ankle": (0.11, 0.96), "right_ankle": (-0.11, 0.96),
}
_LIMBS = [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
          ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
          ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
          ("right_hip", "right_knee"), ("right_knee", "right_ankle")]
_MOVABLE = {"left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_knee", "right_knee",
            "left_ankle", "right_ankle"}


# ---------------------------------------------------------------------------------------------
@dataclass
class DrawnObject:
    label: str
    mask: np.ndarray  # bool, H x W
    keypoints: list | None = None  # 17 x (x, y) pixel indices, for figures

    def box_xyxy(self):
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())

    def polygons(self, min_points=3):
        """Outer contours of the mask as [[x0, y0, x1, y1, ...], ...] (COCO / Cityscapes polygons)."""
        contours, _ = cv2.findContours(self.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return [c.reshape(-1).tolist() for c in contours if len(c) >= min_points]


def _background(rng, width, height):
    """A muted, low-saturation texture: base grey + tint, a smooth gradient, blotches and grain."""
    base = rng.uniform(85, 165) + rng.uniform(-18, 18, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None] * rng.uniform(-35, 35)
    blotches = rng.normal(0, 14, size=(6, 6, 3)).astype(np.float32)
    blotches = cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, size=(height, width, 3))
    return base + ramp + blotches + grain


def _paint(canvas, mask, colour, rng):
    """Fill ``mask`` with ``colour``, with a per-object brightness shift and some grain."""
    shift = rng.uniform(-18, 18)
    grain = rng.normal(0, 8, size=(int(mask.sum()), 3))
    canvas[mask] = np.asarray(colour, dtype=np.float64) + shift + grain


def _to_uint8(canvas):
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _polygon_mask(points, width, height):
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in points], fill=1)
    return np.asarray(img, dtype=bool)


def _draw_shape(shape, cx, cy, h, aspect, angle, width, height):
    w = h * aspect
    unit = np.asarray(SHAPES[shape], dtype=np.float64) * [w / 2, h / 2]
    c, s = math.cos(angle), math.sin(angle)
    points = unit @ np.array([[c, s], [-s, c]]) + [cx, cy]
    return _polygon_mask(points.tolist(), width, height)


def _draw_figure(cx, cy, h, rng, width, height):
    """A stick figure facing the camera; returns its mask and its 17 keypoints (pixel indices)."""
    top = cy - h / 2
    joints = {}
    for name, (dx, dy) in _FIGURE_JOINTS.items():
        jitter = rng.normal(0, 0.035, size=2) if name in _MOVABLE else (0.0, 0.0)
        joints[name] = (cx + (dx + jitter[0]) * h, top + (dy + jitter[1]) * h)
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    r = 0.085 * h
    hx, hy = joints["nose"]
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=1)
    neck = 0.03 * h
    draw.polygon([(hx - neck, hy), (hx + neck, hy), joints["left_shoulder"], joints["right_shoulder"]], fill=1)
    draw.polygon([joints["left_shoulder"], joints["right_shoulder"], joints["right_hip"], joints["left_hip"]], fill=1)
    limb = max(2, int(round(0.06 * h)))
    for a, b in _LIMBS:
        draw.line([joints[a], joints[b]], fill=1, width=limb)
        for p in (joints[a], joints[b]):  # round joints
            draw.ellipse([p[0] - limb / 2, p[1] - limb / 2, p[0] + limb / 2, p[1] + limb / 2], fill=1)
    keypoints = [(int(round(joints[n][0])), int(round(joints[n][1]))) for n in KEYPOINT_NAMES]
    keypoints = [(min(max(x, 0), width - 1), min(max(y, 0), height - 1)) for x, y in keypoints]
    return np.asarray(img, dtype=bool), keypoints


def render_scene(rng, width, height, labels, looks, size_range=(0.3, 0.6), region=None, canvas=None):
    """Place one object per label (no overlaps) on a background; returns (uint8 image, objects).

    ``region`` (x0, y0, x1, y1) restricts object centres; ``canvas`` replaces the plain background.
    """
    if canvas is None:
        canvas = _background(rng, width, height)
    x0, y0, x1, y1 = region or (0, 0, width, height)
    occupied = np.zeros((height, width), dtype=bool)
    objects = []
    for label in labels:
        shape, colour, aspect = looks[label]
        colour = COLOURS.get(colour, colour)
        for _ in range(40):  # rejection sampling: keep objects apart and inside the image
            # size_range is the object's longer side, as a fraction of the image's shorter side
            h = rng.uniform(*size_range) * min(width, height) / max(aspect, 1.0)
            angle = 0.0 if shape in ("circle", "figure") else rng.uniform(-0.35, 0.35)
            c, s = abs(math.cos(angle)), abs(math.sin(angle))
            half_w, half_h = 0.5 * (h * aspect * c + h * s), 0.5 * (h * aspect * s + h * c)
            if shape == "figure":  # limbs may swing a little outside the nominal box
                half_w += 0.05 * h
            lo_x, hi_x = max(x0, half_w + 1), min(x1, width - half_w - 1)
            lo_y, hi_y = max(y0, half_h + 1), min(y1, height - half_h - 1)
            if lo_x >= hi_x or lo_y >= hi_y:
                continue
            cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if shape == "figure":
                mask, keypoints = _draw_figure(cx, cy, h, rng, width, height)
            else:
                mask, keypoints = _draw_shape(shape, cx, cy, h, aspect, angle, width, height), None
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if mask.sum() < 30 or (grown & occupied).any():
                continue
            occupied |= grown
            _paint(canvas, mask, colour, rng)
            objects.append(DrawnObject(label, mask, keypoints))
            break
    return _to_uint8(canvas), objects


class _Cycle:
    """Hands out class names round-robin (shuffled per round) so every class appears in every split."""

    def __init__(self, names, rng):
        self.names, self.rng, self.queue = list(names), rng, []

    def take(self, n):
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = list(self.rng.permutation(self.names))
            out.append(self.queue.pop())
        return out


def _save_jpeg(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=92)


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
    cycle = _Cycle(names, rng)
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
    from transfer import d2compat  # noqa: F401
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [{"supercategory": "demo", "id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def write_coco_and_lvis(root: Path, rng) -> None:
    from transfer import d2compat  # noqa: F401
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    spec = SIZES["coco"]
    width, height = spec["image"]
    categories = coco_categories()
    coco_id = {c["name"]: c["id"] for c in categories}
    lvis_id = {c["name"]: c["id"] for c in LVIS_CATEGORIES}
    others = _Cycle([n for n in COCO_LOOKS if n != "person"], rng)
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
                x0, y0, x1, y1 = obj.box_xyxy()
                ann = {"id": len(anns) + first_id[split] * 10, "image_id": image_id,
                       "category_id": coco_id[obj.label], "segmentation": obj.polygons(),
                       "area": float(obj.mask.sum()), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                       "iscrowd": 0}
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


def _cityscapes_stuff(rng, width, height):
    """Background polygons in drawing order (later ones cover earlier ones), Cityscapes label names."""
    horizon = int(height * rng.uniform(0.4, 0.55))
    stuff = [("sky", [(0, 0), (width - 1, 0), (width - 1, horizon), (0, horizon)])]
    x = 0
    while x < width - 1:  # a skyline of buildings and trees
        w = int(rng.integers(width // 8, width // 3))
        top = int(rng.integers(height // 12, horizon - 4))
        label = "building" if rng.random() < 0.7 else "vegetation"
        stuff.append((label, [(x, top), (min(x + w, width - 1), top), (min(x + w, width - 1), horizon), (x, horizon)]))
        x += w
    stuff.append(("road", [(0, horizon), (width - 1, horizon), (width - 1, height - 1), (0, height - 1)]))
    walk = int(rng.integers(height // 16, height // 8))
    stuff.append(("sidewalk", [(0, horizon), (width - 1, horizon), (width - 1, horizon + walk), (0, horizon + walk)]))
    return horizon, stuff


def write_cityscapes(root: Path, rng) -> None:
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import id2label
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    spec = SIZES["cityscapes"]
    width, height = spec["image"]
    cycle = _Cycle(list(CITYSCAPES_THINGS), rng)
    for split in ("train", "val"):
        for city, count in spec[split].items():
            for frame in range(count):
                stem = f"{city}_{frame:06d}_000019"
                horizon, stuff = _cityscapes_stuff(rng, width, height)
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
                canvas = _background(rng, width, height) * 0.25
                ids = np.asarray(instance_ids, dtype=np.int64)
                for value in np.unique(ids):
                    label = id2label[int(value // 1000 if value >= 1000 else value)]
                    colour = CITYSCAPES_THINGS[label.name][1] if label.name in CITYSCAPES_THINGS else label.color
                    region = ids == value
                    canvas[region] += 0.75 * np.asarray(colour, dtype=np.float64) + rng.uniform(-12, 12)
                image_dir = root / "cityscapes" / "leftImg8bit" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_to_uint8(canvas)).save(image_dir / f"{stem}_leftImg8bit.png")


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
