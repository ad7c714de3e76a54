"""A user's own detection dataset, described by a small YAML file and registered in detectron2.

Two on-disk formats are read: a COCO-format json plus its image folder, and a PASCAL VOC-format
folder (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main/<split>.txt``)::

    name: shapes                  # registered as shapes_train and shapes_test
    format: coco                  # coco | voc
    train: {json: train.json, images: images/}        # voc: {root: VOCdevkit/VOC2007, split: trainval}
    test:  {json: val.json,   images: images/}        # voc: {root: ..., split: test}
    classes: from_annotations     # or a list of names: [cat, dog]
    model: FPN                    # C4 | FPN
    masks: false                  # instance masks (COCO polygons / RLE) on or off
    schedule: quick               # demo | quick | full, or {max_iter, steps, base_lr, ims_per_batch}

Relative paths are relative to the YAML file. Real folders are messy; each quirk is handled (with
one log line) or rejected with one clear ``UserError`` line:
float VOC coordinates (read as floats); empty or missing ``<difficult/>`` / ``<truncated/>`` (0);
a missing ``ImageSets/Main/<split>.txt`` (a deterministic 80/20 split of the annotated images,
announced); COCO image / annotation / category ids starting at 0 and a ``_background_`` category
(the background is dropped, ids are remapped); json file names with sub-folders (``JPEGImages/x.jpg``,
resolved against the image folder or its parent); missing image sizes (read from the image).

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
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from transfer import d2compat  # noqa: F401  (must precede detectron2 imports)

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from transfer import fileio
from transfer.errors import UserError

logger = logging.getLogger(__name__)

BACKGROUND_NAMES = {"_background_", "__background__", "background", "bg"}
SCHEDULE_NAMES = ("demo", "quick", "full")
SCHEDULE_KEYS = {"max_iter", "steps", "base_lr", "ims_per_batch"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")
TEST_FRACTION = 0.2  # of a derived VOC split
SPLIT_KEYS = {"coco": {"json", "images"}, "voc": {"root", "split"}}
DEFAULT_VOC_SPLITS = {"train": "trainval", "test": "test"}
TOP_KEYS = {"name", "format", "train", "test", "classes", "model", "masks", "schedule"}


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
    notes: list[str] = field(default_factory=list)  # how quirks were handled, for the run record

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------
def _load_yaml(yaml_path: Path) -> dict:
    spec = fileio.read_yaml_mapping(yaml_path, f"a custom dataset: a mapping with keys {sorted(TOP_KEYS)}")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise UserError(f"{yaml_path}: unknown key(s) {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
    for key in ("name", "format", "train", "test"):
        if key not in spec:
            raise UserError(f"{yaml_path}: missing key '{key}'")
    return spec


def _choice(yaml_path, key, value, choices):
    if value not in choices:
        raise UserError(f"{yaml_path}: {key}: {value!r} is not one of {list(choices)}")
    return value


def _schedule(yaml_path, value):
    if isinstance(value, str):
        return _choice(yaml_path, "schedule", value, SCHEDULE_NAMES)
    if isinstance(value, dict) and set(value) <= SCHEDULE_KEYS and "max_iter" in value:
        return dict(value)
    raise UserError(f"{yaml_path}: schedule: expected one of {list(SCHEDULE_NAMES)} or a mapping with "
                    f"max_iter and optionally {sorted(SCHEDULE_KEYS - {'max_iter'})}")


def _split_spec(yaml_path: Path, fmt: str, role: str, value) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{yaml_path}: {role}: expected a mapping with keys {sorted(SPLIT_KEYS[fmt])}")
    unknown = set(value) - SPLIT_KEYS[fmt]
    if unknown:
        raise UserError(f"{yaml_path}: {role}: unknown key(s) {sorted(unknown)} for format {fmt}; expected {sorted(SPLIT_KEYS[fmt])}")
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


# ----------------------------------------------------------------------------------------------
# COCO format
def _resolve_image_root(json_file: Path, image_root: Path, file_name: str, notes: list) -> Path:
    """Find the folder that ``file_name`` (possibly 'JPEGImages/x.jpg') is relative to."""
    if (image_root / file_name).is_file():
        return image_root
    if (image_root.parent / file_name).is_file():  # images: .../JPEGImages with 'JPEGImages/x.jpg' names
        notes.append(f"{json_file}: file names such as '{file_name}' include the image folder; read them from {image_root.parent}")
        return image_root.parent
    raise UserError(f"{image_root / file_name}: missing (file_name '{file_name}' in {json_file} is read relative to the images folder)")


def _coco_categories(json_file: Path, notes: list) -> tuple[dict[int, str], str]:
    """The json's categories (id -> name, background dropped) and its first image's file name."""
    try:
        data = json.loads(json_file.read_text())
    except ValueError as e:
        raise UserError(f"{json_file}: not valid JSON ({e}); expected a COCO instances json") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise UserError(f"{json_file}: no '{key}' list; expected a COCO instances json (images, annotations, categories)")
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


def _load_coco(spec: dict, notes: list) -> tuple[list[dict], dict[int, str]]:
    json_file, image_root = spec["json"], spec["images"]
    categories, first_file = _coco_categories(json_file, notes)
    image_root = _resolve_image_root(json_file, image_root, first_file, notes)
    try:
        dicts = load_coco_json(str(json_file), str(image_root))  # raw category ids
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(f"{json_file}: not a valid COCO instances json ({type(e).__name__}: {e})") from e
    for record in dicts:
        if not Path(record["file_name"]).is_file():  # now, not hours into training
            raise UserError(f"{record['file_name']}: missing (an image of {json_file})")
        for ann in record["annotations"]:
            ann.pop("keypoints", None)  # keypoint tasks are not custom tasks
    return dicts, categories


# ----------------------------------------------------------------------------------------------
# VOC format
def _text(node, tag, default=None):
    found = node.find(tag)
    return found.text.strip() if found is not None and found.text and found.text.strip() else default


def _voc_ids(root: Path, split: str, role: str, shared: str | None, notes: list) -> list[str]:
    """Image ids of ``split``; when its list file is missing, derive them and say so.

    ``shared`` is the other role's split name when train and test share this folder (so the two
    must not overlap); None when the other role has a folder of its own (then: all images).
    """
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if split_file.is_file():
        ids = split_file.read_text().split()
        if not ids:
            raise UserError(f"{split_file}: lists no images")
        return ids
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise UserError(f"{annotations}: missing; expected a VOC folder with Annotations/, JPEGImages/ and optionally ImageSets/Main/")
    all_ids = sorted(p.stem for p in annotations.glob("*.xml"))
    if not all_ids:
        raise UserError(f"{annotations}: holds no .xml files")
    other_file = root / "ImageSets" / "Main" / f"{shared}.txt" if shared else None
    if shared is None:
        ids, how = all_ids, "all annotated images (the other split has a folder of its own)"
    elif other_file.is_file():  # the complement of the split that exists
        taken = set(other_file.read_text().split())
        ids = [i for i in all_ids if i not in taken]
        how = f"all annotated images not in {other_file.name}"
    else:  # a stable split: order by a hash of the id, the last 20% are the test images
        ranked = sorted(all_ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
        n_test = max(1, math.ceil(TEST_FRACTION * len(ranked))) if len(ranked) > 1 else 0
        test = set(ranked[len(ranked) - n_test:])
        ids = [i for i in all_ids if (i in test) == (role == "test")]
        how = f"a deterministic {100 - int(100 * TEST_FRACTION)}/{int(100 * TEST_FRACTION)} split by id hash"
    if not ids:
        raise UserError(f"{split_file}: missing, and no images are left for the {role} split; add the split file")
    message = f"{split_file}: missing; derived the {role} split ({len(ids)} image(s)) as {how}"
    logger.warning(message)
    notes.append(message)
    return ids


def _voc_image(root: Path, image_id: str, xml_name: str | None) -> Path:
    candidates = ([root / "JPEGImages" / xml_name] if xml_name else []) + [
        root / "JPEGImages" / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"{root / 'JPEGImages' / (image_id + '.jpg')}: missing (image of Annotations/{image_id}.xml)")


def _load_voc(spec: dict, role: str, shared: str | None, notes: list) -> list[dict]:
    """Dataset dicts with class NAMES in 'category_id' (mapped to indices once classes are known)."""
    root = spec["root"]
    ids = _voc_ids(root, spec["split"], role, shared, notes)
    dicts, degenerate = [], 0
    for index, image_id in enumerate(ids):
        xml_file = root / "Annotations" / f"{image_id}.xml"
        if not xml_file.is_file():
            raise UserError(f"{xml_file}: missing (listed in ImageSets/Main/{spec['split']}.txt)")
        try:
            tree = ET.parse(xml_file)
        except ET.ParseError as e:
            raise UserError(f"{xml_file}: not valid XML ({e})") from e
        image = _voc_image(root, image_id, _text(tree, "filename"))
        width, height = int(float(_text(tree, "size/width", 0))), int(float(_text(tree, "size/height", 0)))
        if width <= 0 or height <= 0:  # some tools write 0 or leave <size> out
            with Image.open(image) as im:
                width, height = im.size
        annotations = []
        for obj in tree.findall("object"):
            name = _text(obj, "name")
            box = obj.find("bndbox")
            if name is None or box is None:
                raise UserError(f"{xml_file}: an <object> without <name> or <bndbox>")
            try:
                x0, y0, x1, y1 = (float(_text(box, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError) as e:
                raise UserError(f"{xml_file}: <bndbox> of '{name}' needs numeric xmin, ymin, xmax, ymax") from e
            # VOC boxes are 1-based inclusive pixel indices (detectron2's convention, kept for floats)
            x0, y0 = x0 - 1.0, y0 - 1.0
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
    return dicts


# ----------------------------------------------------------------------------------------------
def _class_names(yaml_path, value, found: list[str]) -> tuple[str, ...]:
    if value in (None, "from_annotations"):
        if not found:
            raise UserError(f"{yaml_path}: classes: from_annotations, but the annotations name no classes")
        return tuple(found)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UserError(f"{yaml_path}: classes: expected 'from_annotations' or a non-empty list of names")
    if len(set(value)) != len(value):
        raise UserError(f"{yaml_path}: classes: lists a name twice")
    missing = [v for v in value if v not in found]
    if missing:
        raise UserError(f"{yaml_path}: classes: {missing} do not occur in the annotations (found {found})")
    return tuple(value)


def _to_indices(dicts, class_index, name_of, source, notes):
    """Map each annotation's category to its index in the class list; drop the others (counted)."""
    dropped = {}
    for record in dicts:
        kept = []
        for ann in record["annotations"]:
            name = name_of(ann["category_id"])
            if name in class_index:
                kept.append({**ann, "category_id": class_index[name]})
            else:
                dropped[name] = dropped.get(name, 0) + 1
        record["annotations"] = kept
    if dropped:
        notes.append(f"{source}: ignored annotations of classes not in the class list: {dropped}")


