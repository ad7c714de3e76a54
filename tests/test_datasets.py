"""Demo datasets, detectron2 registrations and layout checks (transfer.datasets.demo / catalog).

Every demo dataset is read back through detectron2's own loaders and, where that is cheap, scored
by detectron2's own evaluators with the ground truth as predictions (which gives 100 only when the
files are written exactly as the real datasets are).
"""
import collections
import hashlib
import json
import shutil
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import parse_rec
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.structures.masks import polygons_to_bitmask
from PIL import Image

from transfer.datasets import catalog, demo
from transfer.errors import UserError

from conftest import load_script

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`

SIZES = demo.SIZES


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = demo.generate(tmp_path_factory.mktemp("demo"), seed=0)
    catalog.register_all(root)
    return root


def _counts(name):
    dicts = DatasetCatalog.get(name)
    return dicts, collections.Counter(a["category_id"] for d in dicts for a in d["annotations"])


def _gt_as_predictions(dicts, masks=False, keypoints=False):
    """detectron2 model outputs that repeat the ground truth (crowd regions left out)."""
    inputs, outputs = [], []
    for d in dicts:
        anns = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
        h, w = d["height"], d["width"]
        inst = Instances((h, w))
        boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if masks:
            inst.pred_masks = torch.from_numpy(
                np.stack([polygons_to_bitmask(a["segmentation"], h, w) for a in anns]).reshape(-1, h, w))
        if keypoints:
            inst.pred_keypoints = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
        inputs.append({"image_id": d["image_id"], "file_name": d["file_name"], "height": h, "width": w})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(evaluator, dicts, **kw):
    evaluator.reset()
    inputs, outputs = _gt_as_predictions(dicts, **kw)
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


# ------------------------------------------------------------------------------------------------
def test_generate_is_idempotent_and_refuses_foreign_folders(root, tmp_path):
    marker = json.loads((root / demo.MARKER).read_text())
    assert marker == {"version": demo.DEMO_VERSION, "seed": 0, "complete": True}
    some_file = next((root / "coco" / "train2017").iterdir())
    before = some_file.stat().st_mtime_ns
    start = time.perf_counter()
    assert demo.generate(root, seed=0) == root
    assert time.perf_counter() - start < 0.5
    assert some_file.stat().st_mtime_ns == before

    (tmp_path / "VOC2007").mkdir()  # e.g. a user's real data: never overwritten
    with pytest.raises(UserError, match="not written by the demo generator"):
        demo.generate(tmp_path)


def _tree_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writers_are_deterministic(tmp_path):
    for run in ("a", "b"):
        demo.write_voc(tmp_path / run, 2012, np.random.default_rng([0, 2]))
        demo.write_cityscapes(tmp_path / run, np.random.default_rng([0, 4]))
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    demo.write_voc(tmp_path / "c", 2012, np.random.default_rng([1, 2]))
    assert _tree_digest(tmp_path / "c") != _tree_digest(tmp_path / "a" / "VOC2012")


def test_imagenet_folder(root):
    from torchvision.datasets import ImageFolder

    spec = SIZES["imagenet"]
    train, val = ImageFolder(root / "imagenet" / "train"), ImageFolder(root / "imagenet" / "val")
    assert train.classes == val.classes == sorted(demo.IMAGENET_LOOKS)
    assert len(train) == 10 * spec["train_per_class"] and len(val) == 10 * spec["val_per_class"]
    image, _ = train[0]
    assert image.size == (spec["image"], spec["image"])


def test_voc_detection_loads_and_scores_100_with_ground_truth(root):
    trainval, c_trainval = _counts("voc_2007_trainval")
    test, c_test = _counts("voc_2007_test")
    assert len(trainval) == SIZES["VOC2007"]["trainval"] and len(test) == SIZES["VOC2007"]["test"]
    assert set(c_trainval) == set(c_test) == set(range(20))  # every VOC class in both splits
    assert {d["image_id"] for d in trainval}.isdisjoint({d["image_id"] for d in test})
    assert len(DatasetCatalog.get("voc_2012_trainval")) == SIZES["VOC2012"]["trainval"]
    assert MetadataCatalog.get("voc_2007_test").thing_classes == list(VOC_CLASSES)
    for d in test:
        w, h = Image.open(d["file_name"]).size
        assert (w, h) == (d["width"], d["height"])
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # the evaluator re-reads the XML itself (integer coordinates, difficult / truncated / pose tags)
    record = parse_rec(str(root / "VOC2007" / "Annotations" / f"{test[0]['image_id']}.xml"))
    assert record and all(r["difficult"] == 0 for r in record)
    results = _evaluate(PascalVOCDetectionEvaluator("voc_2007_test"), test)["bbox"]
    assert results["AP50"] == pytest.approx(100.0) and results["AP"] == pytest.approx(100.0)


def test_voc_segmentation_pngs(root):
    voc = root / "VOC2012"
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train) == SIZES["VOC2012"]["seg_train"] and not set(train) & set(val)
    assert len(train) + len(val) == SIZES["VOC2012"]["trainval"]
    seen = set()
    for image_id in val:
        png = Image.open(voc / "SegmentationClass" / f"{image_id}.png")
        assert png.mode == "P" and png.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colour map
        seg = np.asarray(png)
        values = set(np.unique(seg).tolist())
        assert values <= set(range(21)) | {255} and 255 in values  # void band along outlines
        names = {o.find("name").text for o in ET.parse(voc / "Annotations" / f"{image_id}.xml").findall("object")}
        assert {VOC_CLASSES[v - 1] for v in values - {0, 255}} == names
        seen |= values
    assert len(seen - {0, 255}) >= 10
    assert len(DatasetCatalog.get("voc_2012_sem_seg_val")) == len(val)


def test_coco_instances_and_keypoints_score_100_with_ground_truth(root, tmp_path):
    ann = json.loads((root / "coco" / "annotations" / "instances_val2017.json").read_text())
    assert [(c["id"], c["name"]) for c in ann["categories"]] == [
        (c["id"], c["name"]) for c in COCO_CATEGORIES if c["isthing"]]  # all 80, official ids
    train, c_train = _counts("coco_2017_train")
    val, c_val = _counts("coco_2017_val")
    assert len(train) == SIZES["coco"]["train2017"] and len(val) == SIZES["coco"]["val2017"]
    present = {MetadataCatalog.get("coco_2017_val").thing_classes[i] for i in c_val}
    assert present == set(demo.COCO_LOOKS) and set(c_train) == set(c_val)
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for d in val for a in d["annotations"])

    kp_val, c_kp = _counts("keypoints_coco_2017_val")
    persons = [a for d in kp_val for a in d["annotations"]]
    assert set(c_kp) == {0} and len(persons) == c_val[0] >= 10
    for a in persons:  # 17 visible keypoints, inside the person's box
        kps = np.asarray(a["keypoints"]).reshape(17, 3)
        x, y, w, h = a["bbox"]
        assert (kps[:, 2] == 2).all()
        assert (kps[:, 0] >= x).all() and (kps[:, 0] <= x + w + 1).all()
        assert (kps[:, 1] >= y).all() and (kps[:, 1] <= y + h + 1).all()
        assert kps[0, 1] < kps[5, 1] < kps[11, 1] < kps[15, 1]  # nose above shoulders above hips above ankles
        assert kps[5, 0] > kps[6, 0]  # facing the camera: the left shoulder on the image's right

    results = _evaluate(COCOEvaluator("coco_2017_val", output_dir=str(tmp_path / "inst"), use_fast_impl=False),
                        val, masks=True)
    assert results["bbox"]["AP"] == pytest.approx(100.0) and results["segm"]["AP"] == pytest.approx(100.0)
    results = _evaluate(COCOEvaluator("keypoints_coco_2017_val", output_dir=str(tmp_path / "kp"), use_fast_impl=False),
                        kp_val, keypoints=True)
    assert results["keypoints"]["AP"] == pytest.approx(100.0)


def test_lvis_v1_over_coco_images_scores_100_with_ground_truth(root, tmp_path):
    data = json.loads((root / "lvis" / "lvis_v1_val.json").read_text())
    assert len(data["categories"]) == 1203
    assert all({"frequency", "image_count", "instance_count", "synonyms", "def"} <= set(c) for c in data["categories"])
    assert all("file_name" not in im and im["coco_url"].startswith("http://images.cocodataset.org/val2017/")
               for im in data["images"])
    by_image = collections.defaultdict(set)
    for a in data["annotations"]:
        by_image[a["image_id"]].add(a["category_id"])
    for im in data["images"]:
        assert not set(im["neg_category_ids"]) & by_image[im["id"]]
    frequency = {c["id"]: c["frequency"] for c in data["categories"]}
    assert {frequency[a["category_id"]] for a in data["annotations"]} == {"r", "c", "f"}
    train_data = json.loads((root / "lvis" / "lvis_v1_train.json").read_text())
    person = next(c for c in train_data["categories"] if c["name"] == "person")
    assert person["instance_count"] == sum(a["category_id"] == person["id"] for a in train_data["annotations"])

    val, _ = _counts("lvis_v1_val")
    assert len(val) == SIZES["coco"]["val2017"]
    assert len(DatasetCatalog.get("lvis_v1_train")) == SIZES["coco"]["train2017"]
    assert all(d["file_name"].endswith(".jpg") and open(d["file_name"], "rb") for d in val)
    results = _evaluate(LVISEvaluator("lvis_v1_val", output_dir=str(tmp_path)), val, masks=True)
    for key in ("AP", "APr", "APc", "APf"):
        assert results["segm"][key] == pytest.approx(100.0), key


def test_cityscapes_instance_and_semantic(root):
    from cityscapesscripts.helpers.labels import id2label, labels

    train, c_train = _counts("cityscapes_fine_instance_seg_train")
    val, c_val = _counts("cityscapes_fine_instance_seg_val")
    assert len(train) == sum(SIZES["cityscapes"]["train"].values())
    assert len(val) == sum(SIZES["cityscapes"]["val"].values())
    thing_classes = MetadataCatalog.get("cityscapes_fine_instance_seg_train").thing_classes
    assert {thing_classes[i] for i in c_train} == set(demo.CITYSCAPES_THINGS)
    n_polygons = 0
    for d in val:
        gt = d["file_name"].replace("leftImg8bit/", "gtFine/").replace("_leftImg8bit.png", "_gtFine_polygons.json")
        n_polygons += sum(o["label"] in demo.CITYSCAPES_THINGS for o in json.loads(open(gt).read())["objects"])
    assert sum(c_val.values()) == n_polygons

    sem = DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    assert len(sem) == len(val)
    train_ids = {label.trainId for label in labels}
    for d in sem:
        train_map = np.asarray(Image.open(d["sem_seg_file_name"]))
        label_map = np.asarray(Image.open(d["sem_seg_file_name"].replace("labelTrainIds", "labelIds")))
        instance_map = np.asarray(Image.open(d["sem_seg_file_name"].replace("labelTrainIds", "instanceIds")))
        assert train_map.shape == (d["height"], d["width"]) and set(np.unique(train_map)) <= train_ids
        for label_id in np.unique(label_map):  # the three PNGs agree pixel by pixel
            region = label_map == label_id
            assert (train_map[region] == id2label[int(label_id)].trainId).all()
            inst = instance_map[region]
            assert ((np.where(inst >= 1000, inst // 1000, inst)) == label_id).all()
        assert (instance_map >= 24000).any()  # instances are encoded as id * 1000 + k


def test_check_accepts_the_demo_root_for_the_demo_names_only(root):
    catalog.check(demo.DATASET_NAMES, root)  # raises UserError on the first dataset it finds wrong
    # each demo name is one the check inspects (not a registered name it lets through unchecked) ...
    assert set(demo.DATASET_NAMES) <= set(catalog.known_names())
    # ... and the names whose files the demo does not write are refused on the same root.
    others = sorted(set(catalog.known_names()) - set(demo.DATASET_NAMES))
    assert others
    for name in others:
        with pytest.raises(UserError, match=f"{root}/.*: missing"):
            catalog.check([name], root)


def _copy(root, tmp_path, *parts):
    for part in parts:
        shutil.copytree(root / part, tmp_path / part)
    return tmp_path


@pytest.mark.parametrize("remove, name, expected", [
    ("VOC2007/JPEGImages", "voc_2007_trainval", "VOC2007/JPEGImages: missing; expected <root>/VOC2007/"),
    ("VOC2007/ImageSets/Main/test.txt", "voc_2007_test", "ImageSets/Main/test.txt: missing; expected"),
    ("coco/val2017", "coco_2017_val", "coco/val2017: missing; expected <root>/coco/"),
    ("lvis/lvis_v1_val.json", "lvis_v1_val", "lvis/lvis_v1_val.json: missing; expected <root>/lvis/"),
])
def test_check_names_the_missing_path_and_layout(root, tmp_path, remove, name, expected):
    broken = _copy(root, tmp_path, remove.split("/")[0], *(["coco"] if name.startswith("lvis") else []))
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=expected.replace(".", r"\.")) as e:
        catalog.check([name], broken)
    assert "\n" not in str(e.value)


def test_check_and_loaders_reject_malformed_files(root, tmp_path):
    broken = _copy(root, tmp_path, "coco", "cityscapes")
    ann = broken / "coco" / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:1000])  # a truncated copy
    with pytest.raises(UserError, match="instances_val2017.json: not a complete JSON object"):
        catalog.check(["coco_2017_val"], broken)
    ann.write_text('{"images": [}')  # complete-looking, but not JSON: the loader names it
    catalog.check(["coco_2017_val"], broken)
    catalog.register_all(broken)
    try:
        with pytest.raises(UserError, match="instances_val2017.json: not valid JSON"):
            DatasetCatalog.get("coco_2017_val")
        for png in (broken / "cityscapes" / "gtFine" / "val").glob("*/*_labelTrainIds.png"):
            png.unlink()
        with pytest.raises(UserError, match="labelTrainIds.png: missing .*createTrainIdLabelImgs"):
            catalog.check(["cityscapes_fine_sem_seg_val"], broken)
        catalog.check(["cityscapes_fine_instance_seg_val"], broken)  # the instance task does not need them
    finally:
        catalog.register_all(root)
    with pytest.raises(UserError, match="no_such_dataset: unknown dataset"):
        catalog.check(["no_such_dataset"], root)
    with pytest.raises(UserError, match="datasets root missing"):
        catalog.check(["voc_2007_test"], tmp_path / "nowhere")


def test_make_demo_data_cli_reports_one_line(tmp_path, capsys):
    tool = load_script("tools/make_demo_data.py")
    (tmp_path / "photos").mkdir()
    with pytest.raises(SystemExit) as e:
        tool.main(["--root", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}: not empty") and "\n" not in err
