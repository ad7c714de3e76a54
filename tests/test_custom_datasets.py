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
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.structures.masks import polygons_to_bitmask
from PIL import Image

from transfer.datasets import demo
from transfer.datasets.custom import register_custom
from transfer.errors import UserError

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

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
    assert (ds.train_dataset, ds.test_dataset, ds.model, ds.evaluator_type) == (
        "myvoc_train", "myvoc_test", "C4", "coco")
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
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                            "--retries", "1", "--timeout", "20",
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


# ------------------------------------------------------------------------------------------------
# Real user folders: image suffixes, class lists, merges, splits, box conventions, schedules
def _image(path, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 60)).save(path)


def _write_voc(root, objects, file_names=None):
    """``objects``: {image id: [(class, (xmin, ymin, xmax, ymax)), ...]}, written as VOC XML."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for image_id, boxes in objects.items():
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = (file_names or {}).get(image_id, f"{image_id}.jpg")
        for name, coords in boxes:
            node = ET.SubElement(ann, "object")
            ET.SubElement(node, "name").text = name
            box = ET.SubElement(node, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), coords):
                ET.SubElement(box, key).text = str(value)
        ET.ElementTree(ann).write(root / "Annotations" / f"{image_id}.xml")
    return root


def _write_coco(root, objects, categories):
    """``objects``: {file name: [(category id, (x, y, w, h)), ...]}; images are written too."""
    images, annotations = [], []
    for i, (file_name, boxes) in enumerate(objects.items()):
        _image(root / "images" / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": 32, "height": 24})
        annotations += [{"id": len(annotations) + k + 1, "image_id": i + 1, "category_id": c, "bbox": list(b),
                         "area": b[2] * b[3], "iscrowd": 0} for k, (c, b) in enumerate(boxes)]
    (root / "data.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": i, "name": n} for i, n in categories.items()]}))
    return root


def _coco_yaml(tmp_path, name="pets", **spec):
    spec.setdefault("test", {"json": "data/data.json", "images": "data/images"})
    return _write_yaml(tmp_path / f"{name}.yaml", name=name, format="coco",
                       train={"json": "data/data.json", "images": "data/images"}, **spec)


@pytest.fixture
def pets(tmp_path):
    """A COCO json of 10 images: cats and dogs, and a category 'horse' that no annotation uses."""
    objects = {f"p{i}.jpg": [(1 + i % 2, (2, 2, 10, 8))] for i in range(10)}
    return _write_coco(tmp_path / "data", objects, {1: "cat", 2: "dog", 3: "horse"})


def test_a_tif_named_in_the_xml_is_found_as_tiff_and_a_missing_image_names_the_paths_tried(tmp_path):
    root = _write_voc(tmp_path / "trees", {"a": [("Tree", (1, 1, 9, 9))], "b": [("Tree", (2, 2, 8, 8))]},
                      file_names={"a": "a.tif", "b": "C:\\tiles\\b.tif"})
    _image(root / "JPEGImages" / "a.tiff")
    _image(root / "JPEGImages" / "b.TIF")
    spec = _write_yaml(tmp_path / "t.yaml", name="trees", format="voc", train={"root": "trees"}, test={"root": "trees"})
    register_custom(spec)
    files = {Path(d["file_name"]).name for d in DatasetCatalog.get("trees_train") + DatasetCatalog.get("trees_test")}
    assert files == {"a.tiff", "b.TIF"}
    (root / "JPEGImages" / "a.tiff").unlink()
    with pytest.raises(UserError) as e:
        register_custom(spec)
    xml = root / "Annotations" / "a.xml"
    assert str(e.value).startswith(f"{root / 'JPEGImages' / 'a.tif'}: missing (the image of {xml})")
    assert ".tiff in either case" in str(e.value) and ".jpg" not in str(e.value).split(":")[0]


def test_a_missing_coco_image_is_reported_at_the_path_tried_not_with_the_folder_doubled(pets, tmp_path):
    (pets / "images" / "p0.jpg").rename(pets / "images" / "p0.TIFF")  # on disk with another suffix
    (pets / "images" / "p1.jpg").unlink()
    data = json.loads((pets / "data.json").read_text())
    for image in data["images"]:
        image["file_name"] = f"images/{image['file_name']}"
    (pets / "data.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        register_custom(_coco_yaml(tmp_path))
    assert str(e.value).startswith(f"{pets / 'images' / 'p1.jpg'}: missing (an image of {pets / 'data.json'})")
    _image(pets / "images" / "p1.jpg")
    ds = register_custom(_coco_yaml(tmp_path))
    assert any("1 image(s) are on disk with another suffix, e.g. p0.jpg -> p0.TIFF" in n for n in ds.notes)


def test_a_coco_class_list_naming_a_class_without_annotations_stops_with_one_line(pets, tmp_path):
    for classes, missing in ((["cat", "zebra"], "zebra"), (["cat", "horse"], "horse")):
        with pytest.raises(UserError, match=rf"classes: \['{missing}'\] do not occur in the annotations "
                                            r"\(found \['cat', 'dog'\]\)") as e:
            register_custom(_coco_yaml(tmp_path, classes=classes))
        assert "\n" not in str(e.value)
    ds = register_custom(_coco_yaml(tmp_path, split={"test": 0.3}))  # from_annotations keeps the json's classes
    assert ds.class_names == ("cat", "dog", "horse")
    assert any("no instances of ['horse'] in the train split" in w for w in ds.warnings)
    assert any("no instances of ['horse'] in the test split" in w for w in ds.warnings)
    assert any("instances per class (train/test): cat " in n for n in ds.notes)


def test_merge_trains_the_merged_classes_as_one_and_a_merge_of_an_unknown_class_stops(tmp_path):
    objects = {f"t{i}": [("Alive", (1, 1, 9, 9)), ("Dead", (12, 2, 20, 9)), ("Road", (1, 14, 30, 20))]
               for i in range(5)}
    root = _write_voc(tmp_path / "trees", objects)
    for i in range(5):
        _image(root / "JPEGImages" / f"t{i}.jpg")
    spec = dict(name="trees", format="voc", train={"root": "trees"}, test={"root": "trees"})
    ds = register_custom(_write_yaml(tmp_path / "t.yaml", **spec, merge={"Tree": ["Alive", "Dead"]}))
    assert ds.class_names == ("Road", "Tree")
    records = DatasetCatalog.get("trees_train") + DatasetCatalog.get("trees_test")
    assert [sorted(a["category_id"] for a in r["annotations"]) for r in records] == [[0, 1, 1]] * 5
    ds = register_custom(_write_yaml(tmp_path / "t.yaml", **spec, classes=["Tree"], merge={"Tree": "Alive"}))
    assert any("not in the class list: {'Dead': 5, 'Road': 5}" in w and "stay in the images as background" in w
               for w in ds.warnings)
    with pytest.raises(UserError, match=r"merge: \['Alve'\] do not occur in the annotations"):
        register_custom(_write_yaml(tmp_path / "t.yaml", **spec, merge={"Tree": ["Alve", "Dead"]}))
    with pytest.raises(UserError, match="merge: 'Dead' is merged into both 'Tree' and 'Wood'"):
        register_custom(_write_yaml(tmp_path / "t.yaml", **spec, merge={"Tree": ["Dead"], "Wood": ["Dead"]}))


def test_train_and_test_on_the_same_images_is_one_warning_however_often_the_yaml_is_read(pets, tmp_path, caplog):
    spec = _coco_yaml(tmp_path)
    for _ in range(3):  # a suite and its runs register the dataset several times
        ds = register_custom(spec)
    same = [w for w in ds.warnings if "train and test are the same 10 images" in w]
    assert len(same) == 1 and same[0].startswith(str(spec))
    assert caplog.text.count("train and test are the same 10 images") == 1
    assert not [w for w in register_custom(_coco_yaml(tmp_path, name="split", split={})).warnings if "same" in w]


def test_a_coco_split_is_seeded_deterministic_and_disjoint(pets, tmp_path):
    def test_files(**split):
        ds = register_custom(_write_yaml(tmp_path / "s.yaml", name="s", format="coco", split=split,
                                         train={"json": "data/data.json", "images": "data/images"}))
        train, test = ({Path(d["file_name"]).name for d in DatasetCatalog.get(n)}
                       for n in (ds.train_dataset, ds.test_dataset))
        assert not train & test and len(train | test) == 10
        return test

    first = test_files(test=0.3, seed=0)
    assert len(first) == 3 and test_files(test=0.3, seed=0) == first
    assert any(test_files(test=0.3, seed=seed) != first for seed in (1, 2, 3))
    assert len(test_files()) == 2  # 20% by default
    with pytest.raises(UserError, match="split: divides train's images into train and test, but test: names other"):
        register_custom(_coco_yaml(tmp_path, split={"test": 0.3}, test={"json": "data/data.json", "images": "."}))
    with pytest.raises(UserError, match="split: test: expected the test fraction, between 0 and 1, got 30"):
        register_custom(_coco_yaml(tmp_path, split={"test": 30}))


@pytest.mark.parametrize("zero_based, expected", [(False, [-1.0, 4.0, 10.0, 20.0]), (True, [0.0, 5.0, 10.0, 20.0])])
def test_voc_boxes_are_one_based_unless_the_yaml_says_zero_based(tmp_path, zero_based, expected):
    root = _write_voc(tmp_path / "v", {"a": [("car", (0, 5, 10, 20))], "b": [("car", (3, 3, 12, 12))]})
    for image_id in "ab":
        _image(root / "JPEGImages" / f"{image_id}.jpg")
    spec = _write_yaml(tmp_path / "v.yaml", name="v", format="voc", train={"root": "v"}, test={"root": "v"},
                       zero_based_boxes=zero_based)
    ds = register_custom(spec)
    records = {Path(d["file_name"]).stem: d for d in DatasetCatalog.get("v_train") + DatasetCatalog.get("v_test")}
    assert records["a"]["annotations"][0]["bbox"] == expected
    assert records["b"]["annotations"][0]["bbox"] == ([3.0, 3.0, 12.0, 12.0] if zero_based else [2.0, 2.0, 12.0, 12.0])
    hint = [w for w in ds.warnings if "set zero_based_boxes: true" in w]
    assert (hint == []) == zero_based and (zero_based or hint[0].endswith(
        "1 box(es) start below 1, where VOC's 1-based coordinates start; if your tool writes 0-based boxes, "
        "set zero_based_boxes: true"))
    with pytest.raises(UserError, match="zero_based_boxes: only for format voc"):
        register_custom(_write_yaml(tmp_path / "c.yaml", name="c", format="coco", zero_based_boxes=True,
                                    train={"json": "x", "images": "."}, test={"json": "x", "images": "."}))


@pytest.fixture
def weights_file(tmp_path):
    """A weights path with its overlay: enough to resolve a config (nothing is loaded)."""
    (tmp_path / "w.pkl").write_bytes(b"not read when resolving a config")
    (tmp_path / "w.yaml").write_text("MODEL:\n  RESNETS:\n    DEPTH: 50\n")
    return tmp_path / "w.pkl"


def test_a_yaml_schedule_runs_unless_the_command_line_names_another_and_then_the_plan_says_so(
        pets, tmp_path, weights_file):
    from transfer import suite

    yamls = [_coco_yaml(tmp_path, name="own", schedule={"max_iter": 30}),
             _coco_yaml(tmp_path, name="quick", schedule="quick"), _coco_yaml(tmp_path, name="none")]
    spec = ",".join(map(str, yamls))
    notes, schedules = [], {}
    tasks = suite.resolve_tasks(spec, None, notes=notes, schedules=schedules)
    assert schedules == {"own": "custom", "quick": "quick", "none": "full"} and notes == []
    runs = suite.plan([suite.prepare_weights(str(weights_file), tmp_path)], tasks, schedules, 1, tmp_path / "out")
    assert [(r.task, r.schedule) for r in runs] == [("own", "custom"), ("quick", "quick"), ("none", "full")]

    notes, schedules = [], {}
    suite.resolve_tasks(spec, "full", notes=notes, schedules=schedules)
    assert set(schedules.values()) == {"full"} and len(notes) == 2
    assert notes[0].startswith(f"own: --schedule full overrides the schedule its YAML names (custom: from {yamls[0]}")
    assert notes[1].startswith("quick: --schedule full overrides the schedule its YAML names (quick: 1/8 of full")
    run_suite = load_script("tools/run_suite.py")
    assert run_suite.parse_args(["--tasks", str(yamls[0])]).schedule is None  # no flag: the YAML's


def test_a_short_yaml_schedule_reaches_its_lr_and_fits_steps_warmup_and_precise_bn_in_its_length(
        pets, tmp_path, weights_file):
    from detectron2.solver import build_lr_scheduler

    from transfer import finetune as ft
    from transfer.tasks import get_task

    task = get_task(str(_coco_yaml(tmp_path, schedule={"max_iter": 30, "base_lr": 0.02})))
    cfg = ft.resolve_config(task, weights_file, "custom")
    fitted = (cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.TEST.PRECISE_BN.NUM_ITER)
    assert fitted == ((22, 28), 3, 3)  # the config's (6750, 8250) of 9000, 100 warm-up, 200 precise BN
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.BASE_LR)
    scheduler, lrs = build_lr_scheduler(cfg, optimizer), []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[3] == pytest.approx(0.02) and lrs[-1] == pytest.approx(0.02 * 0.01)

    # What the YAML sets stays as set; precise_bn_iters 0 turns precise BN off.
    task = get_task(str(_coco_yaml(tmp_path, image_size=640, schedule={
        "max_iter": 30, "steps": [], "warmup_iters": 10, "precise_bn_iters": 0, "ims_per_batch": 4})))
    cfg = ft.resolve_config(task, weights_file, "custom")
    assert (cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.TEST.PRECISE_BN.ENABLED) == ((), 10, False)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.INPUT.MIN_SIZE_TEST, max(cfg.INPUT.MIN_SIZE_TRAIN)) == (4, 640, 640)
    assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 384 and cfg.DATALOADER.NUM_WORKERS <= len(os.sched_getaffinity(0))
    with pytest.raises(UserError, match="schedule: warmup_iters 100 must be below max_iter 30"):
        register_custom(_coco_yaml(tmp_path, schedule={"max_iter": 30, "warmup_iters": 100}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the defaults of a machine without GPUs")
def test_on_a_cpu_a_yaml_without_batch_or_image_size_gets_a_batch_and_size_a_cpu_holds(pets, tmp_path, weights_file):
    from transfer import finetune as ft
    from transfer.tasks import get_task

    cfg = ft.resolve_config(get_task(str(_coco_yaml(tmp_path, schedule="quick"))), weights_file, "quick")
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.INPUT.MIN_SIZE_TEST) == (2, pytest.approx(0.0025), 512)
    task = get_task(str(_coco_yaml(tmp_path, schedule={"max_iter": 30, "base_lr": 0.01})))
    cfg = ft.resolve_config(task, weights_file, "custom")
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (2, 0.01)  # the YAML's LR, not scaled


def test_looking_a_custom_task_up_registers_nothing_until_a_run_registers_its_datasets(pets, tmp_path):
    from transfer import finetune as ft
    from transfer.tasks import get_task, is_custom_task

    spec = str(_coco_yaml(tmp_path, name="lookup", split={"test": 0.3}))
    task = get_task(spec)  # the YAML and its data are read and checked, nothing is registered
    assert is_custom_task(spec) and not is_custom_task("voc07")
    assert task.train == ("lookup_train",) and task.overrides["MODEL.ROI_HEADS.NUM_CLASSES"] == 3
    assert not {"lookup_train", "lookup_test"} & set(DatasetCatalog.list())
    ft.register_datasets(task.name, None)  # where a process is about to read them
    train, test = DatasetCatalog.get("lookup_train"), DatasetCatalog.get("lookup_test")
    assert len(train) + len(test) == 10 and MetadataCatalog.get("lookup_train").thing_classes == ["cat", "dog", "horse"]