def register_custom(yaml_path) -> CustomDataset:
    """Validate the YAML and the data it points to, register ``<name>_train`` / ``<name>_test``."""
    yaml_path = Path(yaml_path).resolve()
    spec = _load_yaml(yaml_path)
    name = str(spec["name"])
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"{yaml_path}: name: {name!r} should be letters, digits, '_' or '-'")
    fmt = _choice(yaml_path, "format", spec["format"], ("coco", "voc"))
    model = _choice(yaml_path, "model", spec.get("model", "FPN"), ("C4", "FPN"))
    masks = spec.get("masks", False)
    if not isinstance(masks, bool):
        raise UserError(f"{yaml_path}: masks: expected true or false, got {masks!r}")
    if masks and fmt == "voc":
        raise UserError(f"{yaml_path}: masks: true needs instance masks, but VOC-format folders hold boxes only")
    schedule = _schedule(yaml_path, spec.get("schedule", "full"))
    splits = {role: _split_spec(yaml_path, fmt, role, spec[role]) for role in ("train", "test")}
    notes: list[str] = []

    if fmt == "coco":
        loaded = {role: _load_coco(s, notes) for role, s in splits.items()}
        found = []
        for _, categories in loaded.values():
            found += [n for _, n in sorted(categories.items()) if n not in found]
        class_names = _class_names(yaml_path, spec.get("classes"), found)
        index = {n: i for i, n in enumerate(class_names)}
        dicts = {}
        for role, (role_dicts, categories) in loaded.items():
            _to_indices(role_dicts, index, lambda c, cats=categories: cats.get(c, f"<category id {c}>"),
                        splits[role]["json"], notes)
            dicts[role] = role_dicts
    else:
        dicts = {}
        for role, other in (("train", "test"), ("test", "train")):
            same_root = splits[other]["root"] == splits[role]["root"]
            dicts[role] = _load_voc(splits[role], role, splits[other]["split"] if same_root else None, notes)
        found = sorted({a["category_id"] for d in dicts.values() for r in d for a in r["annotations"]})
        class_names = _class_names(yaml_path, spec.get("classes"), found)
        index = {n: i for i, n in enumerate(class_names)}
        for role in dicts:
            _to_indices(dicts[role], index, lambda c: c, splits[role]["root"] / "Annotations", notes)

    mask_format = "polygon"
    if masks:
        segms = [a.get("segmentation") for d in dicts.values() for r in d for a in r["annotations"]]
        if not any(segms):
            raise UserError(f"{yaml_path}: masks: true, but the annotations carry no 'segmentation'")
        if any(isinstance(s, dict) for s in segms):
            mask_format = "bitmask"
    else:
        for d in dicts.values():
            for r in d:
                for a in r["annotations"]:
                    a.pop("segmentation", None)
    if not any(r["annotations"] for r in dicts["train"]):
        raise UserError(f"{yaml_path}: the train split has no annotations of the classes {list(class_names)}")

    dataset = CustomDataset(
        name=name, format=fmt, train_dataset=f"{name}_train", test_dataset=f"{name}_test",
        class_names=class_names, model=model, masks=masks, mask_format=mask_format, schedule=schedule,
        yaml_path=str(yaml_path), notes=notes,
    )
    for role, dataset_name in (("train", dataset.train_dataset), ("test", dataset.test_dataset)):
        if dataset_name in DatasetCatalog.list():
            DatasetCatalog.remove(dataset_name)
        if dataset_name in MetadataCatalog.list():
            MetadataCatalog.remove(dataset_name)
        DatasetCatalog.register(dataset_name, lambda d=dicts[role]: copy.deepcopy(d))
        # No json_file: COCOEvaluator rebuilds ground truth from these dicts (ids 1..K, clean ids).
        MetadataCatalog.get(dataset_name).set(
            thing_classes=list(class_names), evaluator_type="coco",
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(class_names))},
            custom_yaml=str(yaml_path),
        )
    dataset.notes = list(dict.fromkeys(notes))  # train and test often share a file: say it once
    for note in dataset.notes:
        logger.info(note)
    return dataset
