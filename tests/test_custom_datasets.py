"""Custom datasets from a YAML file (transfer.datasets.custom), on messy folders made here and, when
PyPI is reachable, on the real photos of labelme's example folders (fetched into a cache, never
copied into the repository)."""
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from transfer import d2compat  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.structures.masks import polygons_to_bitmask

from transfer.datasets import demo
from transfer.datasets.custom import register_custom
from transfer.errors import UserError

LOOKS = {"cat": ("circle", "orange", 1.0), "dog": ("square", "brown", 1.0), "kite": ("diamond", "cyan", 1.0)}


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        labels = [list(LOOKS)[(i + k) % 3] for k in range(1 + i % 2)]
        yield demo.render_scene(rng, 96, 80, labels, LOOKS, size_range=(0.3, 0.5))


def _write_yaml(path, **spec):
    path.write_text(yaml.safe_dump(spec))
    return path


def _gt_as_predictions(dicts, masks=False):
    inputs, outputs = [], []
    for d in dicts:
        anns = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
        inst = Instances((d["height"], d["width"]))
        boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if masks:
            inst.pred_masks = torch.from_numpy(np.stack(
                [polygons_to_bitmask(a["segmentation"], d["height"], d["width"]) for a in anns]))
        inputs.append({"image_id": d["image_id"], "height": d["height"], "width": d["width"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(dataset_name, output_dir, masks=False):
    """detectron2's COCOEvaluator, as the task runner uses it, with the ground truth as predictions."""
    evaluator = COCOEvaluator(dataset_name, output_dir=str(output_dir), use_fast_impl=False)
    evaluator.reset()
    evaluator.process(*_gt_as_predictions(DatasetCatalog.get(dataset_name), masks=masks))
    return evaluator.evaluate()


# ------------------------------------------------------------------------------------------------
@pytest.fixture
def messy_voc(tmp_path):
    """A VOC folder as labelling tools write it: float boxes, empty <difficult/>, no ImageSets."""
    root = tmp_path / "my_voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    boxes = {}
    for i, (image, objects) in enumerate(_scenes(10)):
        Image.fromarray(image).save(root / "JPEGImages" / f"img_{i:03d}.jpg")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"img_{i:03d}.jpg"
        size = ET.SubElement(ann, "size")
        ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = "96", "80"
        for k, obj in enumerate(objects):
            node = ET.SubElement(ann, "object")
            ET.SubElement(node, "name").text = obj.label
            ET.SubElement(node, "truncated")
            # an empty tag (labelme), and on one object of image 0 a real 'difficult' flag
            ET.SubElement(node, "difficult").text = "1" if (i, k) == (0, 0) else None
            x0, y0, x1, y1 = obj.box_xyxy()
            coords = (x0 + 0.5, y0 + 0.25, x1 + 1.5, y1 + 1.25)
            boxes[(f"img_{i:03d}.jpg", obj.label)] = coords
            box = ET.SubElement(node, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), coords):
                ET.SubElement(box, key).text = repr(value)
        ET.ElementTree(ann).write(root / "Annotations" / f"img_{i:03d}.xml")
    return root, boxes


def test_voc_folder_with_labelling_tool_quirks(messy_voc, tmp_path, caplog):
    root, boxes = messy_voc
    spec = _write_yaml(tmp_path / "voc.yaml", name="myvoc", format="voc", train={"root": "my_voc"},
                       test={"root": "my_voc"}, classes="from_annotations", model="C4", masks=False,
                       schedule={"max_iter": 300, "base_lr": 0.01})
    ds = register_custom(spec)
    assert (ds.train_dataset, ds.test_dataset, ds.model, ds.evaluator_type) == ("myvoc_train", "myvoc_test", "C4", "coco")
    assert ds.class_names == ("cat", "dog", "kite") and ds.num_classes == 3 and ds.schedule["max_iter"] == 300
    train, test = DatasetCatalog.get("myvoc_train"), DatasetCatalog.get("myvoc_test")
    names = lambda dicts: {Path(d["file_name"]).name for d in dicts}  # noqa: E731
    assert len(train) == 8 and len(test) == 2 and not names(train) & names(test)  # derived 80/20 split
    assert any("ImageSets/Main/trainval.txt: missing; derived the train split" in n for n in ds.notes)
    assert "derived the test split" in caplog.text
    assert names(DatasetCatalog.get("myvoc_test")) == names(test)  # deterministic
    for d in train + test:
        for a in d["annotations"]:
            label = ds.class_names[a["category_id"]]
            x0, y0, x1, y1 = boxes[(Path(d["file_name"]).name, label)]
            assert a["bbox"] == [x0 - 1, y0 - 1, x1, y1]  # floats kept, VOC's 1-based origin removed
    crowd = [a for d in train + test for a in d["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1  # <difficult>1</difficult>; the empty tags read as 0
    assert MetadataCatalog.get("myvoc_test").thing_classes == ["cat", "dog", "kite"]
    # a split file that exists is used as it is; the other one is its complement
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("img_000\nimg_001\nimg_002\n")
    ds = register_custom(spec)
    assert names(DatasetCatalog.get("myvoc_test")) == {"img_000.jpg", "img_001.jpg", "img_002.jpg"}
    assert len(DatasetCatalog.get("myvoc_train")) == 7
    results = _evaluate("myvoc_test", tmp_path / "eval")
    assert results["bbox"]["AP"] == pytest.approx(100.0)  # the difficult box is ignored, as in VOC


@pytest.fixture
def messy_coco(tmp_path):
    """A COCO json as labelme writes it: ids from 0, a background category, 'JPEGImages/' names."""
    root = tmp_path / "my_coco"
    (root / "JPEGImages").mkdir(parents=True)
    categories = [{"id": 0, "name": "_background_"}] + [{"id": i + 1, "name": n} for i, n in enumerate(LOOKS)]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for i, (image, objects) in enumerate(_scenes(6, seed=1)):
        Image.fromarray(image).save(root / "JPEGImages" / f"p{i}.jpg")
        images.append({"id": i, "file_name": f"JPEGImages/p{i}.jpg", "width": 96, "height": 80})
        for obj in objects:
            x0, y0, x1, y1 = obj.box_xyxy()
            annotations.append({"id": len(annotations), "image_id": i, "category_id": ids[obj.label],
                                "segmentation": obj.polygons(), "area": float(obj.mask.sum()),
                                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root, annotations


def test_coco_json_with_labelme_quirks(messy_coco, tmp_path):
    root, annotations = messy_coco
    spec = _write_yaml(tmp_path / "coco.yaml", name="mycoco", format="coco",
                       train={"json": "my_coco/annotations.json", "images": "my_coco/JPEGImages"},
                       test={"json": "my_coco/annotations.json", "images": "my_coco"}, masks=True,
                       model="FPN", schedule="demo")
    ds = register_custom(spec)
    assert ds.class_names == tuple(LOOKS) and ds.masks and ds.mask_format == "polygon"
    assert any("dropped the background category '_background_' (id 0)" in n for n in ds.notes)
    assert any("include the image folder" in n for n in ds.notes)
    train = DatasetCatalog.get("mycoco_train")
    assert [d["image_id"] for d in train] == list(range(6))
    assert all(Path(d["file_name"]).is_file() for d in train)
    assert sum(len(d["annotations"]) for d in train) == len(annotations)
    assert {a["category_id"] for d in train for a in d["annotations"]} == {0, 1, 2}
    results = _evaluate("mycoco_test", tmp_path / "eval", masks=True)
    # annotation id 0 would count as "unmatched" inside pycocotools; the evaluator must not see it
    assert results["bbox"]["AP"] == pytest.approx(100.0) and results["segm"]["AP"] == pytest.approx(100.0)

    # an explicit class list keeps those classes, in that order, and says what it dropped
    spec = _write_yaml(tmp_path / "coco2.yaml", name="mycoco2", format="coco",
                       train={"json": "my_coco/annotations.json", "images": "my_coco"},
                       test={"json": "my_coco/annotations.json", "images": "my_coco"}, classes=["kite", "cat"])
    ds = register_custom(spec)
    assert ds.class_names == ("kite", "cat") and not ds.masks
    kept = [a for d in DatasetCatalog.get("mycoco2_train") for a in d["annotations"]]
    assert len(kept) == sum(a["category_id"] in (1, 3) for a in annotations)
    assert all("segmentation" not in a for a in kept)
    assert any("not in the class list: {'dog'" in n for n in ds.notes)


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"format": "yolo"}, r"format: 'yolo' is not one of \['coco', 'voc'\]"),
    ({"model": "R101"}, r"model: 'R101' is not one of \['C4', 'FPN'\]"),
    ({"masks": True}, "masks: true needs instance masks, but VOC-format folders hold boxes only"),
    ({"classes": ["cat", "horse"]}, r"classes: \['horse'\] do not occur in the annotations"),
    ({"schedule": "forever"}, r"schedule: 'forever' is not one of \['demo', 'quick', 'full'\]"),
    ({"schedule": {"base_lr": 0.1}}, "schedule: expected one of .* or a mapping with max_iter"),
    ({"train": {"root": "nowhere"}}, "nowhere: missing"),
    ({"test": {"json": "x.json", "images": "."}}, r"test: unknown key\(s\) \['images', 'json'\] for format voc"),
])
def test_bad_yaml_is_one_clear_line(messy_voc, tmp_path, change, message):
    spec = {"name": "bad", "format": "voc", "train": {"root": "my_voc"}, "test": {"root": "my_voc"}}
    spec.update(change)
    with pytest.raises(UserError, match=message) as e:
        register_custom(_write_yaml(tmp_path / "bad.yaml", **spec))
    assert "\n" not in str(e.value)


def test_broken_files_are_one_clear_line(messy_voc, messy_coco, tmp_path):
    voc, _ = messy_voc
    (voc / "Annotations" / "img_003.xml").write_text("<annotation><object>")
    spec = _write_yaml(tmp_path / "v.yaml", name="v", format="voc", train={"root": "my_voc"}, test={"root": "my_voc"})
    with pytest.raises(UserError, match=r"img_003.xml: not valid XML"):
        register_custom(spec)
    coco, _ = messy_coco
    spec = _write_yaml(tmp_path / "c.yaml", name="c", format="coco",
                       train={"json": "my_coco/annotations.json", "images": "my_coco"},
                       test={"json": "my_coco/annotations.json", "images": "my_coco"})
    (coco / "JPEGImages" / "p3.jpg").unlink()
    with pytest.raises(UserError, match=r"my_coco/JPEGImages/p3.jpg: missing \(an image of .*annotations.json\)"):
        register_custom(spec)
    (coco / "JPEGImages" / "p0.jpg").unlink()
    with pytest.raises(UserError, match=r"my_coco/JPEGImages/p0.jpg: missing \(file_name 'JPEGImages/p0.jpg'"):
        register_custom(spec)
    (coco / "annotations.json").write_text('{"images": [')
    with pytest.raises(UserError, match="annotations.json: not valid JSON"):
        register_custom(spec)
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml: not valid YAML"):
        register_custom(tmp_path / "broken.yaml")


# ------------------------------------------------------------------------------------------------
LABELME = "labelme==6.3.1"


@pytest.fixture(scope="module")
def labelme_examples():
    """labelme's example folders (3 PASCAL VOC photos), from its PyPI source archive, cached.

    GPL-3.0 data: used at test time only, never copied into the repository.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moco-transfer" / "labelme-6.3.1"
    examples = cache / "labelme-6.3.1" / "examples"
    if not examples.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:", "--retries", "1", "--timeout", "20",
                            LABELME, "-d", str(cache)], check=True, capture_output=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"could not fetch the {LABELME} source archive from PyPI (offline?): {type(e).__name__}")
        with tarfile.open(cache / "labelme-6.3.1.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("labelme-6.3.1/examples/")]
            tar.extractall(cache, members=members)
    return examples


def test_labelme_examples(labelme_examples, tmp_path):
    coco = labelme_examples / "instance_segmentation" / "data_dataset_coco"
    spec = _write_yaml(tmp_path / "labelme_coco.yaml", name="labelme_coco", format="coco",
                       train={"json": str(coco / "annotations.json"), "images": str(coco)},
                       test={"json": str(coco / "annotations.json"), "images": str(coco)}, masks=True)
    ds = register_custom(spec)
    assert ds.num_classes == 20 and "_background_" not in ds.class_names  # the json lists VOC's classes
    test = DatasetCatalog.get(ds.test_dataset)
    assert len(test) == 3 and sum(len(d["annotations"]) for d in test) == 12
    assert all(Image.open(d["file_name"]).size == (d["width"], d["height"]) for d in test)
    results = _evaluate(ds.test_dataset, tmp_path / "eval", masks=True)
    assert results["bbox"]["AP"] == pytest.approx(100.0) and results["segm"]["AP"] == pytest.approx(100.0)

    voc = labelme_examples / "bbox_detection" / "data_dataset_voc"
    spec = _write_yaml(tmp_path / "labelme_voc.yaml", name="labelme_voc", format="voc",
                       train={"root": str(voc)}, test={"root": str(voc)}, model="C4")
    ds = register_custom(spec)
    train, test = DatasetCatalog.get(ds.train_dataset), DatasetCatalog.get(ds.test_dataset)
    assert (len(train), len(test)) == (2, 1) and any("derived the train split" in n for n in ds.notes)
    boxes = [a["bbox"] for d in train + test for a in d["annotations"]]
    assert any(b != [round(v) for v in b] for b in boxes)  # labelme's float coordinates survive
    assert set(ds.class_names) <= {"person", "bus", "car", "bicycle", "bottle", "pottedplant", "sofa", "chair"}
