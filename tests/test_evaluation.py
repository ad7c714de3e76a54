"""Per-class results of every evaluator kind (transfer.d2.evaluation.per_class), and what each
gives a model that predicts nothing.

Each evaluator runs on a demo dataset with hand-made predictions: the ground truth, with some
classes left out or moved, so that a per-class value sitting under the wrong class name, or a
mean passed off as a class's value, fails; or no prediction at all.
"""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.structures.masks import polygons_to_bitmask
from PIL import Image
from torch.nn import functional as F

from transfer.d2 import evaluation
from transfer.d2.config import get_cfg
from transfer.datasets import catalog, demo

pytestmark = pytest.mark.slow  # trains, evaluates or runs tools on generated data: not in `make test-fast`


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = demo.generate(tmp_path_factory.mktemp("demo"), seed=0)
    catalog.register_all(root)
    return root


def _predictions(dicts, masks=False, keypoints=False, drop=(), shift=None):
    """detectron2 model outputs that repeat the ground truth, less the classes in ``drop``;
    ``shift``: (class id, fraction) moves that class's boxes and masks right by a fraction of
    their width."""
    inputs, outputs = [], []
    for d in dicts:
        anns = [a for a in d["annotations"] if not a.get("iscrowd", 0) and a["category_id"] not in drop]
        h, w = d["height"], d["width"]
        boxes = torch.tensor([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        offsets = torch.zeros(len(anns))
        if shift is not None:
            offsets[classes == shift[0]] = shift[1] * (boxes[:, 2] - boxes[:, 0])[classes == shift[0]]
            boxes[:, 0::2] += offsets[:, None]
        inst = Instances((h, w), pred_boxes=Boxes(boxes), scores=torch.ones(len(anns)), pred_classes=classes)
        if masks:
            inst.pred_masks = torch.from_numpy(np.stack(
                [_moved(polygons_to_bitmask(a["segmentation"], h, w), round(float(dx))) for a, dx in zip(anns, offsets)]
                or [np.zeros((h, w), dtype=bool)]
            )[: len(anns)])
        if keypoints:
            inst.pred_keypoints = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
        inputs.append({"image_id": d["image_id"], "file_name": d["file_name"], "height": h, "width": w})
        outputs.append({"instances": inst})
    return inputs, outputs


def _moved(mask, dx: int):
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, :mask.shape[1] - dx]
    return out


def _evaluate(kind, dataset_name, output_dir, **predictions):
    """The kind's evaluator on ``_predictions``, as the results finetune() records (JSON values)."""
    cfg = get_cfg()  # a model that predicts what the predictions hold
    cfg.MODEL.MASK_ON, cfg.MODEL.KEYPOINT_ON = predictions.get("masks", False), predictions.get("keypoints", False)
    evaluator = evaluation.build_evaluator(kind, cfg, dataset_name, str(output_dir))
    evaluator.reset()
    evaluator.process(*_predictions(DatasetCatalog.get(dataset_name), **predictions))
    return evaluation.json_safe(evaluator.evaluate())


def _measured(values):
    return {name: value for name, value in values.items() if value is not None}


# ------------------------------------------------------------------------------------------------
def test_voc_gives_each_class_its_ap_and_ap50_from_the_same_computation_as_the_means(root, tmp_path):
    classes = MetadataCatalog.get("voc_2007_test").thing_classes
    missing, moved = classes.index("dog"), classes.index("bus")
    # bus boxes moved by 20 % of their width: IoU about 0.67-0.71, a match at IoU 0.5 but not at 0.75
    results = _evaluate("voc", "voc_2007_test", tmp_path, drop={missing}, shift=(moved, 0.2))
    per_class = evaluation.per_class("voc", results)

    assert set(per_class) == {"bbox", "bbox/AP50"}
    assert list(per_class["bbox"]) == list(per_class["bbox/AP50"]) == list(classes)
    assert per_class["bbox/AP50"]["car"] == pytest.approx(100.0) and per_class["bbox"]["car"] == pytest.approx(100.0)
    assert per_class["bbox/AP50"]["dog"] == 0.0 and per_class["bbox"]["dog"] == 0.0
    assert per_class["bbox/AP50"]["bus"] == pytest.approx(100.0) and 0.0 < per_class["bbox"]["bus"] < 100.0
    # detectron2's means are the means of these per-class values
    assert results["bbox"]["AP"] == pytest.approx(np.mean(list(per_class["bbox"].values())))
    assert results["bbox"]["AP50"] == pytest.approx(np.mean(list(per_class["bbox/AP50"].values())))
    assert results["bbox"]["AP-bus"] == per_class["bbox"]["bus"]  # also in the evaluator's own results


def test_coco_per_category_ap_is_100_for_predicted_classes_and_0_for_a_left_out_one(root, tmp_path):
    classes = MetadataCatalog.get("coco_2017_val").thing_classes
    present = {classes[a["category_id"]] for d in DatasetCatalog.get("coco_2017_val") for a in d["annotations"]}
    left_out = "kite"
    results = _evaluate("coco", "coco_2017_val", tmp_path, masks=True, drop={classes.index(left_out)})
    per_class = evaluation.per_class("coco", results)

    assert set(per_class) == {"bbox", "segm"}
    for section in ("bbox", "segm"):
        assert list(per_class[section]) == list(classes)  # all 80; None for those not in the demo
        assert _measured(per_class[section]) == pytest.approx(
            {name: 0.0 if name == left_out else 100.0 for name in present}), section


def test_coco_keypoints_of_one_class_get_that_class_s_ap(root, tmp_path):
    results = _evaluate("coco", "keypoints_coco_2017_val", tmp_path, keypoints=True)
    per_class = evaluation.per_class("coco", results)
    assert per_class == {"bbox": {"person": pytest.approx(100.0)}, "keypoints": {"person": pytest.approx(100.0)}}


def test_lvis_per_category_ap_comes_from_the_precision_array_under_lvis_names(root, tmp_path):
    lvis_json = json.loads((root / "lvis" / "lvis_v1_val.json").read_text())
    names = {c["id"]: c["name"] for c in lvis_json["categories"]}
    present = {names[a["category_id"]] for a in lvis_json["annotations"]}
    left_out = "clock"
    contiguous = [i - 1 for i, name in names.items() if name == left_out]  # detectron2: LVIS id - 1
    results = _evaluate("lvis", "lvis_v1_val", tmp_path, masks=True, drop=set(contiguous))
    per_class = evaluation.per_class("lvis", results)

    assert set(per_class) == {"bbox", "segm"}
    for section in ("bbox", "segm"):
        assert len(per_class[section]) == len(names)  # every category; None where LVIS has no value (-1)
        assert _measured(per_class[section]) == pytest.approx(
            {name: 0.0 if name == left_out else 100.0 for name in present}), section
        assert results[section]["AP"] == pytest.approx(np.mean(list(_measured(per_class[section]).values())))


def test_cityscapes_instance_gives_the_official_script_s_per_class_ap_and_ap50(root, tmp_path):
    classes = MetadataCatalog.get("cityscapes_fine_instance_seg_val").thing_classes
    # car masks moved by 20 % of their width: matched at IoU 0.5, not at the higher thresholds
    results = _evaluate("cityscapes_instance", "cityscapes_fine_instance_seg_val", tmp_path, masks=True,
                        drop={classes.index("bicycle")}, shift=(classes.index("car"), 0.2))
    per_class = evaluation.per_class("cityscapes_instance", results)

    assert set(per_class) == {"segm", "segm/AP50"}
    ap, ap50 = per_class["segm"], per_class["segm/AP50"]
    assert set(ap) == set(ap50) == set(classes)
    assert _measured(ap50) == pytest.approx({"person": 100.0, "rider": 100.0, "car": 100.0, "bicycle": 0.0})
    assert ap["person"] == pytest.approx(100.0) and ap["bicycle"] == 0.0 and 0.0 < ap["car"] < 100.0
    assert set(_measured(ap)) == set(demo.CITYSCAPES_THINGS)  # classes with no instances: None
    # the official averages are the means of these per-class values
    assert results["segm"]["AP"] == pytest.approx(np.mean(list(_measured(ap).values())))
    assert results["segm"]["AP50"] == pytest.approx(np.mean(list(_measured(ap50).values())))


def _semantic(kind, dataset_name, output_dir, label_map):
    """The kind's evaluator on one-hot scores of ``label_map(ground truth label image)`` per image."""
    evaluator = evaluation.build_evaluator(kind, None, dataset_name, str(output_dir))
    evaluator.reset()
    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    for record in DatasetCatalog.get(dataset_name):
        labels = torch.as_tensor(label_map(np.array(Image.open(record["sem_seg_file_name"]))), dtype=torch.long)
        labels[labels == 255] = 0  # ignored pixels: not scored, whatever is predicted there
        evaluator.process([record], [{"sem_seg": F.one_hot(labels, num_classes).permute(2, 0, 1).float()}])
    return evaluation.json_safe(evaluator.evaluate())


def test_sem_seg_gives_per_class_iou_under_the_class_names(root, tmp_path):
    classes = MetadataCatalog.get("voc_2012_sem_seg_val").stuff_classes
    cat = classes.index("cat")
    results = _semantic("sem_seg", "voc_2012_sem_seg_val", tmp_path, lambda gt: np.where(gt == cat, 0, gt))
    per_class = evaluation.per_class("sem_seg", results)

    assert list(per_class) == ["sem_seg"] and list(per_class["sem_seg"]) == list(classes)
    iou = per_class["sem_seg"]
    assert iou["cat"] == 0.0 and 0.0 < iou["background"] < 100.0  # cats predicted as background
    assert all(value == pytest.approx(100.0) for name, value in _measured(iou).items()
               if name not in ("cat", "background"))
    assert results["sem_seg"]["mIoU"] == pytest.approx(np.mean(list(_measured(iou).values())))


def test_cityscapes_sem_seg_gives_the_official_script_s_per_class_iou_and_iiou(root, tmp_path):
    classes = MetadataCatalog.get("cityscapes_fine_sem_seg_val").stuff_classes
    car, road = classes.index("car"), classes.index("road")

    def left_cars_as_road(gt):  # instance IoU weighs the missed cars by their size, IoU does not
        gt = gt.copy()
        left = gt[:, : gt.shape[1] // 2]
        left[left == car] = road
        return gt

    results = _semantic("cityscapes_sem_seg", "cityscapes_fine_sem_seg_val", tmp_path, left_cars_as_road)
    per_class = evaluation.per_class("cityscapes_sem_seg", results)

    assert set(per_class) == {"sem_seg", "sem_seg/iIoU"}
    assert list(per_class["sem_seg"]) == list(classes)  # the 19 evaluated classes
    things = MetadataCatalog.get("cityscapes_fine_instance_seg_val").thing_classes
    assert set(per_class["sem_seg/iIoU"]) == set(things)  # iIoU: the classes with instances
    iou, iiou = per_class["sem_seg"], per_class["sem_seg/iIoU"]
    assert 0.0 < iou["car"] < 100.0 and 0.0 < iiou["car"] < 100.0 and 0.0 < iou["road"] < 100.0
    assert iou["person"] == pytest.approx(100.0) and iiou["person"] == pytest.approx(100.0)
    # the official averages are the means of these per-class values
    assert results["sem_seg"]["IoU"] == pytest.approx(np.mean(list(_measured(iou).values())))
    assert results["sem_seg"]["iIoU"] == pytest.approx(np.mean(list(_measured(iiou).values())))


def test_per_class_turns_nan_and_negative_sentinels_into_none_and_skips_absent_sections():
    results = {"segm": {"AP": 30.0, "AP-cat": 40.0, "AP-dog": None, "AP-owl": -100.0, "AP-elk": float("nan")}}
    assert evaluation.per_class("lvis", results) == {"segm": {"cat": 40.0, "dog": None, "owl": None, "elk": None}}
    assert evaluation.per_class("coco", {}) == {}
    with pytest.raises(KeyError, match="unknown evaluator kind"):
        evaluation.per_class("kitti", results)


# ------------------------------------------------------------------------------------------------
# A model that predicts nothing: detectron2's COCO and LVIS evaluators give NaN and leave out the
# segm / keypoints sections; every evaluator here gives AP 0 where the ground truth has instances.
NOTHING = [("voc", "voc_2007_test", {}, {"bbox"}),
           ("coco", "coco_2017_val", {"masks": True}, {"bbox", "segm"}),
           ("coco", "keypoints_coco_2017_val", {"keypoints": True}, {"bbox", "keypoints"}),
           ("lvis", "lvis_v1_val", {"masks": True}, {"bbox", "segm"}),
           ("cityscapes_instance", "cityscapes_fine_instance_seg_val", {"masks": True}, {"segm"})]


def _values(kind, results):
    """Every headline metric of the kind and every per-class value, by name."""
    headline = evaluation.headline_metrics(kind, results, evaluation.HEADLINES[kind])
    values = {f"metric {name}": value for name, value in headline.items()}
    values.update({f"{section} {name}": v for section, classes in evaluation.per_class(kind, results).items()
                   for name, v in classes.items()})
    return values


@pytest.mark.parametrize("kind, dataset_name, predictions, sections", NOTHING,
                         ids=["voc", "coco", "coco_keypoints", "lvis", "cityscapes_instance"])
def test_no_predictions_score_0_wherever_the_ground_truth_makes_a_value_measurable(
        kind, dataset_name, predictions, sections, root, tmp_path):
    images = len(DatasetCatalog.get(dataset_name))
    every_class = set(range(len(MetadataCatalog.get(dataset_name).thing_classes)))
    nothing = _evaluate(kind, dataset_name, tmp_path / "nothing", drop=every_class, **predictions)
    perfect = _evaluate(kind, dataset_name, tmp_path / "perfect", **predictions)  # the ground truth itself

    assert set(nothing) == sections | {"predictions"}
    assert nothing["predictions"] == {"images": images, "instances": 0}
    # Whether a metric or class can be measured is the ground truth's business, not the predictions'.
    empty, full = _values(kind, nothing), _values(kind, perfect)
    measured = {name for name, value in full.items() if value is not None}
    assert measured and {name for name, value in empty.items() if value is not None} == measured
    assert {empty[name] for name in measured} == {0.0}

    names = list(evaluation.HEADLINES[kind])
    fields = evaluation.run_fields(kind, nothing, names)
    assert (fields["no_predictions"], fields["images_evaluated"], fields["predicted_instances"]) == (True, images, 0)
    assert evaluation.run_fields(kind, perfect, names)["no_predictions"] is False
    # every value left out says why
    missing = fields["not_measured"]
    assert set(missing["metrics"]) == {name for name, value in
                                       evaluation.headline_metrics(kind, nothing, names).items() if value is None}
    for section, classes in evaluation.per_class(kind, nothing).items():
        absent = [name for name, value in classes.items() if value is None]
        assert missing["per_class"].get(section) == ({evaluation.NO_GROUND_TRUTH: absent} if absent else None)


@pytest.mark.parametrize("kind, dataset_name", [("sem_seg", "voc_2012_sem_seg_val"),
                                                ("cityscapes_sem_seg", "cityscapes_fine_sem_seg_val")])
def test_a_segmentor_that_predicts_one_class_gets_iou_numbers_and_is_not_flagged(kind, dataset_name, root, tmp_path):
    results = _semantic(kind, dataset_name, tmp_path, np.zeros_like)  # the first class everywhere
    iou = evaluation.per_class(kind, results)["sem_seg"]
    first = MetadataCatalog.get(dataset_name).stuff_classes[0]
    assert 0.0 < evaluation.headline_metrics(kind, results, ["mIoU"])["mIoU"] < 100.0
    assert iou[first] > 0.0 and {value for name, value in _measured(iou).items() if name != first} == {0.0}

    fields = evaluation.run_fields(kind, results, ["mIoU"])
    images = len(DatasetCatalog.get(dataset_name))
    assert (fields["no_predictions"], fields["images_evaluated"]) == (False, images)
    assert fields["predicted_instances"] is None  # a segmentor labels pixels, not instances
    absent = [name for name, value in iou.items() if value is None]  # 0 / 0: not in the ground truth, not predicted
    assert fields["not_measured"]["metrics"] == {}
    assert fields["not_measured"]["per_class"].get("sem_seg") == ({evaluation.NOT_PRESENT: absent} if absent else None)


def test_run_fields_say_why_each_missing_value_is_missing():
    results = {"segm": {"AP": 0.0, "APr": -100.0, "APc": 0.0, "AP-cat": 0.0, "AP-owl": None},
               "predictions": {"images": 5, "instances": 0}}
    fields = evaluation.run_fields("lvis", results, ["APmk", "APr", "APc", "APbb"])
    assert fields["no_predictions"] is True and fields["images_evaluated"] == 5
    assert fields["not_measured"] == {
        "metrics": {"APr": "no rare category in the ground truth", "APbb": "the evaluator returned no value"},
        "per_class": {"segm": {evaluation.NO_GROUND_TRUTH: ["owl"]}}}
    # no image evaluated: nothing is measured, and the model is not said to have predicted nothing
    none = evaluation.run_fields("voc", {"predictions": {"images": 0, "instances": 0}}, ["AP"])
    assert none["no_predictions"] is False and none["not_measured"]["metrics"] == {"AP": "no test image was evaluated"}
    # results without counts: not known to be empty
    assert evaluation.run_fields("voc", {"bbox": {"AP": 10.0}}, ["AP"])["no_predictions"] is False
