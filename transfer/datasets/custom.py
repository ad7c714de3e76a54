"""A user's own detection dataset, described by a small YAML file and registered in detectron2.

Two on-disk formats are read: a COCO-format json plus its image folder, and a PASCAL VOC-format
folder (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main/<split>.txt``)::

    name: shapes                  # registered as shapes_train and shapes_test
    format: coco                  # coco | voc
    train: {json: train.json, images: images/}        # voc: {root: VOCdevkit/VOC2007, split: trainval}
    test:  {json: val.json,   images: images/}        # voc: {root: ..., split: test}
    split: {test: 0.2, seed: 0}   # instead of test: a seeded division of train's images
    classes: from_annotations     # or a list of names: [cat, dog]
    merge: {pet: [cat, dog]}      # classes trained and scored as one
    zero_based_boxes: false       # voc only: true when the XML boxes start at 0 (VOC's start at 1)
    image_size: 640               # shorter image side at test time; training scales in proportion
    model: FPN                    # C4 | FPN
    masks: false                  # instance masks (COCO polygons / RLE) on or off
    schedule: quick               # demo | quick | full, or {max_iter, steps, base_lr, ims_per_batch,
                                  #   warmup_iters, precise_bn_iters}

Relative paths are relative to the YAML file. Real folders are messy; each quirk is handled (with
one log line, in the run's notes) or rejected with one clear ``UserError`` line:
float VOC coordinates (read as floats); empty or missing ``<difficult/>`` / ``<truncated/>`` (0);
a missing ``ImageSets/Main/<split>.txt`` (a deterministic 80/20 split of the annotated images,
announced); COCO image / annotation / category ids starting at 0 and a ``_background_`` category
(the background is dropped, ids are remapped); json file names with sub-folders (``JPEGImages/x.jpg``,
resolved against the image folder or its parent); missing image sizes (read from the image); an
image on disk with another suffix than its annotation names (``x.tif`` named, ``x.tiff`` written).
Said as warnings: classes with no instances in train or test, train and test sharing images,
annotations left out by the class list, VOC boxes that look 0-based.

Every dataset is evaluated with detectron2's COCOEvaluator (AP, AP50, AP75), which rebuilds clean
ground truth from the loaded dicts, so quirky ids never reach pycocotools. VOC ``difficult``
objects become COCO ``iscrowd`` regions: ignored in evaluation as in VOC's protocol, and not
trained on.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

from transfer import fileio
from transfer.datasets.catalog import register_dataset
from transfer.errors import UserError, log_once

logger = logging.getLogger(__name__)

BACKGROUND_NAMES = {"_background_", "__background__", "background", "bg"}
SCHEDULE_NAMES = ("demo", "quick", "full")
# A schedule of its own: the YAML's keys -> the detectron2 config keys they set
SCHEDULE_KEYS = {"max_iter": "SOLVER.MAX_ITER", "steps": "SOLVER.STEPS", "base_lr": "SOLVER.BASE_LR",
                 "ims_per_batch": "SOLVER.IMS_PER_BATCH", "warmup_iters": "SOLVER.WARMUP_ITERS",
                 "precise_bn_iters": "TEST.PRECISE_BN.NUM_ITER"}
# An annotation naming x.tif may find x.tiff, X.TIF, x.png, ... on disk: tools re-encode and rename.
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = tuple(s for suffix in SUFFIXES for s in (suffix, suffix.upper()))
TEST_FRACTION = 0.2  # of a derived split
SPLIT_KEYS = {"coco": {"json", "images"}, "voc": {"root", "split"}}
DEFAULT_VOC_SPLITS = {"train": "trainval", "test": "test"}
TOP_KEYS = {"name", "format", "train", "test", "split", "classes", "merge", "zero_based_boxes", "image_size",
            "model", "masks", "schedule"}


@dataclass
class CustomDataset:
    """What a registered custom dataset gives the task layer."""

    name: str
    format: str  # "coco" | "voc"
    train_dataset: str  # detectron2 dataset names
    test_dataset: str
    class_names: tuple[str, ...]
    model: str  # "C4" | "FPN"
    masks: bool
    mask_format: str  # detectron2 INPUT.MASK_FORMAT: "polygon", or "bitmask" for RLE masks
    schedule: str | dict
    evaluator_type: str = "coco"
    yaml_path: str = ""
    image_size: int | None = None  # the YAML's shorter image side at test time, if it gives one
    notes: list[str] = field(default_factory=list)  # how quirks were handled, for the run record
    warnings: list[str] = field(default_factory=list)  # the notes a user should act on

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class _Notes(list):
    """How quirks were handled, in order; ``warn`` adds one a user should act on."""

    def __init__(self):
        super().__init__()
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.append(message)
        self.warnings.append(message)


def _log_once(notes: _Notes) -> None:
    # A suite and its runs read the dataset at several steps (plan, config, training): each line is said once.
    for note in dict.fromkeys(notes):
        log_once(logger, logging.WARNING if note in notes.warnings else logging.INFO, note)


# ----------------------------------------------------------------------------------------------
# The YAML
def _load_yaml(yaml_path: Path) -> dict:
    spec = fileio.read_yaml_mapping(yaml_path, f"a custom dataset: a mapping with keys {sorted(TOP_KEYS)}")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise UserError(f"{yaml_path}: unknown key(s) {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
    for key in ("name", "format", "train"):
        if key not in spec:
            raise UserError(f"{yaml_path}: missing key '{key}'")
    if "test" not in spec and "split" not in spec:
        raise UserError(f"{yaml_path}: missing key 'test' (or 'split' to divide the train images)")
    return spec


def _choice(yaml_path, key, value, choices):
    if value not in choices:
        raise UserError(f"{yaml_path}: {key}: {value!r} is not one of {list(choices)}")
    return value


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _schedule(yaml_path, value):
    if isinstance(value, str):
        return _choice(yaml_path, "schedule", value, SCHEDULE_NAMES)
    if not (isinstance(value, dict) and set(value) <= SCHEDULE_KEYS.keys() and "max_iter" in value):
        raise UserError(f"{yaml_path}: schedule: expected one of {list(SCHEDULE_NAMES)} or a mapping with "
                        f"max_iter and optionally {sorted(SCHEDULE_KEYS.keys() - {'max_iter'})}")
    for key, least in (("max_iter", 1), ("ims_per_batch", 1), ("warmup_iters", 0), ("precise_bn_iters", 0)):
        if key in value and not _whole(value[key], least):
            raise UserError(f"{yaml_path}: schedule: {key}: expected a whole number >= {least}, got {value[key]!r}")
    max_iter, steps = value["max_iter"], value.get("steps", [])
    if not (isinstance(steps, list) and all(_whole(s, 1) and s < max_iter for s in steps) and steps == sorted(steps)):
        raise UserError(f"{yaml_path}: schedule: steps: expected increasing iterations below max_iter "
                        f"{max_iter}, got {steps!r}")
    if value.get("warmup_iters", 0) >= max_iter:  # the LR would never reach base_lr
        raise UserError(f"{yaml_path}: schedule: warmup_iters {value['warmup_iters']} must be below "
                        f"max_iter {max_iter}")
    lr = value.get("base_lr", 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"{yaml_path}: schedule: base_lr: expected a positive number, got {lr!r}")
    return dict(value)


def _split_rule(yaml_path, value) -> tuple[float, int] | None:
    """``split: {test: 0.2, seed: 0}`` -> (test fraction, seed); None without the key."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"test", "seed"}:
        raise UserError(f"{yaml_path}: split: expected a mapping like {{test: 0.2, seed: 0}}")
    fraction, seed = value.get("test", TEST_FRACTION), value.get("seed", 0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UserError(f"{yaml_path}: split: test: expected the test fraction, between 0 and 1, got {fraction!r}")
    if not _whole(seed, 0):
        raise UserError(f"{yaml_path}: split: seed: expected a whole number >= 0, got {seed!r}")
    return float(fraction), seed


def _merge_map(yaml_path, value) -> dict[str, str]:
    """``merge: {Tree: [Alive, Dead]}`` -> {"Alive": "Tree", "Dead": "Tree"}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{yaml_path}: merge: expected a mapping of a class name to the names merged "
                        "into it, e.g. {Tree: [Alive, Dead]}")
    renamed = {}
    for target, sources in value.items():
        sources = [sources] if isinstance(sources, str) else sources
        if not isinstance(target, str) or not isinstance(sources, list) or not sources \
                or not all(isinstance(s, str) for s in sources):
            raise UserError(f"{yaml_path}: merge: {target!r}: expected a list of class names, "
                            "e.g. {Tree: [Alive, Dead]}")
        for source in sources:
            if renamed.get(source, target) != target:
                raise UserError(f"{yaml_path}: merge: '{source}' is merged into both '{renamed[source]}' "
                                f"and '{target}'")
            renamed[source] = target
    return renamed


def _flag(yaml_path, key, value, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{yaml_path}: {key}: expected true or false, got {value!r}")
    return value


def _split_spec(yaml_path: Path, fmt: str, role: str, value) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{yaml_path}: {role}: expected a mapping with keys {sorted(SPLIT_KEYS[fmt])}")
    unknown = set(value) - SPLIT_KEYS[fmt]
    if unknown:
        raise UserError(f"{yaml_path}: {role}: unknown key(s) {sorted(unknown)} for format {fmt}; "
                        f"expected {sorted(SPLIT_KEYS[fmt])}")
    spec = dict(value)
    if fmt == "voc":
        spec.setdefault("split", DEFAULT_VOC_SPLITS[role])
    for key in SPLIT_KEYS[fmt] - {"split"}:
        if key not in spec:
            raise UserError(f"{yaml_path}: {role}: missing key '{key}'")
        spec[key] = (yaml_path.parent / str(spec[key])).resolve()
        if not spec[key].exists():
            raise UserError(f"{spec[key]}: missing ({role}.{key} in {yaml_path})")
    return spec


def _sources(yaml_path: Path, fmt: str, spec: dict, rule) -> dict[str, dict]:
    """The train and test sources; with ``split:`` and no ``test:``, test reads train's."""
    train, test = spec["train"], spec.get("test")
    if test is None:  # the VOC split names stay the defaults: trainval / test
        test = {k: v for k, v in train.items() if k != "split"} if isinstance(train, dict) else train
    sources = {"train": _split_spec(yaml_path, fmt, "train", train), "test": _split_spec(yaml_path, fmt, "test", test)}
    shared = ("json", "images") if fmt == "coco" else ("root",)
    if rule is not None and any(sources["train"][k] != sources["test"][k] for k in shared):
        raise UserError(f"{yaml_path}: split: divides train's images into train and test, but test: names "
                        "other images; leave test: out")
    return sources


def _hashed_test(keys: list[str], fraction: float, seed: int) -> set[str]:
    """The test part of a derived split: keys ordered by a hash, the last ``fraction`` (at least one)."""
    salt = f"{seed}:" if seed else ""  # seed 0 hashes the key alone: the split earlier versions derived
    ranked = sorted(keys, key=lambda k: hashlib.sha1(f"{salt}{k}".encode()).hexdigest())
    n_test = max(1, math.ceil(fraction * len(ranked))) if len(ranked) > 1 else 0
    return set(ranked[len(ranked) - n_test:])


def _find_image(path: Path) -> Path | None:
    """``path``, or the file of its stem with another image suffix; None when neither is there."""
    if path.is_file():
        return path
    return next((p for p in (path.with_suffix(s) for s in IMAGE_SUFFIXES) if p.is_file()), None)


def _suffix_list() -> str:
    return f"{', '.join(SUFFIXES)} in either case"


# ----------------------------------------------------------------------------------------------
# COCO format
def _resolve_image_root(json_file: Path, image_root: Path, file_name: str, notes: list) -> Path:
    """Find the folder that ``file_name`` (possibly 'JPEGImages/x.jpg') is relative to."""
    if _find_image(image_root / file_name):
        return image_root
    if _find_image(image_root.parent / file_name):  # images: .../JPEGImages with 'JPEGImages/x.jpg' names
        notes.append(f"{json_file}: file names such as '{file_name}' include the image folder; "
                     f"read them from {image_root.parent}")
        return image_root.parent
    tried = [image_root / file_name, image_root.parent / file_name]
    if Path(file_name).parts[:1] == (image_root.name,):  # the likelier of the two first
        tried.reverse()
    raise UserError(f"{tried[0]}: missing (file_name '{file_name}' in {json_file}; also tried {tried[1]}, "
                    f"and both with {_suffix_list()})")


def _coco_categories(json_file: Path, notes: list) -> tuple[dict[int, str], str]:
    """The json's categories (id -> name, background dropped) and its first image's file name."""
    try:
        data = json.loads(json_file.read_text())
    except ValueError as e:
        raise UserError(f"{json_file}: not valid JSON ({e}); expected a COCO instances json") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise UserError(f"{json_file}: no '{key}' list; "
                            "expected a COCO instances json (images, annotations, categories)")
    if not all(isinstance(c, dict) and {"id", "name"} <= set(c) for c in data["categories"]):
        raise UserError(f"{json_file}: every entry of 'categories' needs an 'id' and a 'name'")
    if not data["images"]:
        raise UserError(f"{json_file}: lists no images")
    if not all(isinstance(im, dict) and {"id", "file_name", "height", "width"} <= set(im) for im in data["images"]):
        raise UserError(f"{json_file}: every entry of 'images' needs 'id', 'file_name', 'height' and 'width'")
    categories = {}
    for cat in data["categories"]:
        if cat["name"] in BACKGROUND_NAMES:
            notes.append(f"{json_file}: dropped the background category '{cat['name']}' (id {cat['id']})")
            continue
        if cat["name"] in categories.values():
            raise UserError(f"{json_file}: category name '{cat['name']}' is used by two category ids")
        categories[cat["id"]] = cat["name"]
    return categories, str(data["images"][0]["file_name"])


def _load_coco(spec: dict, notes: list) -> tuple[list[dict], list[str], Path]:
    """Dataset dicts with class NAMES in 'category_id', the json's class names, the image folder."""
    json_file, image_root = spec["json"], spec["images"]
    categories, first_file = _coco_categories(json_file, notes)
    image_root = _resolve_image_root(json_file, image_root, first_file, notes)
    try:
        dicts = load_coco_json(str(json_file), str(image_root))  # raw category ids
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(f"{json_file}: not a valid COCO instances json ({type(e).__name__}: {e})") from e
    other_suffix = []
    for record in dicts:
        written = Path(record["file_name"])
        found = _find_image(written)  # now, not hours into training
        if found is None:
            raise UserError(f"{written}: missing (an image of {json_file}); not there with {_suffix_list()} either")
        if found != written:
            other_suffix.append(f"{written.name} -> {found.name}")
        record["file_name"] = str(found)
        for ann in record["annotations"]:
            ann.pop("keypoints", None)  # keypoint tasks are not custom tasks
            ann["category_id"] = categories.get(ann["category_id"], f"<category id {ann['category_id']}>")
    if other_suffix:
        notes.append(f"{json_file}: {len(other_suffix)} image(s) are on disk with another suffix, "
                     f"e.g. {other_suffix[0]}")
    return dicts, [n for _, n in sorted(categories.items())], image_root


def _coco_dicts(sources: dict, rule, notes: _Notes) -> tuple[dict[str, list], list[str]]:
    """Each role's dicts (names as categories) and the json's class names, in category id order."""
    train, declared, image_root = _load_coco(sources["train"], notes)
    if rule is not None:
        return _divide(train, image_root, rule, sources["train"]["json"], notes), declared
    test, test_declared, _ = _load_coco(sources["test"], notes)
    return {"train": train, "test": test}, list(dict.fromkeys(declared + test_declared))


def _divide(dicts: list[dict], image_root: Path, rule, json_file: Path, notes: list) -> dict[str, list]:
    """``split:`` for one json: a seeded hash of each image's file name decides its side."""
    fraction, seed = rule
    key = {r["file_name"]: os.path.relpath(r["file_name"], image_root) for r in dicts}
    test = _hashed_test(list(key.values()), fraction, seed)
    if not test:
        raise UserError(f"{json_file}: split: one image cannot be divided into train and test")
    parts = {"train": [r for r in dicts if key[r["file_name"]] not in test],
             "test": [r for r in dicts if key[r["file_name"]] in test]}
    notes.append(f"{json_file}: divided by split: into {len(parts['train'])} train and {len(parts['test'])} test "
                 f"images ({fraction:.0%} test, by a hash of the file names with seed {seed})")
    return parts


# ----------------------------------------------------------------------------------------------
# VOC format
def _text(node, tag, default=None):
    found = node.find(tag)
    return found.text.strip() if found is not None and found.text and found.text.strip() else default


def _voc_ids(root: Path, split: str, role: str, shared: str | None, rule, notes: _Notes) -> list[str]:
    """Image ids of ``split``; when its list file is missing, derive them and say so.

    ``shared`` is the other role's split name when train and test share this folder (so the two
    must not overlap); None when the other role has a folder of its own (then: all images).
    ``rule``: the YAML's ``split:`` (test fraction, seed), which a derived split follows.
    """
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    other_file = root / "ImageSets" / "Main" / f"{shared}.txt" if shared else None
    if rule is not None and (split_file.is_file() or (other_file and other_file.is_file())):
        notes.warn(f"{root / 'ImageSets' / 'Main'}: has split files, so the YAML's split: is not used")
    if split_file.is_file():
        ids = split_file.read_text().split()
        if not ids:
            raise UserError(f"{split_file}: lists no images")
        return ids
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise UserError(f"{annotations}: missing; "
                        "expected a VOC folder with Annotations/, JPEGImages/ and optionally ImageSets/Main/")
    all_ids = sorted(p.stem for p in annotations.glob("*.xml"))
    if not all_ids:
        raise UserError(f"{annotations}: holds no .xml files")
    if shared is None:
        ids, how = all_ids, "all annotated images (the other split has a folder of its own)"
    elif other_file.is_file():  # the complement of the split that exists
        taken = set(other_file.read_text().split())
        ids = [i for i in all_ids if i not in taken]
        how = f"all annotated images not in {other_file.name}"
    else:
        fraction, seed = rule or (TEST_FRACTION, 0)
        test = _hashed_test(all_ids, fraction, seed)
        ids = [i for i in all_ids if (i in test) == (role == "test")]
        how = f"a deterministic {100 - round(100 * fraction)}/{round(100 * fraction)} split by id hash"
        how += f" (seed {seed})" if seed else ""
    if not ids:
        raise UserError(f"{split_file}: missing, and no images are left for the {role} split; add the split file")
    say = notes.append if rule else notes.warn  # a split the YAML asked for is no surprise
    say(f"{split_file}: missing; derived the {role} split ({len(ids)} image(s)) as {how}")
    return ids


def _voc_image(root: Path, image_id: str, xml_name: str | None, xml_file: Path) -> Path:
    folder = root / "JPEGImages"
    # tools write a bare name, a relative path or the labeller's own absolute (Windows) path
    named = folder / xml_name.replace("\\", "/").split("/")[-1] if xml_name else None
    found = (_find_image(named) if named else None) or _find_image(folder / f"{image_id}.jpg")
    if found is None:
        also = f"{named.stem}.* and {image_id}.*" if named and named.stem != image_id else f"{image_id}.*"
        raise UserError(f"{named or folder / (image_id + '.jpg')}: missing (the image of {xml_file}); also tried "
                        f"{also} with {_suffix_list()} in {folder}")
    return found


def _voc_box(obj, xml_file: Path, zero_based: bool) -> tuple[str, list[float]]:
    name = _text(obj, "name")
    box = obj.find("bndbox")
    if name is None or box is None:
        raise UserError(f"{xml_file}: an <object> without <name> or <bndbox>")
    try:
        x0, y0, x1, y1 = (float(_text(box, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError) as e:
        raise UserError(f"{xml_file}: <bndbox> of '{name}' needs numeric xmin, ymin, xmax, ymax") from e
    if not zero_based:  # VOC's own convention: 1-based inclusive pixel indices (detectron2's reading)
        x0, y0 = x0 - 1.0, y0 - 1.0
    return name, [x0, y0, x1, y1]


def _load_voc(spec: dict, role: str, shared: str | None, rule, zero_based: bool, notes: _Notes) -> list[dict]:
    """Dataset dicts with class NAMES in 'category_id' (mapped to indices once classes are known)."""
    root = spec["root"]
    ids = _voc_ids(root, spec["split"], role, shared, rule, notes)
    dicts, degenerate, below_one = [], 0, 0
    for index, image_id in enumerate(ids):
        xml_file = root / "Annotations" / f"{image_id}.xml"
        if not xml_file.is_file():
            raise UserError(f"{xml_file}: missing (listed in ImageSets/Main/{spec['split']}.txt)")
        try:
            tree = ET.parse(xml_file)
        except ET.ParseError as e:
            raise UserError(f"{xml_file}: not valid XML ({e})") from e
        image = _voc_image(root, image_id, _text(tree, "filename"), xml_file)
        width, height = int(float(_text(tree, "size/width", 0))), int(float(_text(tree, "size/height", 0)))
        if width <= 0 or height <= 0:  # some tools write 0 or leave <size> out
            with Image.open(image) as im:
                width, height = im.size
        annotations = []
        for obj in tree.findall("object"):
            name, (x0, y0, x1, y1) = _voc_box(obj, xml_file, zero_based)
            below_one += not zero_based and min(x0, y0) < 0
            if x1 <= x0 or y1 <= y0:
                degenerate += 1
                continue
            difficult = int(float(_text(obj, "difficult", 0)))
            annotations.append({"category_id": name, "bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS,
                                "iscrowd": difficult})
        dicts.append({"file_name": str(image), "image_id": index + 1, "height": height, "width": width,
                      "annotations": annotations})
    if degenerate:
        notes.append(f"{root / 'Annotations'}: skipped {degenerate} empty boxes (xmax <= xmin or ymax <= ymin)")
    if below_one:  # a hint only: which convention a file follows is the YAML's to say
        notes.warn(f"{root / 'Annotations'}: {below_one} box(es) start below 1, where VOC's 1-based coordinates "
                   "start; if your tool writes 0-based boxes, set zero_based_boxes: true")
    return dicts


def _voc_dicts(sources: dict, rule, zero_based: bool, notes: _Notes) -> tuple[dict[str, list], list[str]]:
    dicts = {}
    for role, other in (("train", "test"), ("test", "train")):
        same_root = sources[other]["root"] == sources[role]["root"]
        shared = sources[other]["split"] if same_root else None
        dicts[role] = _load_voc(sources[role], role, shared, rule, zero_based, notes)
    return dicts, sorted({a["category_id"] for d in dicts.values() for r in d for a in r["annotations"]})


# ----------------------------------------------------------------------------------------------
# Classes
def _annotations(dicts: dict[str, list]):
    return (a for d in dicts.values() for r in d for a in r["annotations"])


def _merge(yaml_path, renamed: dict, dicts: dict, declared: list[str], notes: list) -> list[str]:
    """Rename merged classes in the annotations; return the declared names, merged."""
    found = {a["category_id"] for a in _annotations(dicts)}
    unknown = [s for s in renamed if s not in found]
    if unknown:
        raise UserError(f"{yaml_path}: merge: {unknown} do not occur in the annotations "
                        f"(found {[n for n in declared if n in found]})")
    for ann in _annotations(dicts):
        ann["category_id"] = renamed.get(ann["category_id"], ann["category_id"])
    if renamed:
        notes.append(f"{yaml_path}: merged classes: {', '.join(f'{s} -> {t}' for s, t in renamed.items())}")
    return list(dict.fromkeys(renamed.get(n, n) for n in declared))


def _class_names(yaml_path, value, declared: list[str], found: set[str]) -> tuple[str, ...]:
    if value in (None, "from_annotations"):
        if not declared:
            raise UserError(f"{yaml_path}: classes: from_annotations, but the annotations name no classes")
        return tuple(declared)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UserError(f"{yaml_path}: classes: expected 'from_annotations' or a non-empty list of names")
    if len(set(value)) != len(value):
        raise UserError(f"{yaml_path}: classes: lists a name twice")
    missing = [v for v in value if v not in found]
    if missing:
        raise UserError(f"{yaml_path}: classes: {missing} do not occur in the annotations "
                        f"(found {[n for n in declared if n in found]})")
    return tuple(value)


def _to_indices(records, class_index) -> Counter:
    """Map each annotation's class name to its index in the class list; drop the others (counted)."""
    dropped = Counter()
    for record in records:
        kept = []
        for ann in record["annotations"]:
            if ann["category_id"] in class_index:
                kept.append({**ann, "category_id": class_index[ann["category_id"]]})
            else:
                dropped[ann["category_id"]] += 1
        record["annotations"] = kept
    return dropped


def _report_classes(yaml_path, dicts: dict, class_names: tuple[str, ...], notes: _Notes) -> None:
    counts = {role: Counter(class_names[a["category_id"]] for r in records for a in r["annotations"]
                            if not a.get("iscrowd", 0)) for role, records in dicts.items()}
    notes.append(f"{yaml_path}: instances per class (train/test): "
                 + ", ".join(f"{c} {counts['train'][c]}/{counts['test'][c]}" for c in class_names))
    for role, consequence in (("train", "the model never learns them"), ("test", "they get no AP")):
        empty = [c for c in class_names if not counts[role][c]]
        if empty:
            notes.warn(f"{yaml_path}: no instances of {empty} in the {role} split ({consequence})")


def _check_overlap(yaml_path, dicts: dict, notes: _Notes) -> None:
    train, test = ({r["file_name"] for r in dicts[role]} for role in ("train", "test"))
    if train == test:
        notes.warn(f"{yaml_path}: train and test are the same {len(test)} images, so AP measures memory, "
                   "not transfer; give test other images, or divide them with split: {test: 0.2}")
    elif train & test:
        notes.warn(f"{yaml_path}: {len(train & test)} of the {len(test)} test images are train images too")


# ----------------------------------------------------------------------------------------------
def _masks(yaml_path, masks: bool, dicts: dict) -> str:
    """detectron2's INPUT.MASK_FORMAT for the annotations; drops the masks when they are off."""
    if not masks:
        for ann in _annotations(dicts):
            ann.pop("segmentation", None)
        return "polygon"
    segms = [a.get("segmentation") for a in _annotations(dicts)]
    if not any(segms):
        raise UserError(f"{yaml_path}: masks: true, but the annotations carry no 'segmentation'")
    return "bitmask" if any(isinstance(s, dict) for s in segms) else "polygon"


def _register(dataset: CustomDataset, dicts: dict) -> None:
    for role, dataset_name in (("train", dataset.train_dataset), ("test", dataset.test_dataset)):
        # No json_file: COCOEvaluator rebuilds ground truth from these dicts (ids 1..K, clean ids).
        register_dataset(
            dataset_name, lambda d=dicts[role]: copy.deepcopy(d),
            thing_classes=list(dataset.class_names), evaluator_type="coco",
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(dataset.num_classes)},
            custom_yaml=dataset.yaml_path,
        )


def read_custom(yaml_path) -> CustomDataset:
    """Validate the YAML and the data it points to; nothing is registered."""
    return _read(yaml_path)[0]


def register_custom(yaml_path) -> CustomDataset:
    """Validate the YAML and the data it points to, register ``<name>_train`` / ``<name>_test``."""
    dataset, dicts = _read(yaml_path)
    _register(dataset, dicts)
    return dataset


def _read(yaml_path) -> tuple[CustomDataset, dict]:
    """The dataset and its detectron2 dicts per role (train, test)."""
    yaml_path = Path(yaml_path).resolve()
    spec = _load_yaml(yaml_path)
    name = str(spec["name"])
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"{yaml_path}: name: {name!r} should be letters, digits, '_' or '-'")
    fmt = _choice(yaml_path, "format", spec["format"], ("coco", "voc"))
    model = _choice(yaml_path, "model", spec.get("model", "FPN"), ("C4", "FPN"))
    masks = _flag(yaml_path, "masks", spec.get("masks"), False)
    if masks and fmt == "voc":
        raise UserError(f"{yaml_path}: masks: true needs instance masks, but VOC-format folders hold boxes only")
    zero_based = _flag(yaml_path, "zero_based_boxes", spec.get("zero_based_boxes"), False)
    if "zero_based_boxes" in spec and fmt != "voc":
        raise UserError(f"{yaml_path}: zero_based_boxes: only for format voc (COCO boxes start at 0 by definition)")
    image_size = spec.get("image_size")
    if image_size is not None and not _whole(image_size, 32):
        raise UserError(f"{yaml_path}: image_size: expected the shorter image side in pixels (>= 32), "
                        f"got {image_size!r}")
    schedule = _schedule(yaml_path, spec.get("schedule", "full"))
    rule = _split_rule(yaml_path, spec.get("split"))
    renamed = _merge_map(yaml_path, spec.get("merge"))
    sources = _sources(yaml_path, fmt, spec, rule)
    notes = _Notes()

    if fmt == "coco":
        dicts, declared = _coco_dicts(sources, rule, notes)
    else:
        dicts, declared = _voc_dicts(sources, rule, zero_based, notes)
    _check_overlap(yaml_path, dicts, notes)
    declared = _merge(yaml_path, renamed, dicts, declared, notes)
    if fmt == "voc":  # XML names have no order of their own: sorted, merged names too
        declared.sort()
    found = {a["category_id"] for a in _annotations(dicts)}
    class_names = _class_names(yaml_path, spec.get("classes"), declared, found)
    index = {n: i for i, n in enumerate(class_names)}
    dropped: dict = {}  # per annotation source: train and test often share one
    for role, source in sources.items():
        where = source["json"] if fmt == "coco" else source["root"] / "Annotations"
        dropped.setdefault(where, Counter()).update(_to_indices(dicts[role], index))
    for where, counts in dropped.items():
        if counts:
            notes.warn(f"{where}: left out annotations of classes not in the class list: {dict(counts)}; their "
                       "objects stay in the images as background (merge: trains them as another class)")
    mask_format = _masks(yaml_path, masks, dicts)
    if not any(r["annotations"] for r in dicts["train"]):
        raise UserError(f"{yaml_path}: the train split has no annotations of the classes {list(class_names)}")
    _report_classes(yaml_path, dicts, class_names, notes)

    dataset = CustomDataset(
        name=name, format=fmt, train_dataset=f"{name}_train", test_dataset=f"{name}_test",
        class_names=class_names, model=model, masks=masks, mask_format=mask_format, schedule=schedule,
        yaml_path=str(yaml_path), image_size=image_size,
        notes=list(dict.fromkeys(notes)),  # train and test often share a file: say it once
        warnings=list(dict.fromkeys(notes.warnings)),
    )
    _log_once(notes)
    return dataset, dicts
